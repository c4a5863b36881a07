//! `billrun demo`: a newcomer's first run on the embedded default. A fresh SQLite database, the
//! demo world, a day of hourly settlement with a top-up in the middle, then eight weeks in one
//! catch-up: renewals, a failing renewal, expiry alerts, expired -> frozen -> released, an
//! account in arrears frozen and released, and a KooMessage account that uses up its prepaid
//! package and pays the excess; then the bills CSV.

use crate::app::Billing;
use crate::billing::money::{fmt_amount, fmt_cents, fmt_plain};
use crate::billing::zone::parse_instant;
use crate::config::Config;
use crate::jobs::JobRun;
use crate::store::ledger::ExportFilter;
use anyhow::{Context, Result};
use std::path::Path;

pub const DEMO_FIXTURE: &str = include_str!("../fixtures/demo.json");

fn at(s: &str) -> Result<i64> {
    parse_instant(s).map_err(anyhow::Error::msg)
}

pub async fn run(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("--dir {}", dir.display()))?;
    let db_path = dir.join("billrun.db");
    for suffix in ["", "-wal", "-shm"] {
        let p = format!("{}{suffix}", db_path.display());
        if Path::new(&p).exists() {
            std::fs::remove_file(&p).with_context(|| format!("removing the previous demo database {p}"))?;
        }
    }
    let cfg = Config::for_url(&format!("sqlite://{}", db_path.display()));
    let b = Billing::open(&cfg).await?;
    let s = b.load_json("fixtures/demo.json", DEMO_FIXTURE).await?;
    println!("billrun demo — database {} (time zone {})", db_path.display(), b.zone);
    println!(
        "loaded {} accounts, {} plans, {} resources and {} prepaid packages ({} subscriptions and packages purchased at load), {} usage records\n",
        s.accounts, s.plans, s.resources - s.packages, s.packages, s.purchases, s.usage
    );

    println!("== 2023-04-18: hourly settlement, each run at its own scheduled instant ==");
    let report = |at: i64, run: &JobRun| {
        let JobRun::Settle(out) = run else { return };
        if out.lines == 0 {
            return;
        }
        let hours: Vec<String> = out.hours.iter().map(|h| b.fmt(*h)).collect();
        println!(
            "{}  settled hour {}: {} lines, {} due",
            b.fmt(at),
            hours.join(", "),
            out.lines,
            fmt_cents(out.amount_due)
        );
        for l in &out.shown {
            // time-metered lines show their seconds, count lines their units
            let used = match l.usage_seconds {
                Some(s) => format!("{s} s"),
                None => format!("{} units", fmt_plain(l.quantity)),
            };
            println!(
                "    {:<8} {:<10} {:>11}  list {:<10} due {:>6}  paid {:>6}  arrears {:>6}  balance {:>8}",
                l.resource_id,
                l.billing_item.as_deref().unwrap_or(""),
                used,
                fmt_amount(l.list_amount),
                fmt_cents(l.amount_due),
                fmt_cents(l.paid_amount),
                fmt_cents(l.arrears_amount),
                fmt_cents(l.balance_after)
            );
        }
        for a in &out.arrears_began {
            println!("    ! account {a} is in arrears from {}", b.fmt(at));
        }
    };
    b.tick(at("2023-04-18T15:00:00Z")?, report).await?;
    let topup_at = at("2023-04-18T15:10:00Z")?;
    let after = b.topup("globex", "10.00", topup_at).await?;
    println!(
        "{}  operator top-up of 10.00 to globex: balance {} — arrears cleared\n",
        b.fmt(topup_at),
        fmt_cents(after)
    );
    let day_end = at("2023-04-19T00:00:00Z")?;
    b.tick(day_end, report).await?;

    let end = at("2023-06-12T00:00:00Z")?;
    println!(
        "\n== catching up to {}: {} more hourly runs and the daily runs at 00:03:00, in order ==",
        b.fmt(end),
        (end - day_end) / 3600
    );
    let total = b.tick(end, |_, _| {}).await?;
    println!(
        "{} settle runs, {} daily runs: {} renewals, {} failed renewal attempts, {} transitions, {} alerts\n",
        total.settle_runs, total.daily_runs, total.renewals, total.renewal_failures, total.transitions, total.alerts
    );
    println!("notification outbox:");
    for n in b.notifications(None).await? {
        let mut extra = String::new();
        if let Some(d) = n["days_before"].as_i64() {
            let unit = if d == 1 { "day" } else { "days" };
            extra = format!(" ({d} {unit} before {})", n["expires_on"].as_str().unwrap_or(""));
        } else if let Some(e) = n["expires_on"].as_str() {
            extra = format!(" (expires on {e})");
        }
        if let Some(r) = n["reason"].as_str() {
            extra.push_str(&format!(": {r}"));
        }
        println!(
            "  {}  {:<20} {:<8} {:<4}{}  [{}]",
            n["at"].as_str().unwrap_or(""),
            n["kind"].as_str().unwrap_or(""),
            n["account_id"].as_str().unwrap_or(""),
            n["resource_id"].as_str().unwrap_or("-"),
            extra,
            n["delivery"].as_str().unwrap_or("")
        );
    }

    let status = b.status().await?;
    println!("\nat {}:", b.fmt(end));
    for a in &status.accounts {
        println!(
            "  account {:<8} balance {:>8}{}",
            a.id,
            a.balance,
            a.in_arrears_since
                .as_ref()
                .map(|t| format!("  in arrears since {t}"))
                .unwrap_or_default()
        );
    }
    for r in &status.resources {
        let expires = r.expires_on.as_deref().map(|e| format!(", expires on {e}")).unwrap_or_default();
        println!("  resource {:<3} {:<8} {:<12} {}{}", r.id, r.account_id, r.mode, r.state, expires);
    }
    let csv = dir.join("bills.csv");
    let f = std::fs::File::create(&csv).with_context(|| format!("writing {}", csv.display()))?;
    let n = b.export(&ExportFilter::default(), std::io::BufWriter::new(f)).await?;
    println!("\n{n} bill lines in {}", csv.display());
    println!("try: cargo run --release -- --database-url sqlite://{} status", db_path.display());
    b.db.close().await;
    Ok(())
}
