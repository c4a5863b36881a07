//! The daily job (00:03:00 local): which run is due next (pure), and running it.

use super::cron::CronSchedule;
use crate::billing::zone::BillingZone;
use crate::store::db::{Db, Kind};
use crate::store::subscriptions::DAILY_JOB;
use anyhow::Result;

/// The next daily run after the last one, or the first at or after the earliest resource.
pub fn next_run(zone: &BillingZone, cron: &CronSchedule, last_run: Option<i64>, earliest_resource: Option<i64>) -> Option<i64> {
    match (last_run, earliest_resource) {
        (Some(r), _) => cron.next_after(zone, r),
        (None, Some(e)) => cron.at_or_after(zone, e),
        (None, None) => None,
    }
}

/// The last daily run done and the earliest resource; `$1` is the job.
pub const NEXT_DUE_SQL: &str = concat!(
    "SELECT ",
    crate::store::runs::last_done_run!(),
    ", (SELECT MIN(created_at) FROM resources)"
);

pub async fn next_due(db: &Db, zone: &BillingZone, cron: &CronSchedule) -> Result<Option<i64>> {
    let r = db.rows(NEXT_DUE_SQL, vec![DAILY_JOB.into()], &[Kind::Int, Kind::Int]).await?;
    Ok(next_run(zone, cron, r[0].opt_int(0), r[0].opt_int(1)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::zone::parse_instant;

    #[test]
    fn runs_at_three_past_midnight_local() {
        let z = BillingZone::parse("Asia/Shanghai").unwrap();
        let t = |s| parse_instant(s).unwrap();
        let c = CronSchedule::default_daily();
        assert_eq!(
            next_run(&z, &c, None, Some(t("2023-02-08T15:50:04+08:00"))),
            Some(t("2023-02-09T00:03:00+08:00"))
        );
        assert_eq!(
            next_run(&z, &c, None, Some(t("2023-02-08T00:01:00+08:00"))),
            Some(t("2023-02-08T00:03:00+08:00"))
        );
        assert_eq!(
            next_run(&z, &c, Some(t("2023-02-09T00:03:00+08:00")), None),
            Some(t("2023-02-10T00:03:00+08:00"))
        );
    }
}
