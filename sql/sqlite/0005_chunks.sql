-- Settlement in chunks of accounts (each a claimed part of a run, job '<run>#NNNNN' in job_runs):
-- a chunk reads one account range of an hour's posted lines, and a load marks an hour again while
-- a run re-settles it (gen), so clearing it afterwards cannot drop the newer data.
ALTER TABLE dirty_hours ADD COLUMN gen INTEGER NOT NULL DEFAULT 0;
DROP INDEX ledger_hour;
CREATE INDEX ledger_hour_account ON ledger(hour_start, account_id);
CREATE INDEX resources_ppu_account ON resources(account_id) WHERE mode = 'pay_per_use' OR ppu_from IS NOT NULL;
-- The row planning takes exclusively and loads share (PostgreSQL), see store/settle.rs.
INSERT INTO meta (key, value) VALUES ('settle_plan_lock', '') ON CONFLICT (key) DO NOTHING;
