-- The resource index of notifications serves one statement: the daily run's superseding of a
-- resource's older undelivered expiry alerts (store/subscriptions.rs), which reads expiry alerts
-- only. Every renewal notice and lifecycle transition went into it as well, at a random spot of
-- an index of every notice ever sent: at 1M subscriptions a day writes about 308k notices, of
-- which 74k are alerts. It now holds the alerts only; the statement names the same condition.
DROP INDEX notifications_resource;
CREATE INDEX notifications_resource ON notifications(resource_id, at) WHERE kind = 'expiry_alert';
