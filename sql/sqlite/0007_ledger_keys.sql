-- The unique transaction_id is a hash of exactly (line_key, revision), so it already refuses a
-- second posting of a line; the separate unique index on the pair only cost a third random-key
-- index insert per posted line (measured: the largest part of posting a big hour). SQLite cannot
-- drop a table constraint, so the table is rebuilt with the same columns, rows, seq and indexes.
CREATE TABLE ledger_new (
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
    explain          TEXT NOT NULL
);
INSERT INTO ledger_new (seq, transaction_id, transaction_time, account_id, resource_id, product, plan_id, billing_mode, transaction_type, billing_item, period_start, period_end, usage_seconds, quantity, unit_price, list_amount, truncated_amount, amount_due, paid_amount, arrears_amount, balance_after, currency, hour_start, line_key, revision, run_job, run_at, explain)
SELECT seq, transaction_id, transaction_time, account_id, resource_id, product, plan_id, billing_mode, transaction_type, billing_item, period_start, period_end, usage_seconds, quantity, unit_price, list_amount, truncated_amount, amount_due, paid_amount, arrears_amount, balance_after, currency, hour_start, line_key, revision, run_job, run_at, explain FROM ledger;
DROP TABLE ledger;
ALTER TABLE ledger_new RENAME TO ledger;
CREATE INDEX ledger_time ON ledger(transaction_time, transaction_id);
CREATE INDEX ledger_hour_account ON ledger(hour_start, account_id);
CREATE INDEX ledger_account ON ledger(account_id, transaction_time);
