-- billrun schema v1 (PostgreSQL). Instants are BIGINT seconds since the epoch (UTC); money and
-- quantities are NUMERIC, never floating point.
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE accounts (
    id               TEXT PRIMARY KEY,
    currency         TEXT NOT NULL,
    opening_balance  NUMERIC NOT NULL,
    balance          NUMERIC NOT NULL,
    grace_days       BIGINT NOT NULL,
    retention_days   BIGINT NOT NULL,
    in_arrears_since BIGINT
);
CREATE TABLE plans (
    id      TEXT PRIMARY KEY,
    product TEXT NOT NULL,
    doc     TEXT NOT NULL
);
CREATE TABLE resources (
    id                TEXT PRIMARY KEY,
    account_id        TEXT NOT NULL REFERENCES accounts(id),
    plan_id           TEXT NOT NULL REFERENCES plans(id),
    mode              TEXT NOT NULL,
    quantity          BIGINT NOT NULL,
    created_at        BIGINT NOT NULL,
    deleted_at        BIGINT,
    periods           BIGINT,
    auto_renew        BIGINT NOT NULL DEFAULT 0,
    auto_renew_times  BIGINT,
    renew_days_before BIGINT NOT NULL DEFAULT 7,
    loaded_at_seq     BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX resources_account ON resources(account_id);
CREATE INDEX resources_created ON resources(created_at);
CREATE TABLE usage_segments (
    id          BIGSERIAL PRIMARY KEY,
    resource_id TEXT NOT NULL REFERENCES resources(id),
    item        TEXT NOT NULL,
    quantity    NUMERIC NOT NULL,
    from_at     BIGINT NOT NULL,
    to_at       BIGINT NOT NULL,
    -- a corrected reading for (resource, item, from) replaces the earlier one, which stays here
    superseded  BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX usage_segments_resource ON usage_segments(resource_id, item, from_at);
CREATE INDEX usage_segments_time ON usage_segments(from_at, to_at);
-- Top-ups and opening balances: balance postings that are not bill lines.
CREATE TABLE balance_postings (
    id            BIGSERIAL PRIMARY KEY,
    account_id    TEXT NOT NULL REFERENCES accounts(id),
    kind          TEXT NOT NULL,
    amount        NUMERIC NOT NULL,
    at            BIGINT NOT NULL,
    balance_after NUMERIC NOT NULL
);
CREATE INDEX balance_postings_account ON balance_postings(account_id, at);
CREATE TABLE arrears_periods (
    account_id TEXT NOT NULL REFERENCES accounts(id),
    began_at   BIGINT NOT NULL,
    cleared_at BIGINT,
    PRIMARY KEY (account_id, began_at)
);
CREATE TABLE ledger (
    seq              BIGSERIAL PRIMARY KEY,
    transaction_id   TEXT NOT NULL UNIQUE,
    transaction_time BIGINT NOT NULL,
    account_id       TEXT NOT NULL,
    resource_id      TEXT NOT NULL,
    product          TEXT NOT NULL,
    plan_id          TEXT NOT NULL,
    billing_mode     TEXT NOT NULL,
    transaction_type TEXT NOT NULL,
    billing_item     TEXT,
    period_start     BIGINT NOT NULL,
    period_end       BIGINT NOT NULL,
    usage_seconds    BIGINT,
    quantity         NUMERIC NOT NULL,
    unit_price       NUMERIC NOT NULL,
    list_amount      NUMERIC NOT NULL,
    truncated_amount NUMERIC NOT NULL,
    amount_due       NUMERIC NOT NULL,
    paid_amount      NUMERIC NOT NULL,
    arrears_amount   NUMERIC NOT NULL,
    balance_after    NUMERIC NOT NULL,
    currency         TEXT NOT NULL,
    hour_start       BIGINT,
    line_key         TEXT NOT NULL,
    revision         BIGINT NOT NULL,
    run_job          TEXT NOT NULL,
    run_at           BIGINT NOT NULL,
    explain          TEXT NOT NULL,
    UNIQUE (line_key, revision)
);
CREATE INDEX ledger_time ON ledger(transaction_time, transaction_id);
CREATE INDEX ledger_hour ON ledger(hour_start);
CREATE INDEX ledger_account ON ledger(account_id, transaction_time);
-- One row per job run, keyed by its scheduled instant: the claim and the record of what it did.
CREATE TABLE job_runs (
    job          TEXT NOT NULL,
    scheduled_at BIGINT NOT NULL,
    outcome      TEXT NOT NULL,
    owner        TEXT,
    lease_until  BIGINT,
    started_at   BIGINT,
    finished_at  BIGINT,
    lines        BIGINT NOT NULL DEFAULT 0,
    amount_due   NUMERIC NOT NULL DEFAULT 0,
    detail       TEXT,
    PRIMARY KEY (job, scheduled_at)
);
-- Per job: the last billing hour settled in order (the watermark).
CREATE TABLE job_state (
    job       TEXT PRIMARY KEY,
    watermark BIGINT NOT NULL
);
-- Hours at or before the watermark whose usage changed after they were settled.
CREATE TABLE dirty_hours (
    hour_start BIGINT PRIMARY KEY
);
CREATE TABLE notifications (
    id          BIGSERIAL PRIMARY KEY,
    event_key   TEXT NOT NULL UNIQUE,
    kind        TEXT NOT NULL,
    account_id  TEXT NOT NULL,
    resource_id TEXT,
    at          BIGINT NOT NULL,
    days_before BIGINT,
    expires_on  TEXT,
    reason      TEXT,
    delivery    TEXT NOT NULL DEFAULT 'pending'
);
CREATE INDEX notifications_account ON notifications(account_id, at);
