-- billrun schema v1 (SQLite). Instants are INTEGER seconds since the epoch (UTC); money and
-- quantities are exact decimal TEXT, never REAL.
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE accounts (
    id               TEXT PRIMARY KEY,
    currency         TEXT NOT NULL,
    opening_balance  TEXT NOT NULL,
    balance          TEXT NOT NULL,
    grace_days       INTEGER NOT NULL,
    retention_days   INTEGER NOT NULL,
    in_arrears_since INTEGER
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
    quantity          INTEGER NOT NULL,
    created_at        INTEGER NOT NULL,
    deleted_at        INTEGER,
    periods           INTEGER,
    auto_renew        INTEGER NOT NULL DEFAULT 0,
    auto_renew_times  INTEGER,
    renew_days_before INTEGER NOT NULL DEFAULT 7,
    loaded_at_seq     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX resources_account ON resources(account_id);
CREATE INDEX resources_created ON resources(created_at);
CREATE TABLE usage_segments (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    resource_id TEXT NOT NULL REFERENCES resources(id),
    item        TEXT NOT NULL,
    quantity    TEXT NOT NULL,
    from_at     INTEGER NOT NULL,
    to_at       INTEGER NOT NULL,
    -- a corrected reading for (resource, item, from) replaces the earlier one, which stays here
    superseded  INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX usage_segments_resource ON usage_segments(resource_id, item, from_at);
CREATE INDEX usage_segments_time ON usage_segments(from_at, to_at);
-- Top-ups and opening balances: balance postings that are not bill lines.
CREATE TABLE balance_postings (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id    TEXT NOT NULL REFERENCES accounts(id),
    kind          TEXT NOT NULL,
    amount        TEXT NOT NULL,
    at            INTEGER NOT NULL,
    balance_after TEXT NOT NULL
);
CREATE INDEX balance_postings_account ON balance_postings(account_id, at);
CREATE TABLE arrears_periods (
    account_id TEXT NOT NULL REFERENCES accounts(id),
    began_at   INTEGER NOT NULL,
    cleared_at INTEGER,
    PRIMARY KEY (account_id, began_at)
);
CREATE TABLE ledger (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    transaction_id   TEXT NOT NULL UNIQUE,
    transaction_time INTEGER NOT NULL,
    account_id       TEXT NOT NULL,
    resource_id      TEXT NOT NULL,
    product          TEXT NOT NULL,
    plan_id          TEXT NOT NULL,
    billing_mode     TEXT NOT NULL,
    transaction_type TEXT NOT NULL,
    billing_item     TEXT,
    period_start     INTEGER NOT NULL,
    period_end       INTEGER NOT NULL,
    usage_seconds    INTEGER,
    quantity         TEXT NOT NULL,
    unit_price       TEXT NOT NULL,
    list_amount      TEXT NOT NULL,
    truncated_amount TEXT NOT NULL,
    amount_due       TEXT NOT NULL,
    paid_amount      TEXT NOT NULL,
    arrears_amount   TEXT NOT NULL,
    balance_after    TEXT NOT NULL,
    currency         TEXT NOT NULL,
    hour_start       INTEGER,
    line_key         TEXT NOT NULL,
    revision         INTEGER NOT NULL,
    run_job          TEXT NOT NULL,
    run_at           INTEGER NOT NULL,
    explain          TEXT NOT NULL,
    UNIQUE (line_key, revision)
);
CREATE INDEX ledger_time ON ledger(transaction_time, transaction_id);
CREATE INDEX ledger_hour ON ledger(hour_start);
CREATE INDEX ledger_account ON ledger(account_id, transaction_time);
-- One row per job run, keyed by its scheduled instant: the claim and the record of what it did.
CREATE TABLE job_runs (
    job          TEXT NOT NULL,
    scheduled_at INTEGER NOT NULL,
    outcome      TEXT NOT NULL,
    owner        TEXT,
    lease_until  INTEGER,
    started_at   INTEGER,
    finished_at  INTEGER,
    lines        INTEGER NOT NULL DEFAULT 0,
    amount_due   TEXT NOT NULL DEFAULT '0',
    detail       TEXT,
    PRIMARY KEY (job, scheduled_at)
);
-- Per job: the last billing hour settled in order (the watermark).
CREATE TABLE job_state (
    job       TEXT PRIMARY KEY,
    watermark INTEGER NOT NULL
);
-- Hours at or before the watermark whose usage changed after they were settled.
CREATE TABLE dirty_hours (
    hour_start INTEGER PRIMARY KEY
);
CREATE TABLE notifications (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    event_key   TEXT NOT NULL UNIQUE,
    kind        TEXT NOT NULL,
    account_id  TEXT NOT NULL,
    resource_id TEXT,
    at          INTEGER NOT NULL,
    days_before INTEGER,
    expires_on  TEXT,
    reason      TEXT,
    delivery    TEXT NOT NULL DEFAULT 'pending'
);
CREATE INDEX notifications_account ON notifications(account_id, at);
