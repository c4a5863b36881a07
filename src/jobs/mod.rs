//! Jobs: each run is planned by pure functions of the stored state and an instant, then executed
//! as one transaction keyed by (job, scheduled instant); `tick` and the daemon only loop over them.
pub mod daily;
pub mod settle;

use crate::billing::zone::BillingZone;
use crate::store::db::Db;
use crate::store::settle::SettleOutcome;
use crate::store::subscriptions::{daily_run, DailyOutcome};
use anyhow::Result;

/// What one run did.
#[derive(Clone, Debug, PartialEq)]
pub enum JobRun {
    Settle(SettleOutcome),
    Daily(DailyOutcome),
}

impl JobRun {
    pub fn skipped(&self) -> bool {
        match self {
            JobRun::Settle(o) => o.skipped,
            JobRun::Daily(o) => o.skipped,
        }
    }
}

/// The earliest run due by `now` across jobs, in scheduled-time order (settle first on a tie).
pub async fn next_due(db: &Db, zone: &BillingZone, sched: &settle::SettleSchedule) -> Result<Option<(bool, i64)>> {
    let s = settle::next_due(db, zone, sched).await?;
    let d = daily::next_due(db, zone).await?;
    Ok(match (s, d) {
        (Some(s), Some(d)) if d < s => Some((false, d)),
        (Some(s), _) => Some((true, s)),
        (None, Some(d)) => Some((false, d)),
        (None, None) => None,
    })
}

/// Runs the earliest due run if it is due by `now`.
pub async fn run_next(db: &Db, zone: &BillingZone, sched: &settle::SettleSchedule, now: i64) -> Result<Option<(i64, JobRun)>> {
    match next_due(db, zone, sched).await? {
        Some((true, at)) if at <= now => {
            let _ = at;
            Ok(settle::run_next(db, zone, sched, now)
                .await?
                .map(|(at, out)| (at, JobRun::Settle(out))))
        }
        Some((false, at)) if at <= now => Ok(Some((at, JobRun::Daily(daily_run(db, zone, at).await?)))),
        _ => Ok(None),
    }
}
