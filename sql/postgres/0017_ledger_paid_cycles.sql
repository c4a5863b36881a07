-- A refund (unsubscribe, change to pay-per-use now) reads the cycles its subscription paid for:
-- its purchase and renewal lines (store/subscriptions.rs: PAID_CYCLES_SQL). No index had the
-- resource, so each refund read the whole ledger inside its write transaction: 0.2 s at 1M lines,
-- and a ledger of 1M pay-per-use resources grows by 24M lines a day, so within a month every
-- unsubscribe held the write lock (SQLite) or its account's row lock (PostgreSQL) for minutes.
-- Only prepaid lines go into this index: settlement's usage lines, nearly all of the ledger, are
-- checked against its condition and skipped. The statement names the same condition.
CREATE INDEX ledger_paid_cycles ON ledger(resource_id, period_start)
    WHERE transaction_type IN ('purchase', 'renewal');
