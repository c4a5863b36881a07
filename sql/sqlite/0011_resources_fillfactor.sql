-- PostgreSQL only (resources' fillfactor; SQLite updates a row in place). Kept so that both
-- schemas carry the same versions.
SELECT 1;
