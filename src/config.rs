//! Configuration: flags over `BILLRUN_*` environment over the `--config` TOML file over defaults.

use crate::billing::zone::BillingZone;
use crate::error::InputError;
use crate::jobs::settle::SettleSchedule;
use anyhow::{Context, Result};
use serde::Deserialize;
use std::path::Path;

pub const DEFAULT_DATABASE_URL: &str = "sqlite://billrun.db";

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
}

#[derive(Clone, Debug)]
pub struct Config {
    pub database_url: String,
    /// None: whatever the database already bills in (UTC for a new one).
    pub timezone: Option<BillingZone>,
    pub settle: SettleSchedule,
    pub lease_seconds: i64,
}

pub const DEFAULT_LEASE_SECONDS: i64 = 60;

impl Config {
    /// Combines the sources; `flag_*` already include the environment (clap reads `BILLRUN_*`).
    pub fn resolve(flag_url: Option<String>, flag_tz: Option<String>, flag_lease: Option<i64>, file: Option<&Path>) -> Result<Config> {
        let file: FileConfig = match file {
            None => FileConfig::default(),
            Some(p) => {
                let text = std::fs::read_to_string(p).with_context(|| format!("--config {}", p.display()))?;
                toml::from_str(&text).map_err(|e| InputError(format!("--config {}: {e}", p.display())))?
            }
        };
        let timezone = flag_tz
            .or(file.timezone)
            .map(|s| BillingZone::parse(&s).map_err(|e| InputError(format!("--timezone: {e}"))))
            .transpose()?;
        let delay = file.settlement_delay_seconds.unwrap_or(SettleSchedule::default().delay);
        if !(0..=7 * 86400).contains(&delay) {
            return Err(InputError(format!("--config: settlement_delay_seconds {delay} is not between 0 and 604800")).into());
        }
        let lease_seconds = flag_lease.or(file.lease_seconds).unwrap_or(DEFAULT_LEASE_SECONDS);
        if !(2..=3600).contains(&lease_seconds) {
            return Err(InputError(format!("--lease-seconds: {lease_seconds} is not between 2 and 3600")).into());
        }
        Ok(Config {
            database_url: flag_url.or(file.database_url).unwrap_or_else(|| DEFAULT_DATABASE_URL.to_string()),
            timezone,
            settle: SettleSchedule { delay },
            lease_seconds,
        })
    }
}
