//! `billrun demo`: a newcomer's first run on the embedded default. A fresh SQLite database, the
//! demo world, a day of hourly settlement with a top-up in the middle, and the bills CSV.

use crate::app::Billing;
use crate::billing::money::fmt_cents;
use crate::billing::zone::parse_instant;
use crate::config::Config;
use crate::jobs::settle::SettleSchedule;
use crate::store::ledger::ExportFilter;
use anyhow::{Context, Result};
use std::path::Path;

pub const DEMO_FIXTURE: &str = include_str!("../fixtures/demo.json");

pub async fn run(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("--dir {}", dir.display()))?;
    let db_path = dir.join("billrun.db");
    for suffix in ["", "-wal", "-shm"] {
        let p = format!("{}{suffix}", db_path.display());
        if Path::new(&p).exists() {
            std::fs::remove_file(&p).with_context(|| format!("removing the previous demo database {p}"))?;
        }
    }
    let cfg = Config {
        database_url: format!("sqlite://{}", db_path.display()),
        timezone: None,
        settle: SettleSchedule::default(),
    };
    let b = Billing::open(&cfg).await?;
    let s = b.load_json("fixtures/demo.json", DEMO_FIXTURE).await?;
    println!("billrun demo — database {} (time zone {})", db_path.display(), b.zone);
    println!(
        "loaded {} accounts, {} plans, {} resources, {} usage segments\n",
        s.accounts, s.plans, s.resources, s.usage
    );

    let report = |at: i64, out: &crate::store::settle::SettleOutcome| {
        if out.lines.is_empty() {
            return;
        }
        let hours: Vec<String> = out.hours.iter().map(|h| b.fmt(*h)).collect();
        println!(
            "{}  settled hour {}: {} lines, {} due",
            b.fmt(at),
            hours.join(", "),
            out.lines.len(),
            fmt_cents(out.amount_due)
        );
        for l in &out.lines {
            println!(
                "    {:<8} {:<10} {:>5} s  list {:<10} due {:>6}  paid {:>6}  arrears {:>6}  balance {:>8}",
                l.resource_id,
                l.billing_item.as_deref().unwrap_or(""),
                l.usage_seconds.unwrap_or(0),
                crate::billing::money::fmt_amount(l.list_amount),
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
    let noon = parse_instant("2023-04-18T15:00:00Z").map_err(anyhow::Error::msg)?;
    b.tick(noon, report).await?;
    let topup_at = parse_instant("2023-04-18T15:10:00Z").map_err(anyhow::Error::msg)?;
    let after = b.topup("globex", "10.00", topup_at).await?;
    println!(
        "{}  operator top-up of 10.00 to globex: balance {} — arrears cleared\n",
        b.fmt(topup_at),
        fmt_cents(after)
    );
    let end = parse_instant("2023-04-19T00:00:00Z").map_err(anyhow::Error::msg)?;
    let total = b.tick(end, report).await?;

    let status = b.status().await?;
    println!("\nbalances at {}:", b.fmt(end));
    for a in &status.accounts {
        println!(
            "  {:<8} {:>8}{}",
            a.id,
            a.balance,
            a.in_arrears_since
                .as_ref()
                .map(|t| format!("  in arrears since {t}"))
                .unwrap_or_default()
        );
    }
    let csv = dir.join("bills.csv");
    let f = std::fs::File::create(&csv).with_context(|| format!("writing {}", csv.display()))?;
    let n = b.export(&ExportFilter::default(), std::io::BufWriter::new(f)).await?;
    println!(
        "\n{} settle runs after the top-up; {} bill lines in {}",
        total.runs,
        n,
        csv.display()
    );
    println!("try: billrun --database-url sqlite://{} status", db_path.display());
    b.db.close().await;
    Ok(())
}
