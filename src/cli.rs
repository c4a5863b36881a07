//! Command line (SPEC section 5). Each command calls one library function of `app`.

use crate::app::{cli_instant, Billing};
use crate::clock;
use crate::config::Config;
use crate::store::ledger::ExportFilter;
use crate::store::schema;
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "billrun",
    version,
    about = "Hourly pay-per-use settlement and transaction bills for a cloud provider"
)]
pub struct Cli {
    /// sqlite://PATH (default sqlite://billrun.db, created if missing) or postgres://USER@HOST/DB
    #[arg(long, env = "BILLRUN_DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,
    /// Billing time zone: IANA name (Asia/Shanghai) or fixed offset (+08:00); stored on first use
    #[arg(long, env = "BILLRUN_TIMEZONE", global = true)]
    pub timezone: Option<String>,
    /// TOML file with database_url, timezone, settlement_delay_seconds
    #[arg(long, env = "BILLRUN_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Seconds a claim on a job run lasts without renewal; a dead runner's run is taken over after it
    #[arg(long, env = "BILLRUN_LEASE_SECONDS", global = true)]
    pub lease_seconds: Option<i64>,
    /// Pay-per-use resources settled per chunk (a transaction and a claim replicas share out) [default: 100000 on SQLite, 20000 on PostgreSQL]
    #[arg(long, env = "BILLRUN_CHUNK_RESOURCES", global = true)]
    pub chunk_resources: Option<i64>,
    /// Settle chunks (and daily run parts) one runner does at once on PostgreSQL, each on its own connection [default: 2]
    #[arg(long, env = "BILLRUN_CHUNK_WORKERS", global = true)]
    pub chunk_workers: Option<i64>,
    /// Parts a settle chunk is computed in on SQLite, each posted while the next is computed (1: none) [default: one per 2500 resources of a chunk]
    #[arg(long, env = "BILLRUN_CHUNK_PARTS", global = true)]
    pub chunk_parts: Option<i64>,
    /// When the settle job runs: cron with seconds in the billing time zone [default: 0 0 * * * *]
    #[arg(long, env = "BILLRUN_SETTLE_CRON", global = true)]
    pub settle_cron: Option<String>,
    /// When the daily job runs [default: 0 3 0 * * *]
    #[arg(long, env = "BILLRUN_DAILY_CRON", global = true)]
    pub daily_cron: Option<String>,
    /// Deliver notifications by HTTP POST to this URL (signed with --webhook-secret)
    #[arg(long, env = "BILLRUN_WEBHOOK_URL", global = true)]
    pub webhook_url: Option<String>,
    /// HMAC-SHA256 key for the X-Billrun-Signature header of webhook deliveries
    #[arg(long, env = "BILLRUN_WEBHOOK_SECRET", global = true, hide_env_values = true)]
    pub webhook_secret: Option<String>,
    /// Append delivered notifications to this JSON-lines file
    #[arg(long, env = "BILLRUN_NOTIFICATIONS_FILE", global = true)]
    pub notifications_file: Option<PathBuf>,
    /// Serve /healthz and /metrics (`PORT` binds 127.0.0.1; `HOST:PORT` to choose)
    #[arg(long, env = "BILLRUN_METRICS_ADDR", global = true)]
    pub metrics_addr: Option<String>,
    /// Log format on stderr
    #[arg(long, global = true, value_parser = ["human", "json"], default_value = "human")]
    pub log_format: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// A first run: fresh SQLite database in DIR, loads the demo world, ticks through it, writes DIR/bills.csv
    Demo {
        #[arg(long, default_value = "demo")]
        dir: PathBuf,
    },
    /// Create or upgrade the schema
    Migrate,
    /// Load fixture documents, all or nothing
    Load {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Run every job due up to --now (default: the current time), oldest first, then exit
    Tick {
        #[arg(long)]
        now: Option<String>,
    },
    /// The daemon: catches up, then runs each job when due, until SIGTERM/SIGINT
    Run {
        /// Seconds between checks for due runs
        #[arg(long, default_value_t = 30)]
        poll_seconds: u64,
    },
    /// One-off (re)settlement of the billing hour that starts at --hour
    Settle {
        #[arg(long)]
        hour: String,
        /// Transaction time of what it posts (default: now)
        #[arg(long)]
        at: Option<String>,
        /// Show what would be posted; change nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// Renew a yearly/monthly subscription for N periods (also when expired or frozen)
    Renew {
        resource: String,
        #[arg(long)]
        periods: i64,
        #[arg(long)]
        at: Option<String>,
    },
    /// Unsubscribe: refund what is unused and release the resource
    Unsubscribe {
        resource: String,
        #[arg(long)]
        at: Option<String>,
    },
    /// Change a subscription to pay-per-use, now (with a refund) or at expiry
    ToPpu {
        resource: String,
        #[arg(long, conflicts_with = "at_expiry", required_unless_present = "at_expiry")]
        now: bool,
        #[arg(long)]
        at_expiry: bool,
        #[arg(long)]
        at: Option<String>,
    },
    /// Credit an account
    Topup {
        account: String,
        amount: String,
        #[arg(long)]
        at: Option<String>,
    },
    /// Transaction bills CSV, by transaction_time in [from, to)
    Export {
        #[arg(long)]
        from: Option<String>,
        #[arg(long)]
        to: Option<String>,
        #[arg(long)]
        account: Option<String>,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// How one bill line came to be
    Explain {
        transaction_id: String,
        #[arg(long)]
        json: bool,
    },
    /// The notification outbox
    Notifications {
        #[arg(long)]
        account: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Job watermarks, last runs, accounts in arrears, resources by state
    Status {
        #[arg(long)]
        json: bool,
    },
}

fn at_or_now(flag: &str, v: &Option<String>) -> Result<i64> {
    Ok(match v {
        Some(s) => cli_instant(flag, s)?,
        None => clock::wall_now(),
    })
}

pub async fn run(cli: Cli) -> Result<()> {
    if let Command::Demo { dir } = &cli.command {
        return crate::demo::run(dir).await;
    }
    let flags = crate::config::Flags {
        database_url: cli.database_url.clone(),
        timezone: cli.timezone.clone(),
        lease_seconds: cli.lease_seconds,
        chunk_resources: cli.chunk_resources,
        chunk_workers: cli.chunk_workers,
        chunk_parts: cli.chunk_parts,
        settle_cron: cli.settle_cron.clone(),
        daily_cron: cli.daily_cron.clone(),
        webhook_url: cli.webhook_url.clone(),
        webhook_secret: cli.webhook_secret.clone(),
        notifications_file: cli.notifications_file.clone(),
        metrics_addr: cli.metrics_addr.clone(),
    };
    let cfg = Config::resolve(flags, cli.config.as_deref())?;
    if let Command::Migrate = cli.command {
        let db = crate::store::db::Db::connect(&cfg.database_url).await?;
        let v = schema::migrate(&db).await?;
        schema::billing_zone(&db, cfg.timezone.as_ref()).await?;
        println!("schema at version {v}");
        return Ok(());
    }
    if matches!(cli.command, Command::Tick { .. } | Command::Run { .. }) {
        // before anything else, so a signal during start-up is also a graceful stop
        crate::shutdown::install();
    }
    let b = Billing::open(&cfg).await?;
    match cli.command {
        Command::Demo { .. } | Command::Migrate => unreachable!("handled above"),
        Command::Load { files } => {
            let s = b.load_files(&files).await?;
            println!(
                "loaded {} accounts, {} plans, {} resources, {} packages, {} usage records ({} corrections), {} top-ups; {} settled hours marked for re-settlement",
                s.accounts, s.plans, s.resources - s.packages, s.packages, s.usage, s.corrected_readings, s.topups, s.hours_marked_for_resettlement
            );
        }
        Command::Tick { now } => {
            let now = at_or_now("--now", &now)?;
            let total = b.tick(now, |at, run| crate::daemon::log_run(&b, at, run)).await?;
            if total.interrupted {
                println!("stopped by a signal after a whole run; the next tick goes on from there");
            }
            println!(
                "tick to {}: {} settle runs, {} daily runs, {} lines, {} due; {} renewals, {} failed renewal attempts, {} transitions, {} alerts{}",
                b.fmt(now),
                total.settle_runs,
                total.daily_runs,
                total.lines,
                crate::billing::money::fmt_cents(total.amount_due),
                total.renewals,
                total.renewal_failures,
                total.transitions,
                total.alerts,
                if total.skipped > 0 { format!(", {} runs already done by another runner", total.skipped) } else { String::new() }
            );
        }
        Command::Run { poll_seconds } => crate::daemon::run(&b, poll_seconds, cfg.metrics_addr).await?,
        Command::Settle { hour, at, dry_run } => {
            let hour = cli_instant("--hour", &hour)?;
            let at = at_or_now("--at", &at)?;
            let out = b.settle_hour(hour, at, dry_run).await?;
            let verb = if dry_run { "would post" } else { "posted" };
            if out.skipped {
                println!("settle --hour {} --at {}: already run", b.fmt(hour), b.fmt(at));
            } else if out.lines == 0 {
                println!("hour {}: nothing to post, the ledger already matches the data", b.fmt(hour));
            } else {
                println!(
                    "hour {}: {verb} {} lines, {} due",
                    b.fmt(hour),
                    out.lines,
                    crate::billing::money::fmt_cents(out.amount_due)
                );
                for l in &out.shown {
                    println!(
                        "  {} {} {} {} {} s list {} due {}",
                        l.transaction_id,
                        l.transaction_type.as_str(),
                        l.resource_id,
                        l.billing_item.as_deref().unwrap_or(""),
                        l.usage_seconds.unwrap_or(0),
                        crate::billing::money::fmt_amount(l.list_amount),
                        crate::billing::money::fmt_cents(l.amount_due)
                    );
                }
            }
        }
        Command::Renew { resource, periods, at } => {
            let at = at_or_now("--at", &at)?;
            let l = b.renew(&resource, periods, at).await?;
            println!(
                "{resource}: renewed to {} for {} ({}), balance {}",
                b.fmt(l.period_end),
                crate::billing::money::fmt_cents(l.amount_due),
                l.transaction_id,
                crate::billing::money::fmt_cents(l.balance_after)
            );
        }
        Command::Unsubscribe { resource, at } => {
            let at = at_or_now("--at", &at)?;
            match b.unsubscribe(&resource, at).await? {
                Some(l) => println!(
                    "{resource}: released at {}, refunded {} ({})",
                    b.fmt(at),
                    crate::billing::money::fmt_cents(-l.amount_due),
                    l.transaction_id
                ),
                None => println!("{resource}: released at {}, nothing to refund", b.fmt(at)),
            }
        }
        Command::ToPpu {
            resource,
            now,
            at_expiry: _,
            at,
        } => {
            let at = at_or_now("--at", &at)?;
            let (from, line) = b.to_ppu(&resource, now, at).await?;
            println!(
                "{resource}: billed pay-per-use from {}{}",
                b.fmt(from),
                line.map(|l| format!(
                    ", refunded {} ({})",
                    crate::billing::money::fmt_cents(-l.amount_due),
                    l.transaction_id
                ))
                .unwrap_or_default()
            );
        }
        Command::Topup { account, amount, at } => {
            let at = at_or_now("--at", &at)?;
            let after = b.topup(&account, &amount, at).await?;
            println!("{account}: balance {after} after top-up at {}", b.fmt(at));
        }
        Command::Export { from, to, account, out } => {
            let filter = ExportFilter {
                from: from.map(|s| cli_instant("--from", &s)).transpose()?,
                to: to.map(|s| cli_instant("--to", &s)).transpose()?,
                account,
            };
            let n = match out {
                Some(path) => {
                    // write next to the target and rename, so a failed export never leaves half a file
                    let tmp = path.with_extension("csv.partial");
                    let f = std::fs::File::create(&tmp).with_context(|| format!("--out {}", tmp.display()))?;
                    let n = b.export(&filter, std::io::BufWriter::new(f)).await?;
                    std::fs::rename(&tmp, &path).with_context(|| format!("--out {}", path.display()))?;
                    n
                }
                None => b.export(&filter, std::io::stdout().lock()).await?,
            };
            tracing::info!(rows = n, "exported");
        }
        Command::Explain { transaction_id, json } => {
            let e = b.explain(&transaction_id).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&e.json)?);
            } else {
                print!("{}", e.text);
            }
        }
        Command::Notifications { account, json } => {
            let list = b.notifications(account.as_deref()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for n in &list {
                    println!(
                        "{} {} {} {}",
                        n["at"].as_str().unwrap_or(""),
                        n["kind"].as_str().unwrap_or(""),
                        n["account_id"].as_str().unwrap_or(""),
                        n["delivery"].as_str().unwrap_or("")
                    );
                }
            }
        }
        Command::Status { json } => {
            let s = b.status().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print_status(&s);
            }
        }
    }
    b.db.close().await;
    Ok(())
}

fn print_status(s: &crate::app::Status) {
    println!("as of {} ({})", s.as_of, s.timezone);
    println!("jobs:");
    for j in &s.jobs {
        println!(
            "  {:<12} last run {:<26} outcome {:<8} runs {} failures {}",
            j.job,
            j.last_scheduled_at.as_deref().unwrap_or("never"),
            j.last_outcome.as_deref().unwrap_or("-"),
            j.runs,
            j.failures
        );
    }
    println!(
        "settle: last hour settled {}, next run {}, {} hours awaiting re-settlement",
        s.settle.last_hour_settled.as_deref().unwrap_or("none"),
        s.settle.next_run.as_deref().unwrap_or("none (nothing loaded)"),
        s.settle.hours_awaiting_resettlement
    );
    println!("accounts:");
    for a in &s.accounts {
        println!(
            "  {:<16} balance {:>12}{}",
            a.id,
            a.balance,
            a.in_arrears_since
                .as_ref()
                .map(|t| format!("  in arrears since {t}"))
                .unwrap_or_default()
        );
    }
    println!("resources:");
    for r in &s.resources {
        let expires = r.expires_on.as_deref().map(|e| format!("expires {e}")).unwrap_or_default();
        println!("  {:<16} {:<16} {:<12} {:<9} {}", r.id, r.account_id, r.mode, r.state, expires);
    }
}
