//! Cron expressions for the jobs, evaluated in the billing time zone. The `cron` crate walks local
//! wall-clock time through the zone's rules, so an hourly job fires 23 times on a spring-forward
//! day and 25 on a fall-back day, and a daily one at its local time after a DST change (a
//! scheduler that fixes the zone's UTC offset when a job is created would drift by an hour).

use crate::billing::zone::BillingZone;
use chrono::{DateTime, Utc};
use std::str::FromStr;

/// The settle job: every local full hour.
pub const DEFAULT_SETTLE_CRON: &str = "0 0 * * * *";
/// The daily job: 00:03:00 local.
pub const DEFAULT_DAILY_CRON: &str = "0 3 0 * * *";

/// A parsed cron expression with seconds: `sec min hour day-of-month month day-of-week`.
#[derive(Clone, Debug)]
pub struct CronSchedule {
    expr: String,
    schedule: cron::Schedule,
}

impl PartialEq for CronSchedule {
    fn eq(&self, other: &Self) -> bool {
        self.expr == other.expr
    }
}

impl Eq for CronSchedule {}

impl std::fmt::Display for CronSchedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.expr)
    }
}

impl CronSchedule {
    /// Parses six fields (seconds first, as tokio-cron-scheduler reads them).
    pub fn parse(expr: &str) -> Result<CronSchedule, String> {
        let fields = expr.split_whitespace().count();
        if fields != 6 {
            return Err(format!(
                "`{expr}` has {fields} fields; expected 6: second minute hour day-of-month month day-of-week (e.g. `{DEFAULT_DAILY_CRON}`)"
            ));
        }
        let schedule = cron::Schedule::from_str(expr).map_err(|e| format!("`{expr}`: {e}"))?;
        Ok(CronSchedule {
            expr: expr.split_whitespace().collect::<Vec<_>>().join(" "),
            schedule,
        })
    }

    pub fn default_settle() -> CronSchedule {
        CronSchedule::parse(DEFAULT_SETTLE_CRON).expect("the default settle cron parses")
    }

    pub fn default_daily() -> CronSchedule {
        CronSchedule::parse(DEFAULT_DAILY_CRON).expect("the default daily cron parses")
    }

    /// The first fire time strictly after instant `t` (epoch seconds): the first instant whose
    /// local wall-clock time matches. Between two offset changes local time is the instant plus
    /// the offset, so the next match of that stretch is the cron crate's next match of the local
    /// time, shifted back; a stretch that ends first hands over to the next one. Local times a
    /// spring-forward skips never fire; those a fall-back repeats fire twice (a 25-hour day has
    /// 25 hourly runs).
    pub fn next_after(&self, zone: &BillingZone, t: i64) -> Option<i64> {
        let mut a = t;
        // a stretch per offset change; a few years of them at most for any expression that fires
        for _ in 0..64 {
            let offset = zone.offset_at(a + 1);
            let local = DateTime::<Utc>::from_timestamp(a.checked_add(offset)?, 0)?;
            let n = self.schedule.after(&local).next()?.timestamp();
            let u = n - offset;
            match first_change(zone, offset, a + 1, u) {
                None => return Some(u),
                // local time jumps at x: look again from just before it under the new offset
                Some(x) => a = x - 1,
            }
        }
        None
    }

    /// The first fire time at or after `t`.
    pub fn at_or_after(&self, zone: &BillingZone, t: i64) -> Option<i64> {
        self.next_after(zone, t - 1)
    }
}

/// The first instant in [from, to] whose offset differs from `offset`, if any (scanned a day at a
/// time, then bisected: offset changes are months apart).
fn first_change(zone: &BillingZone, offset: i64, from: i64, to: i64) -> Option<i64> {
    const DAY: i64 = 86_400;
    let mut lo = from;
    while lo <= to {
        let hi = (lo + DAY).min(to);
        if zone.offset_at(hi) != offset {
            // offset(lo) == offset, offset(hi) != offset: the change is in (lo, hi]
            if zone.offset_at(lo) != offset {
                return Some(lo);
            }
            return Some(zone.first_offset_change(lo, hi));
        }
        if hi == to {
            break;
        }
        lo = hi;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::zone::parse_instant;

    fn at(s: &str) -> i64 {
        parse_instant(s).unwrap()
    }

    fn fires(c: &CronSchedule, z: &BillingZone, from: &str, to: &str) -> Vec<i64> {
        let (mut t, end) = (at(from) - 1, at(to));
        let mut out = Vec::new();
        while let Some(n) = c.next_after(z, t).filter(|n| *n < end) {
            out.push(n);
            t = n;
        }
        out
    }

    #[test]
    fn hourly_follows_the_local_day_through_dst() {
        let berlin = BillingZone::parse("Europe/Berlin").unwrap();
        let hourly = CronSchedule::default_settle();
        // 2024-03-31 has 23 local hours in Berlin, 2024-10-27 has 25
        assert_eq!(fires(&hourly, &berlin, "2024-03-30T23:00:00Z", "2024-03-31T22:00:00Z").len(), 23);
        assert_eq!(fires(&hourly, &berlin, "2024-10-26T22:00:00Z", "2024-10-27T23:00:00Z").len(), 25);
    }

    #[test]
    fn daily_at_three_past_midnight_local_before_and_after_dst() {
        let berlin = BillingZone::parse("Europe/Berlin").unwrap();
        let daily = CronSchedule::default_daily();
        assert_eq!(
            daily.next_after(&berlin, at("2024-03-30T12:00:00Z")),
            Some(at("2024-03-31T00:03:00+01:00"))
        );
        assert_eq!(
            daily.next_after(&berlin, at("2024-03-31T12:00:00Z")),
            Some(at("2024-04-01T00:03:00+02:00"))
        );
        let half = BillingZone::parse("+05:30").unwrap();
        assert_eq!(
            CronSchedule::default_settle().next_after(&half, at("2024-01-01T10:10:00Z")),
            Some(at("2024-01-01T10:30:00Z"))
        );
        assert_eq!(
            daily.at_or_after(&half, at("2024-01-01T00:03:00+05:30")),
            Some(at("2024-01-01T00:03:00+05:30"))
        );
    }

    #[test]
    fn bad_expressions_say_why() {
        assert!(CronSchedule::parse("3 0 * * *").unwrap_err().contains("expected 6"));
        assert!(CronSchedule::parse("0 61 * * * *").is_err());
        assert_eq!(CronSchedule::parse("0  0 * * * *").unwrap().to_string(), "0 0 * * * *");
    }
}
