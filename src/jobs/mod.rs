//! Jobs: each run is planned by pure functions of the stored state and an instant, then executed
//! under a claim keyed by (job, scheduled instant), in one transaction or in parts (chunks) that
//! are each one; `tick` and the daemon only loop over them.
pub mod cron;
pub mod daily;
pub mod settle;

use crate::billing::zone::BillingZone;
use crate::store::db::Db;
use crate::store::runs::{self, ClaimResult};
use crate::store::settle::{Limits, Progress, SettleOutcome};
use crate::store::subscriptions::{daily_parts, daily_run, DailyLimits, DailyOutcome, DailyPlan, DailyProgress, DAILY_JOB};
use crate::store::world::SETTLE_JOB;
use anyhow::{Context, Result};

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

/// Both jobs' next runs, and the settle job's state they come from (read once a step).
struct Due {
    settle_state: settle::SettleState,
    settle: Option<i64>,
    daily: Option<i64>,
}

impl Due {
    async fn read(db: &Db, zone: &BillingZone, sched: &settle::Schedule) -> Result<Due> {
        let settle_state = settle::state(db).await?;
        Ok(Due {
            settle: settle::next_run(zone, sched, &settle_state),
            daily: daily::next_due(db, zone, &sched.daily_cron).await?,
            settle_state,
        })
    }

    /// The earliest run across jobs, in scheduled-time order (settle first on a tie): (is it the
    /// settle job's, when).
    fn first(&self) -> Option<(bool, i64)> {
        match (self.settle, self.daily) {
            (Some(s), Some(d)) if d < s => Some((false, d)),
            (Some(s), _) => Some((true, s)),
            (None, Some(d)) => Some((false, d)),
            (None, None) => None,
        }
    }
}

/// The earliest run due by `now` across jobs, in scheduled-time order (settle first on a tie).
pub async fn next_due(db: &Db, zone: &BillingZone, sched: &settle::Schedule) -> Result<Option<(bool, i64)>> {
    Ok(Due::read(db, zone, sched).await?.first())
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
    /// Shutdown was requested in the middle of a run; what was done is committed.
    Interrupted,
    /// Nothing is due.
    Idle,
}

/// Does the earliest run due by `now`, in scheduled-time order across jobs: claims it with a
/// lease of `lease_seconds` (renewed while it works), or joins it if it is open in parts; does it,
/// and on failure gives the claim back so that another runner can retry at once.
pub async fn step(db: &Db, zone: &BillingZone, sched: &settle::Schedule, lease_seconds: i64, now: i64) -> Result<Step> {
    let due = Due::read(db, zone, sched).await?;
    let Some((is_settle, at)) = due.first() else {
        return Ok(Step::Idle);
    };
    if at > now {
        return Ok(Step::Idle);
    }
    if is_settle {
        return settle_step(db, zone, sched, lease_seconds, now, at, &due).await;
    }
    let limits = DailyLimits {
        workers: sched.chunk_workers,
        lease_seconds,
    };
    let started = std::time::Instant::now();
    let (result, claim) = match runs::claim(db, DAILY_JOB, at, lease_seconds).await? {
        ClaimResult::Claimed(c) => (daily_run(db, zone, &c, limits).await, Some(c)),
        ClaimResult::Open(detail) => {
            let plan: DailyPlan = serde_json::from_str(&detail).with_context(|| format!("the stored plan of {DAILY_JOB}@{at}"))?;
            (daily_parts(db, zone, at, &plan, limits).await, None)
        }
        ClaimResult::Done => {
            return Ok(Step::Ran(
                at,
                JobRun::Daily(DailyOutcome {
                    skipped: true,
                    ..Default::default()
                }),
            ))
        }
        ClaimResult::Held { owner, lease_until } => {
            return Ok(Step::Held {
                job: DAILY_JOB.to_string(),
                at,
                owner,
                lease_until,
            })
        }
    };
    let duration = started.elapsed();
    match result {
        Ok(DailyProgress::Done(o)) => {
            crate::metrics::posted(DAILY_JOB, o.lines, o.amount_due);
            if !o.skipped {
                crate::metrics::run_finished(DAILY_JOB, "ok", duration);
            }
            Ok(Step::Ran(at, JobRun::Daily(o)))
        }
        Ok(DailyProgress::Interrupted) => Ok(Step::Interrupted),
        Ok(DailyProgress::Held { job, owner, lease_until }) => Ok(Step::Held {
            job,
            at,
            owner,
            lease_until,
        }),
        Err(e) => {
            crate::metrics::run_finished(DAILY_JOB, "failed", duration);
            if let Some(claim) = claim {
                // give the run back at once rather than make the others wait out the lease (a
                // run already open in parts gave back its failed part)
                if let Err(release_error) = runs::release(db, &claim).await {
                    tracing::warn!(error = %format!("{release_error:#}"), "could not release the claim of a failed run");
                }
            }
            Err(e.context(format!("{DAILY_JOB} run at {}", zone.format(at))))
        }
    }
}

/// The settle run at `at`: recorded together with the empty runs after it if there is nothing to
/// settle, else planned (or joined) and settled chunk by chunk.
async fn settle_step(
    db: &Db,
    zone: &BillingZone,
    sched: &settle::Schedule,
    lease_seconds: i64,
    now: i64,
    at: i64,
    due: &Due,
) -> Result<Step> {
    // settle runs before the next daily run with nothing to settle are recorded together
    let bound = match due.daily {
        Some(d) => now.min(d - 1),
        None => now,
    };
    let n = settle::run_empty_span(db, zone, sched, &due.settle_state, bound).await?;
    if n > 0 {
        return Ok(Step::Ran(
            at,
            JobRun::Settle(SettleOutcome {
                runs: n,
                ..Default::default()
            }),
        ));
    }
    let Some(run) = settle::plan_next(db, zone, sched, now).await? else {
        return Ok(Step::Idle);
    };
    let limits = Limits {
        chunk_resources: sched.chunk_resources,
        lease_seconds,
        workers: sched.chunk_workers,
        parts: sched.chunk_parts,
    };
    let started = std::time::Instant::now();
    let result = crate::store::settle::run(db, zone, &run, limits).await;
    let duration = started.elapsed();
    match result {
        Ok(Progress::Done(o)) => {
            crate::metrics::posted(SETTLE_JOB, o.lines, o.amount_due);
            if !o.skipped {
                crate::metrics::run_finished(SETTLE_JOB, "ok", duration);
            }
            Ok(Step::Ran(at, JobRun::Settle(o)))
        }
        Ok(Progress::Interrupted(o)) => {
            crate::metrics::posted(SETTLE_JOB, o.lines, o.amount_due);
            Ok(Step::Interrupted)
        }
        Ok(Progress::Held { job, owner, lease_until }) => Ok(Step::Held {
            job,
            at,
            owner,
            lease_until,
        }),
        Err(e) => {
            crate::metrics::run_finished(SETTLE_JOB, "failed", duration);
            Err(e.context(format!("{SETTLE_JOB} run at {}", zone.format(at))))
        }
    }
}
