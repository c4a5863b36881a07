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
}

#[derive(Clone, Debug)]
pub struct Config {
    pub database_url: String,
    /// None: whatever the database already bills in (UTC for a new one).
    pub timezone: Option<BillingZone>,
    pub settle: SettleSchedule,
}

impl Config {
    /// Combines the sources; `flag_*` already include the environment (clap reads `BILLRUN_*`).
    pub fn resolve(flag_url: Option<String>, flag_tz: Option<String>, file: Option<&Path>) -> Result<Config> {
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
        Ok(Config {
            database_url: flag_url.or(file.database_url).unwrap_or_else(|| DEFAULT_DATABASE_URL.to_string()),
            timezone,
            settle: SettleSchedule { delay },
        })
    }
}
