//! The hourly settle job: which runs are due (pure), and catching up to an instant, oldest first.

use super::cron::CronSchedule;
use crate::billing::zone::BillingZone;
use crate::store::db::{Db, Kind};
use crate::store::settle::SettleRun;
use crate::store::world::SETTLE_JOB;
use anyhow::Result;

/// When the jobs run (cron expressions in the billing time zone), how long after its end an hour
/// is settled, and how settlement is split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// The settle job's runs (default every local full hour).
    pub settle_cron: CronSchedule,
    /// The daily job's runs (default 00:03:00 local).
    pub daily_cron: CronSchedule,
    /// Seconds after an hour ends before it is settled (default 3600: 08:00-09:00 at 10:00).
    pub delay: i64,
    /// About this many pay-per-use resources are settled per chunk (one transaction, one claim;
    /// None: 100,000 on SQLite, 20,000 on PostgreSQL).
    pub chunk_resources: Option<usize>,
    /// Chunks settled at once on PostgreSQL (default 2; SQLite settles one at a time).
    pub chunk_workers: usize,
    /// Parts a chunk is computed in on SQLite, each posted while the next is computed (None: one
    /// for every 2,500 resources of a chunk; 1: the whole chunk is computed, then posted).
    pub chunk_parts: Option<usize>,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule {
            settle_cron: CronSchedule::default_settle(),
            daily_cron: CronSchedule::default_daily(),
            delay: 3600,
            chunk_resources: None,
            chunk_workers: crate::store::settle::DEFAULT_CHUNK_WORKERS,
            chunk_parts: None,
        }
    }
}

/// What the stored state says about the job.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SettleState {
    pub last_run: Option<i64>,
    pub watermark: Option<i64>,
    pub earliest_usage: Option<i64>,
}

/// The next scheduled run, if there is anything to settle at all.
pub fn next_run(zone: &BillingZone, sched: &Schedule, st: &SettleState) -> Option<i64> {
    match (st.last_run, st.earliest_usage) {
        (Some(r), _) => sched.settle_cron.next_after(zone, r),
        (None, Some(e)) => sched
            .settle_cron
            .at_or_after(zone, zone.next_hour(zone.hour_start(e)) + sched.delay),
        (None, None) => None,
    }
}

/// Hours a run at `at` settles in order: from after the watermark (or the earliest usage) through
/// the last hour that ended at least `delay` before `at`.
pub fn hours_due(zone: &BillingZone, sched: &Schedule, st: &SettleState, at: i64) -> Vec<i64> {
    let mut h = match (st.watermark, st.earliest_usage) {
        (Some(w), _) => zone.next_hour(w),
        (None, Some(e)) => zone.hour_start(e),
        (None, None) => return vec![],
    };
    let mut out = Vec::new();
    while zone.next_hour(h) + sched.delay <= at {
        out.push(h);
        h = zone.next_hour(h);
    }
    out
}

/// The settle job's state in one row: the last run done, the watermark and, only while there is
/// no run or no watermark yet, the earliest pay-per-use usage (the first entry of the index on its
/// expression, migration 16; without it every pay-per-use resource was read, several times a
/// tick). `$1` is the job.
pub const STATE_SQL: &str = concat!(
    // materialized: a subquery in FROM is merged into the outer query, which then plans and runs
    // each of its expressions once per reference
    "WITH r AS MATERIALIZED (SELECT ",
    crate::store::runs::last_done_run!(),
    " AS last_run, (SELECT watermark FROM job_state WHERE job = $1) AS watermark) \
     SELECT r.last_run, r.watermark, CASE WHEN r.last_run IS NULL OR r.watermark IS NULL THEN \
     (SELECT MIN(CASE WHEN ppu_from IS NULL THEN created_at ELSE ppu_from END) FROM resources WHERE mode = 'pay_per_use' OR ppu_from IS NOT NULL) END \
     FROM r"
);

/// The job's stored state (see [`STATE_SQL`]; the earliest usage only counts before the first
/// run: [`next_run`], [`hours_due`]).
pub async fn state(db: &Db) -> Result<SettleState> {
    let r = db
        .rows(STATE_SQL, vec![SETTLE_JOB.into()], &[Kind::Int, Kind::Int, Kind::Int])
        .await?;
    let r = &r[0];
    Ok(SettleState {
        last_run: r.opt_int(0),
        watermark: r.opt_int(1),
        earliest_usage: r.opt_int(2),
    })
}

/// The next scheduled settle run with the hours it settles, if it is due by `now`.
pub async fn plan_next(db: &Db, zone: &BillingZone, sched: &Schedule, now: i64) -> Result<Option<SettleRun>> {
    let st = state(db).await?;
    let Some(at) = next_run(zone, sched, &st) else { return Ok(None) };
    if at > now {
        return Ok(None);
    }
    Ok(Some(SettleRun {
        job: SETTLE_JOB.to_string(),
        at,
        hours: hours_due(zone, sched, &st, at),
        scheduled: true,
        dry_run: false,
    }))
}

/// The runs due from the next one through `until`, each with the hours it settles.
pub fn runs_through(zone: &BillingZone, sched: &Schedule, st: &SettleState, until: i64) -> Vec<(i64, Vec<i64>)> {
    let mut st = *st;
    let mut out = Vec::new();
    while let Some(at) = next_run(zone, sched, &st).filter(|at| *at <= until) {
        let hours = hours_due(zone, sched, &st, at);
        if let Some(&last) = hours.last() {
            st.watermark = Some(last);
        }
        st.last_run = Some(at);
        out.push((at, hours));
    }
    out
}

/// Records every run due through `until` at once if none of them has anything to settle (an idle
/// night, an empty year of catch-up). Returns how many runs it recorded (0: not applicable).
///
/// `st` is the state this step read: if another runner has recorded any of these runs since, the
/// whole span is refused (nothing recorded) and the step goes on from the stored state.
pub async fn run_empty_span(db: &Db, zone: &BillingZone, sched: &Schedule, st: &SettleState, until: i64) -> Result<usize> {
    let runs = runs_through(zone, sched, st, until);
    if runs.len() < 2 || runs.iter().any(|(_, h)| h.is_empty()) {
        return Ok(0);
    }
    Ok(if crate::store::settle::record_empty_runs(db, zone, &runs).await? {
        runs.len()
    } else {
        0
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::zone::parse_instant;

    fn at(s: &str) -> i64 {
        parse_instant(s).unwrap()
    }

    #[test]
    fn the_fees_of_eight_to_nine_are_deducted_at_ten() {
        let z = BillingZone::parse("UTC").unwrap();
        let st = SettleState {
            earliest_usage: Some(at("2023-04-18T08:45:30Z")),
            ..Default::default()
        };
        let s = Schedule::default();
        assert_eq!(next_run(&z, &s, &st), Some(at("2023-04-18T10:00:00Z")));
        assert_eq!(hours_due(&z, &s, &st, at("2023-04-18T10:00:00Z")), vec![at("2023-04-18T08:00:00Z")]);
        let st = SettleState {
            last_run: Some(at("2023-04-18T10:00:00Z")),
            watermark: Some(at("2023-04-18T08:00:00Z")),
            ..st
        };
        assert_eq!(next_run(&z, &s, &st), Some(at("2023-04-18T11:00:00Z")));
        assert_eq!(hours_due(&z, &s, &st, at("2023-04-18T11:00:00Z")), vec![at("2023-04-18T09:00:00Z")]);
    }

    #[test]
    fn half_hour_zone_runs_on_its_own_grid() {
        let z = BillingZone::parse("+05:30").unwrap();
        let st = SettleState {
            earliest_usage: Some(at("2024-01-01T10:10:00Z")),
            ..Default::default()
        };
        assert_eq!(next_run(&z, &Schedule::default(), &st), Some(at("2024-01-01T11:30:00Z")));
    }
}
