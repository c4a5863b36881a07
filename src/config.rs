//! Configuration: flags over `BILLRUN_*` environment over the `--config` TOML file over defaults.

use crate::billing::zone::BillingZone;
use crate::delivery::Sinks;
use crate::error::InputError;
use crate::jobs::cron::CronSchedule;
use crate::jobs::settle::Schedule;
use anyhow::{Context, Result};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub const DEFAULT_DATABASE_URL: &str = "sqlite://billrun.db";
pub const DEFAULT_LEASE_SECONDS: i64 = 60;

/// The `--config` file. Every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub database_url: Option<String>,
    pub timezone: Option<String>,
    /// Seconds after an hour ends before it is settled (default 3600).
    pub settlement_delay_seconds: Option<i64>,
    /// How long a claim on a run lasts without renewal (default 60).
    pub lease_seconds: Option<i64>,
    pub webhook_url: Option<String>,
    pub webhook_secret: Option<String>,
    pub notifications_file: Option<PathBuf>,
    /// First delivery retry after this many milliseconds, doubling (default 1000).
    pub webhook_backoff_ms: Option<i64>,
    pub metrics_addr: Option<String>,
    /// Pay-per-use resources per settlement chunk (default 20000): one transaction and one claim,
    /// so replicas share a big hour and memory stays bounded.
    pub chunk_resources: Option<i64>,
    /// Chunks one runner settles at once on PostgreSQL (default 2; SQLite: one at a time).
    pub chunk_workers: Option<i64>,
    /// Parts a settle chunk is computed in on SQLite, each posted while the next is computed
    /// (default 8; 1: compute the whole chunk, then post it).
    pub chunk_parts: Option<i64>,
    /// When the settle job runs: cron with seconds, in the billing time zone (default `0 0 * * * *`).
    pub settle_cron: Option<String>,
    /// When the daily job runs (default `0 3 0 * * *`, 00:03:00 local).
    pub daily_cron: Option<String>,
}

/// What the command line (and with it the environment) set.
#[derive(Clone, Debug, Default)]
pub struct Flags {
    pub database_url: Option<String>,
    pub timezone: Option<String>,
    pub lease_seconds: Option<i64>,
    pub chunk_resources: Option<i64>,
    pub chunk_workers: Option<i64>,
    pub chunk_parts: Option<i64>,
    pub settle_cron: Option<String>,
    pub daily_cron: Option<String>,
    pub webhook_url: Option<String>,
    pub webhook_secret: Option<String>,
    pub notifications_file: Option<PathBuf>,
    pub metrics_addr: Option<String>,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub database_url: String,
    /// None: whatever the database already bills in (UTC for a new one).
    pub timezone: Option<BillingZone>,
    pub settle: Schedule,
    pub lease_seconds: i64,
    pub sinks: Sinks,
    pub metrics_addr: Option<SocketAddr>,
}

impl Config {
    /// The embedded defaults for a database URL (demo, tests).
    pub fn for_url(url: &str) -> Config {
        Config {
            database_url: url.to_string(),
            timezone: None,
            settle: Schedule::default(),
            lease_seconds: DEFAULT_LEASE_SECONDS,
            sinks: Sinks {
                backoff_ms: 1000,
                ..Default::default()
            },
            metrics_addr: None,
        }
    }

    /// Combines the sources.
    pub fn resolve(flags: Flags, file: Option<&Path>) -> Result<Config> {
        let file: FileConfig = match file {
            None => FileConfig::default(),
            Some(p) => {
                let text = std::fs::read_to_string(p).with_context(|| format!("--config {}", p.display()))?;
                toml::from_str(&text).map_err(|e| InputError(format!("--config {}: {e}", p.display())))?
            }
        };
        let timezone = flags
            .timezone
            .or(file.timezone)
            .map(|s| BillingZone::parse(&s).map_err(|e| InputError(format!("--timezone: {e}"))))
            .transpose()?;
        let delay = file.settlement_delay_seconds.unwrap_or(Schedule::default().delay);
        if !(0..=7 * 86400).contains(&delay) {
            return Err(InputError(format!("--config: settlement_delay_seconds {delay} is not between 0 and 604800")).into());
        }
        let lease_seconds = flags.lease_seconds.or(file.lease_seconds).unwrap_or(DEFAULT_LEASE_SECONDS);
        within("--lease-seconds", lease_seconds, 2, 3600)?;
        let chunk_resources = flags.chunk_resources.or(file.chunk_resources);
        if let Some(n) = chunk_resources {
            within("--chunk-resources", n, 1, 10_000_000)?;
        }
        let chunk_workers = flags
            .chunk_workers
            .or(file.chunk_workers)
            .unwrap_or(crate::store::settle::DEFAULT_CHUNK_WORKERS as i64);
        within("--chunk-workers", chunk_workers, 1, 64)?;
        let chunk_parts = flags.chunk_parts.or(file.chunk_parts);
        if let Some(n) = chunk_parts {
            within("--chunk-parts", n, 1, crate::store::settle::MAX_CHUNK_PARTS as i64)?;
        }
        let cron = |flag: &str, value: Option<String>, default: fn() -> CronSchedule| match value {
            None => Ok(default()),
            Some(v) => CronSchedule::parse(&v).map_err(|e| InputError(format!("{flag}: {e}"))),
        };
        let settle_cron = cron(
            "--settle-cron",
            flags.settle_cron.or(file.settle_cron),
            CronSchedule::default_settle,
        )?;
        let daily_cron = cron("--daily-cron", flags.daily_cron.or(file.daily_cron), CronSchedule::default_daily)?;
        let sinks = Sinks {
            webhook_url: flags.webhook_url.or(file.webhook_url),
            webhook_secret: flags.webhook_secret.or(file.webhook_secret),
            file: flags.notifications_file.or(file.notifications_file),
            backoff_ms: file.webhook_backoff_ms.unwrap_or(1000),
        };
        if let Some(url) = &sinks.webhook_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(InputError(format!("--webhook-url: `{url}` is not an http(s) URL")).into());
            }
            if sinks.webhook_secret.as_deref().unwrap_or("").is_empty() {
                return Err(
                    InputError("--webhook-secret: deliveries are signed; set BILLRUN_WEBHOOK_SECRET (or webhook_secret)".into()).into(),
                );
            }
        }
        if !(1..=3_600_000).contains(&sinks.backoff_ms) {
            return Err(InputError(format!(
                "--config: webhook_backoff_ms {} is not between 1 and 3600000",
                sinks.backoff_ms
            ))
            .into());
        }
        let metrics_addr = flags
            .metrics_addr
            .or(file.metrics_addr)
            .map(|s| crate::observe::parse_addr(&s).map_err(InputError))
            .transpose()?;
        Ok(Config {
            database_url: flags
                .database_url
                .or(file.database_url)
                .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_string()),
            timezone,
            settle: Schedule {
                settle_cron,
                daily_cron,
                delay,
                chunk_resources: chunk_resources.map(|n| n as usize),
                chunk_workers: chunk_workers as usize,
                chunk_parts: chunk_parts.map(|n| n as usize),
            },
            lease_seconds,
            sinks,
            metrics_addr,
        })
    }
}

/// Refuses a setting outside `lo..=hi`, naming its flag.
fn within(flag: &str, value: i64, lo: i64, hi: i64) -> Result<(), InputError> {
    if (lo..=hi).contains(&value) {
        Ok(())
    } else {
        Err(InputError(format!("{flag}: {value} is not between {lo} and {hi}")))
    }
}
