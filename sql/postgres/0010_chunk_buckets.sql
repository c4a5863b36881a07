-- Settlement chunks follow (bucket, account id) instead of the account id, and metered lines' ids
-- carry the same bucket after their hour (billing/settle.rs: chunk_bucket, metered_transaction_id),
-- so each chunk's lines go into the ledger's id and export-order indexes as one run of keys instead
-- of one key on every page of them. The bucket is computed from the last four characters of the
-- account id; the expression below is the one store/settle.rs's bucket_sql writes (a test compares
-- them), so a chunk's reads search these indexes.
DROP INDEX resources_ppu_account;
CREATE INDEX resources_ppu_chunk ON resources(((ascii(substr(account_id, length(account_id), 1))::bigint + 31 * ascii(substr(account_id, length(account_id) - 1, 1))::bigint + 961 * ascii(substr(account_id, length(account_id) - 2, 1))::bigint + 29791 * ascii(substr(account_id, length(account_id) - 3, 1))::bigint) % 65536), account_id)
    WHERE mode = 'pay_per_use' OR ppu_from IS NOT NULL;
DROP INDEX ledger_hour_account;
CREATE INDEX ledger_hour_chunk ON ledger(hour_start, ((ascii(substr(account_id, length(account_id), 1))::bigint + 31 * ascii(substr(account_id, length(account_id) - 1, 1))::bigint + 961 * ascii(substr(account_id, length(account_id) - 2, 1))::bigint + 29791 * ascii(substr(account_id, length(account_id) - 3, 1))::bigint) % 65536), account_id);
