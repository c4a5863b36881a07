-- The settle job's earliest pay-per-use usage (jobs/settle.rs: STATE_SQL), read while there is no
-- run or no watermark yet (every tick of a first catch-up, several times each): the minimum of
-- this expression over the pay-per-use resources. Without an index on it the statement read every
-- one of them, about 0.3 s of each first 1M hour; with it, the first entry. The statement names the
-- same expression and condition.
CREATE INDEX resources_ppu_start ON resources((CASE WHEN ppu_from IS NULL THEN created_at ELSE ppu_from END))
    WHERE mode = 'pay_per_use' OR ppu_from IS NOT NULL;
