//! Jobs: each run is planned by pure functions of the stored state and an instant, then executed
//! as one transaction keyed by (job, scheduled instant); `tick` and the daemon only loop over them.
pub mod daily;
pub mod settle;

use crate::billing::zone::BillingZone;
use crate::store::db::Backend;
use crate::store::db::Db;
use crate::store::runs::{self, ClaimResult, LeaseKeeper};
use crate::store::settle::SettleOutcome;
use crate::store::subscriptions::{daily_run, DailyOutcome, DAILY_JOB};
use crate::store::world::SETTLE_JOB;
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

/// What one step of a catch-up did.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// A run was done (or found done by another runner) at its scheduled instant.
    Ran(i64, JobRun),
    /// The next run is held by another runner until its lease expires; wait, then look again.
    Held {
        job: String,
        at: i64,
        owner: String,
        lease_until: i64,
    },
    /// Nothing is due.
    Idle,
}

/// Does the earliest run due by `now`, in scheduled-time order across jobs: claims it with a
/// lease of `lease_seconds` (renewed while it works), does it in one transaction, and on failure
/// gives the claim back so that another runner can retry at once.
pub async fn step(db: &Db, zone: &BillingZone, sched: &settle::SettleSchedule, lease_seconds: i64, now: i64) -> Result<Step> {
    let Some((is_settle, at)) = next_due(db, zone, sched).await? else {
        return Ok(Step::Idle);
    };
    if at > now {
        return Ok(Step::Idle);
    }
    let mut settle_run = None;
    if is_settle {
        // settle runs before the next daily run with nothing to settle are recorded together
        let bound = match daily::next_due(db, zone).await? {
            Some(d) => now.min(d - 1),
            None => now,
        };
        let n = settle::run_empty_span(db, zone, sched, bound).await?;
        if n > 0 {
            return Ok(Step::Ran(
                at,
                JobRun::Settle(SettleOutcome {
                    runs: n,
                    ..Default::default()
                }),
            ));
        }
        settle_run = settle::plan_next(db, zone, sched, now).await?;
        if settle_run.is_none() {
            return Ok(Step::Idle);
        }
    }
    let job = if is_settle { SETTLE_JOB } else { DAILY_JOB };
    let claim = match runs::claim(db, job, at, lease_seconds).await? {
        ClaimResult::Claimed(c) => c,
        ClaimResult::Done => {
            let skipped = if is_settle {
                JobRun::Settle(SettleOutcome {
                    skipped: true,
                    ..Default::default()
                })
            } else {
                JobRun::Daily(DailyOutcome {
                    skipped: true,
                    ..Default::default()
                })
            };
            return Ok(Step::Ran(at, skipped));
        }
        ClaimResult::Held { owner, lease_until } => {
            return Ok(Step::Held {
                job: job.to_string(),
                at,
                owner,
                lease_until,
            })
        }
    };
    let keeper = (db.backend() == Backend::Postgres).then(|| LeaseKeeper::start(db, &claim, lease_seconds));
    let started = std::time::Instant::now();
    let result = match &settle_run {
        Some(run) => crate::store::settle::settle(db, zone, run, Some(&claim)).await.map(JobRun::Settle),
        None => daily_run(db, zone, &claim).await.map(JobRun::Daily),
    };
    drop(keeper);
    let duration = started.elapsed();
    match result {
        Ok(run) => {
            let (lines, amount) = match &run {
                JobRun::Settle(o) => (o.lines.len(), o.amount_due),
                JobRun::Daily(o) => (o.lines.len(), o.lines.iter().map(|l| l.amount_due).sum()),
            };
            crate::metrics::run_finished(job, "ok", duration);
            crate::metrics::posted(job, lines, amount);
            Ok(Step::Ran(at, run))
        }
        Err(e) => {
            crate::metrics::run_finished(job, "failed", duration);
            if let Err(release_error) = runs::release(db, &claim).await {
                tracing::warn!(error = %format!("{release_error:#}"), "could not release the claim of a failed run");
            }
            Err(e.context(format!("{job} run at {}", zone.format(at))))
        }
    }
}
