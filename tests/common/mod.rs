//! The contract-suite harness: every story runs on a fresh SQLite file and, when
//! BILLRUN_TEST_DATABASE_URL names a PostgreSQL server, on a fresh PostgreSQL database dropped after.
#![allow(dead_code)]

use billrun::app::Billing;
use billrun::billing::zone::{parse_instant, BillingZone};
use billrun::config::Config;
use billrun::store::ledger::ExportFilter;
use std::io::Write;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;

static NOTICE: Once = Once::new();
static COUNTER: AtomicU32 = AtomicU32::new(0);

pub fn t(s: &str) -> i64 {
    parse_instant(s).unwrap()
}

/// A database for one story; dropped (PostgreSQL) or deleted (SQLite) afterwards.
pub struct Backend {
    pub name: &'static str,
    pub url: String,
    admin_url: Option<String>,
    db_name: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

impl Backend {
    pub async fn open(&self, tz: &str) -> Billing {
        let cfg = Config {
            timezone: Some(BillingZone::parse(tz).unwrap()),
            ..Config::for_url(&self.url)
        };
        Billing::open(&cfg).await.unwrap_or_else(|e| panic!("{}: {e:#}", self.name))
    }
}

/// Dropping a backend drops its PostgreSQL database, even when the story panicked.
impl Drop for Backend {
    fn drop(&mut self) {
        if self.db_name.is_none() {
            return;
        }
        let (admin, name) = (self.admin_url.take(), self.db_name.take());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                if let Ok(db) = billrun::store::db::Db::connect(admin.as_deref().unwrap_or_default()).await {
                    let _ = db
                        .exec(
                            sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", name.unwrap_or_default())),
                            vec![],
                        )
                        .await;
                    db.close().await;
                }
            });
        })
        .join();
    }
}

pub fn pg_url() -> Option<String> {
    let url = std::env::var("BILLRUN_TEST_DATABASE_URL").ok().filter(|s| !s.is_empty());
    if url.is_none() {
        if std::env::var("BILLRUN_REQUIRE_POSTGRES").is_ok_and(|v| v == "1") {
            panic!("BILLRUN_REQUIRE_POSTGRES=1 but BILLRUN_TEST_DATABASE_URL is not set: the PostgreSQL tests would be skipped");
        }
        NOTICE.call_once(|| {
            // written past the test harness's capture so that it is seen
            let _ = writeln!(
                std::io::stderr(),
                "NOTICE: PostgreSQL tests skipped: set BILLRUN_TEST_DATABASE_URL=postgres://USER@HOST/DB to run them"
            );
        });
    }
    url
}

fn unique_name() -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("billrun_test_{}_{}_{}", std::process::id(), n, nanos)
}

/// Names of the backends available to this test run.
pub fn available() -> Vec<&'static str> {
    let mut v = vec!["sqlite"];
    if pg_url().is_some() {
        v.push("postgres");
    }
    v
}

/// A fresh, empty database on the named backend.
pub async fn fresh(name: &str) -> Backend {
    if name == "sqlite" {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("billrun.db").display());
        return Backend {
            name: "sqlite",
            url,
            admin_url: None,
            db_name: None,
            _dir: Some(dir),
        };
    }
    let admin = pg_url().expect("PostgreSQL URL");
    let db_name = unique_name();
    let db = billrun::store::db::Db::connect(&admin)
        .await
        .expect("BILLRUN_TEST_DATABASE_URL must be reachable");
    db.exec(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db_name}")), vec![])
        .await
        .unwrap();
    db.close().await;
    let (base, _) = admin.rsplit_once('/').expect("URL with a database name");
    Backend {
        name: "postgres",
        url: format!("{base}/{db_name}"),
        admin_url: Some(admin.clone()),
        db_name: Some(db_name),
        _dir: None,
    }
}

/// Runs `story` on every backend, each in a fresh database.
pub async fn on_each_backend<F>(story: F)
where
    F: AsyncFn(&Backend),
{
    for name in available() {
        let b = fresh(name).await;
        story(&b).await;
    }
}

/// The whole bills CSV.
pub async fn csv(b: &Billing) -> String {
    let mut out = Vec::new();
    b.export(&ExportFilter::default(), &mut out).await.unwrap();
    String::from_utf8(out).unwrap()
}

/// CSV rows as maps from column to cell.
pub fn rows(csv: &str) -> Vec<std::collections::HashMap<String, String>> {
    let mut r = ::csv::Reader::from_reader(csv.as_bytes());
    let headers = r.headers().unwrap().clone();
    r.records()
        .map(|rec| {
            headers
                .iter()
                .zip(rec.unwrap().iter())
                .map(|(h, v)| (h.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

pub fn dec(s: &str) -> rust_decimal::Decimal {
    s.parse().unwrap()
}

/// The export writes rows from stored cells (`export::export`); `explain` and the model of a line
/// use `export::record` on a `LedgerLine`. Both must show every line the same: each exported row
/// equals the record of the line read back by its id.
pub async fn assert_export_matches_records(b: &Billing, backend: &str) {
    let text = csv(b).await;
    let mut r = ::csv::Reader::from_reader(text.as_bytes());
    let mut n = 0;
    for rec in r.records() {
        let rec = rec.unwrap();
        let id = rec.get(0).unwrap().to_string();
        let line = billrun::store::ledger::line(&b.db, &id)
            .await
            .unwrap()
            .expect("exported line exists");
        let want = billrun::export::record(&b.zone, &line);
        let got: Vec<&str> = rec.iter().collect();
        assert_eq!(got, want.iter().map(String::as_str).collect::<Vec<_>>(), "{backend}: line {id}");
        n += 1;
    }
    assert!(n > 0, "{backend}: nothing exported");
}

/// The plan of `sql` as the database shows it, one line per step: SQLite's `EXPLAIN QUERY PLAN`
/// details, PostgreSQL's `EXPLAIN` lines.
pub async fn query_plan(tx: &mut billrun::store::db::Tx, sql: &str, args: Vec<billrun::store::db::Val>) -> String {
    use billrun::store::db::{Backend, Kind};
    let (explain, kinds): (&str, &[Kind]) = match tx.backend() {
        Backend::Sqlite => ("EXPLAIN QUERY PLAN", &[Kind::Int, Kind::Int, Kind::Int, Kind::Text]),
        Backend::Postgres => ("EXPLAIN", &[Kind::Text]),
    };
    let rows = tx.rows(sqlx::AssertSqlSafe(format!("{explain} {sql}")), args, kinds).await.unwrap();
    rows.iter().map(|r| r.text(kinds.len() - 1)).collect::<Vec<_>>().join("\n")
}

/// A transaction for `query_plan` over small or empty tables: on PostgreSQL sequential and bitmap
/// scans are turned off inside it, so the plan shows whether an index can be searched at all
/// (SQLite plans without statistics as it would on a big table).
pub async fn plan_tx(db: &billrun::store::db::Db) -> billrun::store::db::Tx {
    let mut tx = db.begin().await.unwrap();
    if db.backend() == billrun::store::db::Backend::Postgres {
        tx.exec("SET LOCAL enable_seqscan = off", vec![]).await.unwrap();
        tx.exec("SET LOCAL enable_bitmapscan = off", vec![]).await.unwrap();
    }
    tx
}
