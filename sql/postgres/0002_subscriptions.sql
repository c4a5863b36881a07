-- Yearly/monthly subscriptions and lifecycle state. Expiry is counted from the purchase date
-- (anchor_date) by the months paid so far, so renewals never drift.
ALTER TABLE resources ADD COLUMN anchor_date TEXT;
ALTER TABLE resources ADD COLUMN months_paid BIGINT;
ALTER TABLE resources ADD COLUMN expires_on TEXT;
ALTER TABLE resources ADD COLUMN renewals_done BIGINT NOT NULL DEFAULT 0;
-- billed pay-per-use from this instant (to-ppu now, or at expiry)
ALTER TABLE resources ADD COLUMN ppu_from BIGINT;
ALTER TABLE resources ADD COLUMN ppu_at_expiry BIGINT NOT NULL DEFAULT 0;
-- unsubscribed, or released at the end of retention: never billed or renewed again
ALTER TABLE resources ADD COLUMN released_at BIGINT;
CREATE INDEX resources_mode ON resources(mode);
CREATE INDEX notifications_resource ON notifications(resource_id, kind, at);
