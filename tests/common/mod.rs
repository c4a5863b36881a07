//! The contract-suite harness: every story runs on a fresh SQLite file and, when
//! BILLRUN_TEST_DATABASE_URL names a PostgreSQL server, on a fresh PostgreSQL database dropped after.
#![allow(dead_code)]

use billrun::app::Billing;
use billrun::billing::zone::{parse_instant, BillingZone};
use billrun::config::Config;
use billrun::jobs::settle::SettleSchedule;
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
        let cfg = Config { database_url: self.url.clone(), timezone: Some(BillingZone::parse(tz).unwrap()), settle: SettleSchedule::default() };
        Billing::open(&cfg).await.unwrap_or_else(|e| panic!("{}: {e:#}", self.name))
    }

    pub async fn drop_db(&self) {
        if let (Some(admin), Some(name)) = (&self.admin_url, &self.db_name) {
            let db = billrun::store::db::Db::connect(admin).await.unwrap();
            db.exec(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")), vec![]).await.unwrap();
            db.close().await;
        }
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
            let _ = writeln!(std::io::stderr(), "NOTICE: PostgreSQL tests skipped: set BILLRUN_TEST_DATABASE_URL=postgres://USER@HOST/DB to run them");
        });
    }
    url
}

fn unique_name() -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("billrun_test_{}_{}_{}", std::process::id(), n, nanos)
}

/// Fresh databases, one per backend available.
pub async fn backends() -> Vec<Backend> {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("billrun.db").display());
    let mut out = vec![Backend { name: "sqlite", url, admin_url: None, db_name: None, _dir: Some(dir) }];
    if let Some(admin) = pg_url() {
        let name = unique_name();
        let db = billrun::store::db::Db::connect(&admin).await.expect("BILLRUN_TEST_DATABASE_URL must be reachable");
        db.exec(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")), vec![]).await.unwrap();
        db.close().await;
        let (base, _) = admin.rsplit_once('/').expect("URL with a database name");
        let base = base.to_string();
        out.push(Backend { name: "postgres", url: format!("{base}/{name}"), admin_url: Some(admin), db_name: Some(name), _dir: None });
    }
    out
}

/// Runs `story` on every backend, each in a fresh database.
pub async fn on_each_backend<F>(story: F)
where
    F: AsyncFn(&Backend),
{
    for b in backends().await {
        story(&b).await;
        b.drop_db().await;
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
    r.records().map(|rec| headers.iter().zip(rec.unwrap().iter()).map(|(h, v)| (h.to_string(), v.to_string())).collect()).collect()
}

pub fn dec(s: &str) -> rust_decimal::Decimal {
    s.parse().unwrap()
}
