//! `cargo bench --bench scale [-- --quick]`: settlement at provider scale, against the database's
//! own write limit measured in the same run. Each measured step runs in a child process (this
//! binary again, with `--child`), so its peak RSS is its own; the last line of the output is one
//! JSON object with every figure (field names in the README).
//!
//! SQLite always; PostgreSQL too when BILLRUN_BENCH_DATABASE_URL names a server (a database is
//! created per world and dropped after). `--quick`: N = 10k only, smaller side worlds (CI smoke).

use anyhow::{bail, Context, Result};
use billrun::app::Billing;
use billrun::billing::zone::BillingZone;
use billrun::config::Config;
use billrun::store::db::{Db, Kind, Val};
use billrun::store::ledger::{self, ExportFilter};
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// mimalloc instead of the system allocator: settlement allocates and frees many small strings per
/// line, and glibc's malloc spent a fifth of a big hour in its own bookkeeping.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The world's first hour (UTC); resources exist from its start, so the first settle run (two
/// hours later) settles exactly one hour of every resource.
const H0: i64 = 1_704_880_800; // 2024-01-10T10:00:00Z
const HOUR: i64 = 3600;
const DAY: i64 = 86_400;

fn iso(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0).unwrap().to_rfc3339()
}

fn main() -> Result<()> {
    // as the billrun binary does, so that each step's peak RSS is the binary's
    billrun::store::db::share_one_malloc_arena();
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        if std::env::var("RUST_LOG").is_ok() {
            // a measured step's own log, to see where its time goes (`RUST_LOG=sqlx=debug`)
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_writer(std::io::stderr)
                .init();
        }
        let out = rt.block_on(child(&args[i + 1..]))?;
        println!("{out}");
        return Ok(());
    }
    let quick = args.iter().any(|a| a == "--quick");
    let sizes: &[usize] = if quick { &[10_000] } else { &[10_000, 100_000, 1_000_000] };
    // `--only settle,catchup,daily,year` runs just those parts; `--subs N` sizes the daily world
    let only: Option<Vec<String>> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.split(',').map(str::to_string).collect());
    let part = |p: &str| only.as_ref().is_none_or(|o| o.iter().any(|x| x == p));
    let subs_override: Option<usize> = args
        .iter()
        .position(|a| a == "--subs")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok());
    let work = tempfile::tempdir()?;
    let mut backends = vec![Target::Sqlite];
    if let Ok(url) = std::env::var("BILLRUN_BENCH_DATABASE_URL") {
        backends.push(Target::Postgres(url));
    } else {
        println!("(PostgreSQL skipped: set BILLRUN_BENCH_DATABASE_URL=postgres://... to include it)");
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let mut results = Vec::new();
    let mut csv_raw_done = std::collections::HashSet::new();
    for target in &backends {
        let name = target.name();
        for &n in sizes.iter().filter(|_| part("settle")) {
            let accounts = n.min(100_000);
            let doc = work.path().join(format!("ppu-{n}.json"));
            if !doc.exists() {
                write_ppu_world(&doc, n, accounts)?;
            }
            let db = rt.block_on(target.fresh(work.path(), &format!("settle{n}")))?;
            let load = run_child(&["load", &db.url, doc.to_str().unwrap()])?;
            checkpoint(&db.url)?;
            let settle = run_child(&["tick", &db.url, &iso(H0 + 2 * HOUR)])?;
            let lines = settle["lines"].as_f64().unwrap_or(0.0);
            let secs = settle["seconds"].as_f64().unwrap_or(f64::NAN);
            checkpoint(&db.url)?;
            let raw = run_child(&["raw", &db.url, &(lines as usize).to_string()])?;
            let raw_rate = raw["rows_per_s"].as_f64().unwrap_or(f64::NAN);
            checkpoint(&db.url)?;
            let floor = run_child(&["floor", &db.url])?;
            let floor_rate = floor["rows_per_s"].as_f64().unwrap_or(f64::NAN);
            let export_file = work.path().join(format!("bills-{name}-{n}.csv"));
            checkpoint(&db.url)?;
            let export = run_child(&["export", &db.url, export_file.to_str().unwrap()])?;
            println!(
                "{name:8} N={n:>9}: load {:.1} s | one hour settled: {} lines in {:.2} s = {:.0} lines/s, peak RSS {:.0} MiB | \
                 raw {} write limit {:.0} rows/s, settlement/raw {:.2} | engine floor {:.0} rows/s ({:.2} s) | export {:.0} rows/s",
                load["seconds"].as_f64().unwrap_or(0.0),
                lines,
                secs,
                lines / secs,
                settle["peak_rss_mib"].as_f64().unwrap_or(0.0),
                raw["method"].as_str().unwrap_or(""),
                raw_rate,
                (lines / secs) / raw_rate,
                floor_rate,
                floor["seconds"].as_f64().unwrap_or(f64::NAN),
                export["rows_per_s"].as_f64().unwrap_or(0.0),
            );
            results
                .push(json!({"backend": name, "figure": "load", "n": n, "seconds": load["seconds"], "peak_rss_mib": load["peak_rss_mib"]}));
            results.push(
                json!({"backend": name, "figure": "settle_hour", "n": n, "accounts": accounts, "lines": lines, "seconds": secs,
                "lines_per_s": lines / secs, "peak_rss_mib": settle["peak_rss_mib"]}),
            );
            results.push(
                json!({"backend": name, "figure": "raw_write", "n": n, "method": raw["method"], "rows": lines, "seconds": raw["seconds"],
                "rows_per_s": raw_rate, "settle_to_raw": (lines / secs) / raw_rate}),
            );
            results.push(
                json!({"backend": name, "figure": "engine_floor", "n": n, "method": floor["method"], "rows": floor["rows"],
                "seconds": floor["seconds"], "rows_per_s": floor_rate, "settle_to_floor": (lines / secs) / floor_rate}),
            );
            results.push(
                json!({"backend": name, "figure": "export", "n": n, "rows": export["rows"], "seconds": export["seconds"],
                "rows_per_s": export["rows_per_s"], "peak_rss_mib": export["peak_rss_mib"]}),
            );
            if csv_raw_done.insert(n) {
                let raw_csv = run_child(&[
                    "csvraw",
                    &db.url,
                    &(lines as usize).to_string(),
                    work.path().join("raw.csv").to_str().unwrap(),
                ])?;
                println!(
                    "         N={n:>9}: csv crate alone writes the same rows at {:.0} rows/s",
                    raw_csv["rows_per_s"].as_f64().unwrap_or(0.0)
                );
                results.push(
                    json!({"backend": "none", "figure": "csv_raw", "n": n, "rows": raw_csv["rows"], "seconds": raw_csv["seconds"],
                    "rows_per_s": raw_csv["rows_per_s"]}),
                );
            }
            rt.block_on(target.drop_db(&db))?;
        }
        // 24 hours of catch-up at once
        let n = if quick { 10_000 } else { 100_000 };
        if part("catchup") {
            let doc = work.path().join(format!("ppu-{n}.json"));
            if !doc.exists() {
                write_ppu_world(&doc, n, n.min(100_000))?;
            }
            let db = rt.block_on(target.fresh(work.path(), "catchup"))?;
            run_child(&["load", &db.url, doc.to_str().unwrap()])?;
            checkpoint(&db.url)?;
            let c = run_child(&["tick", &db.url, &iso(H0 + 25 * HOUR)])?;
            println!(
                "{name:8} catch-up of 24 hours, {n} resources: {} lines in {:.2} s ({:.0} lines/s), peak RSS {:.0} MiB",
                c["lines"],
                c["seconds"].as_f64().unwrap_or(0.0),
                c["lines"].as_f64().unwrap_or(0.0) / c["seconds"].as_f64().unwrap_or(1.0),
                c["peak_rss_mib"].as_f64().unwrap_or(0.0)
            );
            results.push(
                json!({"backend": name, "figure": "catch_up_24h", "n": n, "lines": c["lines"], "settle_runs": c["settle_runs"],
            "seconds": c["seconds"], "peak_rss_mib": c["peak_rss_mib"]}),
            );
            rt.block_on(target.drop_db(&db))?;
        }

        // the daily job over many subscriptions
        let subs = subs_override.unwrap_or(if quick { 10_000 } else { 1_000_000 });
        if part("daily") {
            let doc = work.path().join(format!("subs-{subs}.json"));
            if !doc.exists() {
                write_subscription_world(&doc, subs, subs.min(100_000))?;
            }
            let db = rt.block_on(target.fresh(work.path(), "daily"))?;
            let load = run_child(&["load", &db.url, doc.to_str().unwrap()])?;
            checkpoint(&db.url)?;
            let d = run_child(&["daily", &db.url])?;
            println!(
            "{name:8} daily job over {subs} subscriptions: {:.2} s ({} renewals, {} failed attempts, {} transitions, {} alerts), load {:.1} s",
            d["seconds"].as_f64().unwrap_or(0.0),
            d["renewals"],
            d["renewal_failures"],
            d["transitions"],
            d["alerts"],
            load["seconds"].as_f64().unwrap_or(0.0)
        );
            results.push(json!({"backend": name, "figure": "daily", "n": subs, "seconds": d["seconds"], "renewals": d["renewals"],
            "renewal_failures": d["renewal_failures"], "transitions": d["transitions"], "alerts": d["alerts"], "peak_rss_mib": d["peak_rss_mib"]}));
            rt.block_on(target.drop_db(&db))?;
        }
        if !part("year") {
            continue;
        }

        // a year with nothing to settle
        let doc = work.path().join("quiet.json");
        std::fs::write(
            &doc,
            format!(
                r#"{{"accounts": [{{"id": "a", "balance": "10.00"}}], "plans": [{{"id": "p", "product": "KooPhone", "hourly": {{"instance": "0.36"}}}}],
                "resources": [{{"id": "vm", "account": "a", "plan": "p", "mode": "pay_per_use", "created_at": "{}", "deleted_at": "{}"}}]}}"#,
                iso(H0),
                iso(H0 + 1800)
            ),
        )?;
        let db = rt.block_on(target.fresh(work.path(), "year"))?;
        run_child(&["load", &db.url, doc.to_str().unwrap()])?;
        checkpoint(&db.url)?;
        let y = run_child(&["tick", &db.url, &iso(H0 + 365 * DAY + 2 * HOUR)])?;
        println!(
            "{name:8} empty year of catch-up: {} settle runs and {} daily runs in {:.2} s",
            y["settle_runs"],
            y["daily_runs"],
            y["seconds"].as_f64().unwrap_or(0.0)
        );
        results.push(
            json!({"backend": name, "figure": "empty_year", "settle_runs": y["settle_runs"], "daily_runs": y["daily_runs"],
            "seconds": y["seconds"]}),
        );
        rt.block_on(target.drop_db(&db))?;
    }
    println!("{}", json!({"bench": "scale", "quick": quick, "results": results}));
    Ok(())
}

/// Writes the database's pending pages out before a measured step (PostgreSQL `CHECKPOINT`,
/// SQLite's WAL into the file), so that a step is not measured while the checkpoint of the load
/// or step before it is still being written (a 1M-subscription load leaves gigabytes of it).
fn checkpoint(url: &str) -> Result<()> {
    run_child(&["checkpoint", url]).map(|_| ())
}

/// Runs one measured step in a child process; returns what it printed (one JSON object).
fn run_child(args: &[&str]) -> Result<Value> {
    let out = Command::new(std::env::current_exe()?)
        .arg("--child")
        .args(args)
        .env("BILLRUN_LOG", "warn")
        .output()
        .context("bench child")?;
    if !out.status.success() {
        bail!("child {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8(out.stdout)?;
    serde_json::from_str(text.lines().last().unwrap_or("")).with_context(|| format!("child {args:?} printed {text}"))
}

/// The child's own peak resident set (Linux: VmHWM).
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|k| k.parse::<f64>().ok()))
        })
        .map(|kib| kib / 1024.0)
        .unwrap_or(f64::NAN)
}

async fn open(url: &str) -> Result<Billing> {
    let mut cfg = Config {
        timezone: Some(BillingZone::parse("UTC").unwrap()),
        ..Config::for_url(url)
    };
    if let Some(n) = std::env::var("BILLRUN_CHUNK_RESOURCES").ok().and_then(|v| v.parse().ok()) {
        cfg.settle.chunk_resources = Some(n);
    }
    if let Some(n) = std::env::var("BILLRUN_CHUNK_PARTS").ok().and_then(|v| v.parse().ok()) {
        cfg.settle.chunk_parts = Some(n);
    }
    Billing::open(&cfg).await
}

async fn child(args: &[String]) -> Result<Value> {
    let a = |i: usize| args.get(i).map(String::as_str).unwrap_or("");
    // `--child gen ppu|subs FILE N`: write a world document only (to profile one step by hand)
    if a(0) == "gen" {
        let n: usize = a(3).parse()?;
        let path = Path::new(a(2));
        match a(1) {
            "ppu" => write_ppu_world(path, n, n.min(100_000))?,
            "subs" => write_subscription_world(path, n, n.min(100_000))?,
            other => bail!("unknown world {other:?}"),
        }
        return Ok(json!({"written": a(2)}));
    }
    // every step opens the database first (connect, schema check) outside the measured time
    let b = open(a(1)).await?;
    let started = Instant::now();
    let mut out = match a(0) {
        "checkpoint" => {
            match &b.db {
                Db::Sqlite(_) => {
                    b.db.rows("PRAGMA wal_checkpoint(TRUNCATE)", vec![], &[Kind::Int, Kind::Int, Kind::Int])
                        .await?;
                }
                Db::Postgres(_) => {
                    b.db.exec("CHECKPOINT", vec![]).await?;
                }
            }
            json!({})
        }
        "load" => {
            let text = std::fs::read_to_string(a(2))?;
            let s = b.load_json(a(2), &text).await?;
            json!({"resources": s.resources, "purchases": s.purchases})
        }
        "tick" => {
            let now = billrun::billing::zone::parse_instant(a(2)).map_err(anyhow::Error::msg)?;
            let t = b.tick(now, |_, _| {}).await?;
            json!({"lines": t.lines, "settle_runs": t.settle_runs, "daily_runs": t.daily_runs})
        }
        "daily" => {
            // the daily job has run through yesterday: today's run over every subscription
            let today = H0 + DAY - 10 * HOUR + 180; // 2024-01-11T00:03:00Z
            b.db.exec(
                "INSERT INTO job_runs (job, scheduled_at, outcome) VALUES ('daily', $1, 'ok')",
                vec![(today - DAY).into()],
            )
            .await?;
            let started = Instant::now();
            let t = b.tick(today, |_, _| {}).await?;
            return Ok(
                json!({"seconds": started.elapsed().as_secs_f64(), "renewals": t.renewals, "renewal_failures": t.renewal_failures,
                "transitions": t.transitions, "alerts": t.alerts, "daily_runs": t.daily_runs, "peak_rss_mib": peak_rss_mib()}),
            );
        }
        "raw" => {
            let n: usize = a(2).parse()?;
            let started = Instant::now();
            let method = raw_insert(&b.db, n).await?;
            return Ok(json!({"method": method, "rows": n, "seconds": started.elapsed().as_secs_f64(),
                "rows_per_s": n as f64 / started.elapsed().as_secs_f64()}));
        }
        "floor" => {
            let rows = engine_floor(&b.db).await?;
            return Ok(
                json!({"method": "INSERT ... SELECT inside the database", "rows": rows, "seconds": started.elapsed().as_secs_f64(),
                "rows_per_s": rows as f64 / started.elapsed().as_secs_f64()}),
            );
        }
        "export" => {
            let file = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(a(2))?);
            let rows = b.export(&ExportFilter::default(), file).await?;
            json!({"rows": rows, "rows_per_s": rows as f64 / started.elapsed().as_secs_f64()})
        }
        "csvraw" => {
            // the csv crate alone, writing the same rows (one real line, ids varied) to a file
            let n: usize = a(2).parse()?;
            let template = template_line(&b.db).await?;
            let started = Instant::now();
            let mut w = csv::WriterBuilder::new()
                .terminator(csv::Terminator::CRLF)
                .from_writer(std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(a(3))?));
            w.write_record(billrun::export::COLUMNS)?;
            let mut rec = billrun::export::record(&b.zone, &template);
            for i in 0..n {
                rec[0] = format!("tx_{i:024x}");
                w.write_record(&rec)?;
            }
            w.flush()?;
            return Ok(
                json!({"rows": n, "seconds": started.elapsed().as_secs_f64(), "rows_per_s": n as f64 / started.elapsed().as_secs_f64()}),
            );
        }
        other => bail!("unknown child step {other:?}"),
    };
    let o = out.as_object_mut().unwrap();
    o.insert("seconds".into(), json!(started.elapsed().as_secs_f64()));
    o.insert("peak_rss_mib".into(), json!(peak_rss_mib()));
    Ok(out)
}

/// A real posted line, to give synthetic rows the ledger's shape and widths.
async fn template_line(db: &Db) -> Result<billrun::billing::model::LedgerLine> {
    let id = db
        .rows(
            "SELECT transaction_id FROM ledger ORDER BY seq LIMIT 1",
            vec![],
            &[billrun::store::db::Kind::Text],
        )
        .await?
        .first()
        .map(|r| r.text(0))
        .context("no ledger line to copy")?;
    ledger::line(db, &id).await?.context("the line")
}

/// An empty table `{prefix}_ledger` of the ledger's shape: columns, keys and indexes.
async fn create_like_ledger(db: &Db, prefix: &str) -> Result<()> {
    match db {
        Db::Sqlite(_) => {
            let mut tx = db.begin().await?;
            let ddl: Vec<String> = tx
                .rows(
                    "SELECT sql FROM sqlite_master WHERE tbl_name = 'ledger' AND sql IS NOT NULL ORDER BY type DESC",
                    vec![],
                    &[billrun::store::db::Kind::Text],
                )
                .await?
                .iter()
                .map(|r| r.text(0))
                .collect();
            for stmt in ddl {
                // a table rebuilt by a migration is stored as `CREATE TABLE "ledger"`
                let stmt = stmt
                    .replace("TABLE \"ledger\"", &format!("TABLE {prefix}_ledger"))
                    .replace("TABLE ledger", &format!("TABLE {prefix}_ledger"))
                    .replace("ON ledger", &format!("ON {prefix}_ledger"));
                let stmt = stmt.replacen("INDEX ", &format!("INDEX {prefix}_"), 1);
                tx.exec(sqlx::AssertSqlSafe(stmt), vec![]).await?;
            }
            tx.commit().await?;
        }
        Db::Postgres(_) => {
            db.exec(
                sqlx::AssertSqlSafe(format!("CREATE TABLE {prefix}_ledger (LIKE ledger INCLUDING ALL)")),
                vec![],
            )
            .await?;
        }
    }
    Ok(())
}

/// The database engine's own cost of writing the settled lines: all of them copied, in posting
/// order, into an empty table of the ledger's shape by one `INSERT ... SELECT` inside the
/// database, in one transaction. No client, driver or protocol is involved, so nothing that
/// writes these rows to this table can be faster; settlement's own figure is compared with it.
async fn engine_floor(db: &Db) -> Result<u64> {
    create_like_ledger(db, "floor").await?;
    let cols = ledger::line_columns().join(", ");
    let mut tx = db.begin().await?;
    let n = tx
        .exec(
            sqlx::AssertSqlSafe(format!("INSERT INTO floor_ledger ({cols}) SELECT {cols} FROM ledger ORDER BY seq")),
            vec![],
        )
        .await?;
    tx.commit().await?;
    Ok(n)
}

/// The database's own write limit for ledger rows: `n` rows like the first posted line (keys
/// varied) into an empty table of the ledger's shape (columns, keys, indexes), by the fastest plain
/// method: multi-row INSERTs in one transaction on SQLite, COPY on PostgreSQL.
async fn raw_insert(db: &Db, n: usize) -> Result<&'static str> {
    let template = template_line(db).await?;
    let cols = ledger::line_columns();
    create_like_ledger(db, "raw").await?;
    match db {
        Db::Sqlite(pool) => {
            // 1,000-row INSERTs prepared once and stepped through rusqlite on a connection of its
            // own, set up as billrun's are: SQLite's own multi-row rate. (Through sqlx, as until
            // session 14, the driver's per-value cost bounded it: settlement, which no longer
            // posts through sqlx, outran that "limit".)
            let path = pool.connect_options().get_filename().to_path_buf();
            tokio::task::block_in_place(|| -> Result<()> {
                let conn = rusqlite::Connection::open(&path)?;
                conn.busy_timeout(std::time::Duration::from_secs(60))?;
                conn.execute_batch(
                    "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA cache_size = -65536; PRAGMA wal_autocheckpoint = 65536",
                )?;
                let per = 1000;
                let row = format!("({})", vec!["?"; cols.len()].join(", "));
                let statement = |rows: usize| {
                    format!(
                        "INSERT INTO raw_ledger ({}) VALUES {}",
                        cols.join(", "),
                        vec![row.as_str(); rows].join(", ")
                    )
                };
                conn.execute_batch("BEGIN IMMEDIATE")?;
                let values = ledger::line_row(&template);
                let money: Vec<Option<String>> = values
                    .iter()
                    .map(|v| match v {
                        Val::Money(d) => d.map(|d| d.to_string()),
                        _ => None,
                    })
                    .collect();
                let mut full = conn.prepare(&statement(per))?;
                let mut k = 0;
                while k < n {
                    let rows = per.min(n - k);
                    let mut short;
                    let stmt = if rows == per {
                        &mut full
                    } else {
                        short = conn.prepare(&statement(rows))?;
                        &mut short
                    };
                    let mut p = 1;
                    for r in k..k + rows {
                        // the template's values, its three varied texts made in place
                        let (id, key, resource) = varied_texts(&template, r);
                        for (c, v) in values.iter().enumerate() {
                            match (c, v) {
                                (0, _) => stmt.raw_bind_parameter(p, &id)?,
                                (3, _) => stmt.raw_bind_parameter(p, &resource)?,
                                (22, _) => stmt.raw_bind_parameter(p, &key)?,
                                (_, Val::Int(i)) => stmt.raw_bind_parameter(p, i)?,
                                (_, Val::Text(t)) => stmt.raw_bind_parameter(p, t)?,
                                (_, Val::Money(_)) => stmt.raw_bind_parameter(p, &money[c])?,
                            }
                            p += 1;
                        }
                    }
                    stmt.raw_execute()?;
                    k += rows;
                }
                drop(full);
                conn.execute_batch("COMMIT")?;
                Ok(())
            })?;
            Ok("multi-row INSERT (1,000 rows a statement, C API)")
        }
        Db::Postgres(pool) => {
            let mut conn = pool.acquire().await?;
            let sql = format!("COPY raw_ledger ({}) FROM STDIN WITH (FORMAT csv)", cols.join(", "));
            let mut copy = conn.copy_in_raw(&sql).await?;
            let mut buf = Vec::with_capacity(8 << 20);
            for k in 0..n {
                let mut w = csv::WriterBuilder::new().has_headers(false).from_writer(&mut buf);
                w.write_record(varied(&template, k).iter().map(val_text))?;
                w.flush()?;
                drop(w);
                if buf.len() > (4 << 20) {
                    copy.send(std::mem::take(&mut buf)).await?;
                }
            }
            if !buf.is_empty() {
                copy.send(buf).await?;
            }
            copy.finish().await?;
            Ok("COPY")
        }
    }
}

fn varied(template: &billrun::billing::model::LedgerLine, k: usize) -> Vec<Val> {
    let mut l = template.clone();
    (l.transaction_id, l.line_key, l.resource_id) = varied_texts(template, k);
    ledger::line_row(&l)
}

/// Row `k`'s transaction id, line key and resource id: the template's with `k` in them.
fn varied_texts(template: &billrun::billing::model::LedgerLine, k: usize) -> (String, String, String) {
    (
        format!("tx_{k:024x}"),
        format!("[\"usage\",\"r{k:08}\",\"instance\",{},\"1\"]", template.hour_start.unwrap_or(0)),
        format!("r{k:08}"),
    )
}

fn val_text(v: &Val) -> String {
    match v {
        Val::Int(Some(i)) => i.to_string(),
        Val::Text(Some(s)) => s.clone(),
        Val::Money(Some(d)) => d.to_string(),
        _ => String::new(),
    }
}

/// N pay-per-use resources over `accounts` accounts, all created at H0 (quantities 1-3, two
/// instance prices).
fn write_ppu_world(path: &Path, n: usize, accounts: usize) -> Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    write!(f, r#"{{"accounts": ["#)?;
    for a in 0..accounts {
        let sep = if a == 0 { "" } else { "," };
        write!(f, r#"{sep}{{"id": "acct{a:06}", "balance": "{}.00"}}"#, 500 + a % 1000)?;
    }
    write!(
        f,
        r#"], "plans": [{{"id": "vm-small", "product": "KooPhone", "hourly": {{"instance": "0.36"}}}}, {{"id": "vm-large", "product": "KooPhone", "hourly": {{"instance": "1.08"}}}}], "resources": ["#
    )?;
    let created = iso(H0);
    for r in 0..n {
        let sep = if r == 0 { "" } else { "," };
        let plan = if r % 4 == 0 { "vm-large" } else { "vm-small" };
        write!(
            f,
            r#"{sep}{{"id": "res{r:07}", "account": "acct{:06}", "plan": "{plan}", "mode": "pay_per_use", "quantity": {}, "created_at": "{created}"}}"#,
            r % accounts,
            1 + r % 3
        )?;
    }
    write!(f, "]}}")?;
    f.flush()?;
    Ok(())
}

/// N monthly subscriptions over `accounts` accounts, purchased over the 35 days before the
/// measured day, half with auto-renewal: the day brings renewal attempts, alerts and expiries.
fn write_subscription_world(path: &Path, n: usize, accounts: usize) -> Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    write!(f, r#"{{"accounts": ["#)?;
    for a in 0..accounts {
        let sep = if a == 0 { "" } else { "," };
        write!(f, r#"{sep}{{"id": "acct{a:06}", "balance": "{}.00"}}"#, 500 + (a % 7) * 300)?;
    }
    write!(
        f,
        r#"], "plans": [{{"id": "pro", "product": "KooPhone", "monthly": "9.90"}}], "resources": ["#
    )?;
    let day = H0 + DAY - 10 * HOUR; // 2024-01-11T00:00:00Z
    for r in 0..n {
        let sep = if r == 0 { "" } else { "," };
        let purchased = day - 35 * DAY + ((r as i64 * 7919) % (34 * DAY));
        write!(
            f,
            r#"{sep}{{"id": "sub{r:07}", "account": "acct{:06}", "plan": "pro", "mode": "monthly", "purchased_at": "{}", "auto_renew": {}}}"#,
            r % accounts,
            iso(purchased),
            r % 2 == 0
        )?;
    }
    write!(f, "]}}")?;
    f.flush()?;
    Ok(())
}

/// Where a world lives.
enum Target {
    Sqlite,
    Postgres(String),
}

struct BenchDb {
    url: String,
    pg_name: Option<String>,
}

impl Target {
    fn name(&self) -> &'static str {
        match self {
            Target::Sqlite => "sqlite",
            Target::Postgres(_) => "postgres",
        }
    }

    async fn fresh(&self, dir: &Path, tag: &str) -> Result<BenchDb> {
        match self {
            Target::Sqlite => {
                let path: PathBuf = dir.join(format!("{tag}.db"));
                for ext in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{ext}", path.display()));
                }
                Ok(BenchDb {
                    url: format!("sqlite://{}", path.display()),
                    pg_name: None,
                })
            }
            Target::Postgres(admin) => {
                let name = format!("billrun_bench_{tag}_{}", std::process::id());
                let db = Db::connect(admin).await?;
                db.exec(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name}")), vec![])
                    .await?;
                db.exec(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")), vec![]).await?;
                db.close().await;
                let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(admin);
                Ok(BenchDb {
                    url: format!("{base}/{name}"),
                    pg_name: Some(name),
                })
            }
        }
    }

    async fn drop_db(&self, db: &BenchDb) -> Result<()> {
        if let (Target::Postgres(admin), Some(name)) = (self, &db.pg_name) {
            let admin_db = Db::connect(admin).await?;
            admin_db
                .exec(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")), vec![])
                .await?;
            admin_db.close().await;
        }
        Ok(())
    }
}
