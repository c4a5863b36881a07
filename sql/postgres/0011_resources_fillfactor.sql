-- The daily run updates every subscription it renews, expires or freezes (118k of 1M a day at
-- provider scale). With full pages none of those updates could stay on its page, so each added an
-- entry to every one of the resources table's indexes and left a dead row. With a fifth of each
-- page free most of them are HOT (measured by hand in session 5 on 200k subscriptions: the daily
-- run 11% faster). Pages written before this keep their fill until rewritten (VACUUM FULL resources).
ALTER TABLE resources SET (fillfactor = 80);
