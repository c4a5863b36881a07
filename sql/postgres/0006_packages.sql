-- Count-metered usage (KooMessage): `quantity` units of `item` at instant `at`. A later record for
-- the same (resource, item, at) corrects the earlier one, which stays here superseded.
CREATE TABLE usage_counts (
    id          BIGSERIAL PRIMARY KEY,
    resource_id TEXT NOT NULL REFERENCES resources(id),
    item        TEXT NOT NULL,
    quantity    NUMERIC NOT NULL,
    at          BIGINT NOT NULL,
    superseded  BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX usage_counts_time ON usage_counts(at);
CREATE INDEX usage_counts_resource ON usage_counts(resource_id, item, at);
-- A prepaid package is a subscription row of `resources` (purchase, renewal, alerts, lifecycle)
-- naming its kind in the plan and the metered resource whose units it covers.
ALTER TABLE resources ADD COLUMN package TEXT;
ALTER TABLE resources ADD COLUMN serves TEXT;
-- KooDrive editions: expansion parts priced with the base edition, as JSON {"part": count}.
ALTER TABLE resources ADD COLUMN parts TEXT;
CREATE INDEX resources_serves ON resources(serves) WHERE serves IS NOT NULL;
-- Each paid cycle of a package: its quota, what settlement has drawn from it, and the instant from
-- which it may be drawn (a cycle renewed after it began is drawn from the renewal on).
CREATE TABLE package_cycles (
    package_id TEXT NOT NULL REFERENCES resources(id),
    cycle      BIGINT NOT NULL,
    start_at   BIGINT NOT NULL,
    end_at     BIGINT NOT NULL,
    valid_from BIGINT NOT NULL,
    quota      NUMERIC NOT NULL,
    used       NUMERIC NOT NULL DEFAULT 0,
    PRIMARY KEY (package_id, cycle)
);
-- The longest usage segment loaded, so that settlement finds an hour's segments on the from_at
-- index among those starting at most this long before the hour (kept up to date by every load).
INSERT INTO meta (key, value)
SELECT 'longest_segment_seconds', CAST(COALESCE(MAX(to_at - from_at), 0) AS TEXT) FROM usage_segments WHERE 1 = 1
ON CONFLICT (key) DO NOTHING;
