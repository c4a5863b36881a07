//! Migrations, embedded in the binary and applied in order on every start (and by `billrun migrate`).

use super::db::{Backend, Db, Kind};
use crate::billing::zone::BillingZone;
use crate::error::InputError;
use anyhow::Result;

const SQLITE: &[(i64, &str)] = &[
    (1, include_str!("../../sql/sqlite/0001_foundation.sql")),
    (2, include_str!("../../sql/sqlite/0002_subscriptions.sql")),
    (3, include_str!("../../sql/sqlite/0003_leases.sql")),
    (4, include_str!("../../sql/sqlite/0004_delivery.sql")),
    (5, include_str!("../../sql/sqlite/0005_chunks.sql")),
    (6, include_str!("../../sql/sqlite/0006_packages.sql")),
    (7, include_str!("../../sql/sqlite/0007_ledger_keys.sql")),
    (8, include_str!("../../sql/sqlite/0008_holders.sql")),
    (9, include_str!("../../sql/sqlite/0009_accounts_fillfactor.sql")),
    (10, include_str!("../../sql/sqlite/0010_chunk_buckets.sql")),
    (11, include_str!("../../sql/sqlite/0011_resources_fillfactor.sql")),
    (12, include_str!("../../sql/sqlite/0012_job_runs_done.sql")),
    (13, include_str!("../../sql/sqlite/0013_ledger_hour_chunk_metered.sql")),
    (14, include_str!("../../sql/sqlite/0014_ledger_chunk_reads_by_id.sql")),
    (15, include_str!("../../sql/sqlite/0015_notifications_resource_alerts.sql")),
    (16, include_str!("../../sql/sqlite/0016_resources_ppu_start.sql")),
    (17, include_str!("../../sql/sqlite/0017_ledger_paid_cycles.sql")),
];
const POSTGRES: &[(i64, &str)] = &[
    (1, include_str!("../../sql/postgres/0001_foundation.sql")),
    (2, include_str!("../../sql/postgres/0002_subscriptions.sql")),
    (3, include_str!("../../sql/postgres/0003_leases.sql")),
    (4, include_str!("../../sql/postgres/0004_delivery.sql")),
    (5, include_str!("../../sql/postgres/0005_chunks.sql")),
    (6, include_str!("../../sql/postgres/0006_packages.sql")),
    (7, include_str!("../../sql/postgres/0007_ledger_keys.sql")),
    (8, include_str!("../../sql/postgres/0008_holders.sql")),
    (9, include_str!("../../sql/postgres/0009_accounts_fillfactor.sql")),
    (10, include_str!("../../sql/postgres/0010_chunk_buckets.sql")),
    (11, include_str!("../../sql/postgres/0011_resources_fillfactor.sql")),
    (12, include_str!("../../sql/postgres/0012_job_runs_done.sql")),
    (13, include_str!("../../sql/postgres/0013_ledger_hour_chunk_metered.sql")),
    (14, include_str!("../../sql/postgres/0014_ledger_chunk_reads_by_id.sql")),
    (15, include_str!("../../sql/postgres/0015_notifications_resource_alerts.sql")),
    (16, include_str!("../../sql/postgres/0016_resources_ppu_start.sql")),
    (17, include_str!("../../sql/postgres/0017_ledger_paid_cycles.sql")),
];

/// Brings the schema up to date. Concurrent starts are serialised by a lock on `meta`.
pub async fn migrate(db: &Db) -> Result<i64> {
    migrate_to(db, i64::MAX).await
}

/// Applies the migrations up to version `target` (tests start a database at an older version).
pub async fn migrate_to(db: &Db, target: i64) -> Result<i64> {
    let steps = match db.backend() {
        Backend::Sqlite => SQLITE,
        Backend::Postgres => POSTGRES,
    };
    db.exec(
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        vec![],
    )
    .await?;
    // up to date: nothing to lock (the lock below would wait for every running load, which
    // holds a row of `meta`, so no command could start during a load)
    let wanted = steps.iter().map(|(v, _)| *v).filter(|v| *v <= target).max().unwrap_or(0);
    let stored = schema_version(&db.rows(SCHEMA_VERSION, vec![], &[Kind::Text]).await?)?;
    if stored >= wanted {
        return Ok(stored);
    }
    let mut tx = db.begin().await?;
    if tx.backend() == Backend::Postgres {
        tx.exec("LOCK TABLE meta IN EXCLUSIVE MODE", vec![]).await?;
    }
    let current = schema_version(&tx.rows(SCHEMA_VERSION, vec![], &[Kind::Text]).await?)?;
    let mut version = current;
    for (v, sql) in steps {
        if *v > version && *v <= target {
            tx.script(sql).await?;
            version = *v;
        }
    }
    if version != current {
        tx.exec(
            "INSERT INTO meta (key, value) VALUES ('schema_version', $1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            vec![version.to_string().into()],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(version)
}

const SCHEMA_VERSION: &str = "SELECT value FROM meta WHERE key = 'schema_version'";

/// The stored schema version in the rows `SCHEMA_VERSION` read; 0 for a new database.
fn schema_version(rows: &[super::db::Row]) -> Result<i64> {
    Ok(rows.first().map(|r| r.text(0).parse::<i64>()).transpose()?.unwrap_or(0))
}

/// The billing zone of this database: stored on first use; naming another one later is refused.
pub async fn billing_zone(db: &Db, requested: Option<&BillingZone>) -> Result<BillingZone> {
    let mut tx = db.begin().await?;
    let stored = tx
        .rows("SELECT value FROM meta WHERE key = 'timezone'", vec![], &[Kind::Text])
        .await?;
    let zone = match (stored.first().map(|r| r.text(0)), requested) {
        (Some(s), req) => {
            let stored = BillingZone::parse(&s).map_err(anyhow::Error::msg)?;
            if let Some(req) = req {
                if req.name() != stored.name() {
                    return Err(InputError(format!(
                        "--timezone: this database bills in {stored}; it cannot be run in {req} (zones are never mixed)"
                    ))
                    .into());
                }
            }
            stored
        }
        (None, req) => {
            let zone = req.copied().unwrap_or(BillingZone::parse("UTC").expect("UTC parses"));
            tx.exec("INSERT INTO meta (key, value) VALUES ('timezone', $1)", vec![zone.name().into()])
                .await?;
            zone
        }
    };
    tx.commit().await?;
    Ok(zone)
}
