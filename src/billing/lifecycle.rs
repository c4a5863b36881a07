//! Subscriptions and resource lifecycles as pure functions of dates and instants: expiry dates
//! without drift, cycle ends, renewal and alert days, expired -> frozen -> released, the frozen and
//! released windows of an account in arrears, and refunds.

use super::model::BillingMode;
use super::money::{mul_div_round, Overflow};
use super::zone::BillingZone;
use chrono::{Datelike, Days, Months, NaiveDate, NaiveTime};
use rust_decimal::Decimal;

/// `anchor` + `months`, clamped to the month's last day, always counted from the anchor so that
/// renewals do not drift (Jan 31 -> Feb 28 -> Mar 31).
pub fn add_months(anchor: NaiveDate, months: u32) -> NaiveDate {
    anchor.checked_add_months(Months::new(months)).expect("date within range")
}

/// Months one period of a mode lasts.
pub fn months_per_period(mode: BillingMode) -> u32 {
    match mode {
        BillingMode::Yearly => 12,
        _ => 1,
    }
}

/// The instant a cycle that "ends at 23:59:59 on `expires_on`" ends: local midnight after it.
pub fn cycle_end(zone: &BillingZone, expires_on: NaiveDate) -> i64 {
    zone.instant_of_local(expires_on.succ_opt().expect("date within range").and_time(NaiveTime::MIN))
}

/// `days` local calendar days after `t`, at the same local clock time.
pub fn add_local_days(zone: &BillingZone, t: i64, days: i64) -> i64 {
    let local = super::zone::utc(t).naive_utc() + chrono::Duration::seconds(zone.offset_at(t));
    let shifted = if days >= 0 {
        local.checked_add_days(Days::new(days as u64))
    } else {
        local.checked_sub_days(Days::new((-days) as u64))
    };
    zone.instant_of_local(shifted.expect("date within range"))
}

/// Days before expiry on which an alert is sent.
pub fn alert_days(mode: BillingMode) -> &'static [i64] {
    match mode {
        BillingMode::Yearly => &[30, 15, 7, 3, 1],
        _ => &[15, 7, 3, 1],
    }
}

/// Whether the daily run on `today` attempts the auto-renewal of a cycle expiring on `expires_on`.
pub fn renewal_due(today: NaiveDate, expires_on: NaiveDate, renew_days_before: i64) -> bool {
    let first = expires_on - chrono::Duration::days(renew_days_before);
    first <= today && today <= expires_on
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum State {
    Running,
    Expired,
    Frozen,
    Released,
    Deleted,
}

impl State {
    pub fn as_str(&self) -> &'static str {
        match self {
            State::Running => "running",
            State::Expired => "expired",
            State::Frozen => "frozen",
            State::Released => "released",
            State::Deleted => "deleted",
        }
    }
}

/// A change of state at an exact instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    pub state: State,
    pub at: i64,
}

/// Expired at the cycle end, frozen `grace` days later, released `retention` days after that.
pub fn expiry_transitions(zone: &BillingZone, expires_on: NaiveDate, grace_days: i64, retention_days: i64) -> [Transition; 3] {
    let end = cycle_end(zone, expires_on);
    let frozen = add_local_days(zone, end, grace_days);
    let released = add_local_days(zone, frozen, retention_days);
    [
        Transition {
            state: State::Expired,
            at: end,
        },
        Transition {
            state: State::Frozen,
            at: frozen,
        },
        Transition {
            state: State::Released,
            at: released,
        },
    ]
}

/// The state at `t` given a list of transitions in time order (running before the first).
pub fn state_at(transitions: &[Transition], t: i64) -> State {
    transitions
        .iter()
        .rfind(|tr| tr.at <= t)
        .map(|tr| tr.state)
        .unwrap_or(State::Running)
}

/// An account's arrears period [began, cleared).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArrearsPeriod {
    pub began: i64,
    pub cleared: Option<i64>,
}

/// What arrears do to a pay-per-use resource: frozen `grace` days after they began, released
/// `retention` days after that, unfrozen when they clear first. Transitions in time order.
pub fn arrears_transitions(zone: &BillingZone, periods: &[ArrearsPeriod], grace_days: i64, retention_days: i64) -> Vec<Transition> {
    let mut out = Vec::new();
    for p in periods {
        let frozen = add_local_days(zone, p.began, grace_days);
        let released = add_local_days(zone, frozen, retention_days);
        match p.cleared {
            Some(c) if c <= frozen => {}
            Some(c) if c < released => {
                out.push(Transition {
                    state: State::Frozen,
                    at: frozen,
                });
                out.push(Transition {
                    state: State::Running,
                    at: c,
                });
            }
            _ => {
                out.push(Transition {
                    state: State::Frozen,
                    at: frozen,
                });
                out.push(Transition {
                    state: State::Released,
                    at: released,
                });
                return out;
            }
        }
    }
    out
}

/// The arrears transitions of one pay-per-use resource that exists over [start, end): those of its
/// account that fall within its life.
pub fn resource_arrears_transitions(
    zone: &BillingZone,
    periods: &[ArrearsPeriod],
    grace_days: i64,
    retention_days: i64,
    start: i64,
    end: i64,
) -> Vec<Transition> {
    arrears_transitions(zone, periods, grace_days, retention_days)
        .into_iter()
        .filter(|t| t.at >= start && t.at < end)
        .collect()
}

/// Windows in which transitions say the resource must not be billed (frozen or released).
pub fn unbillable_windows(transitions: &[Transition]) -> Vec<(i64, Option<i64>)> {
    let mut out = Vec::new();
    let mut open: Option<i64> = None;
    for t in transitions {
        match t.state {
            State::Frozen | State::Released | State::Deleted if open.is_none() => open = Some(t.at),
            State::Running => {
                if let Some(s) = open.take() {
                    out.push((s, Some(t.at)));
                }
            }
            _ => {}
        }
    }
    if let Some(s) = open {
        out.push((s, None));
    }
    out
}

/// A cycle paid for: [start, end), `months` long, `price` paid (list amount).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PaidCycle {
    pub start: i64,
    pub end: i64,
    pub months: u32,
    pub price: Decimal,
}

/// What unsubscribing at `t` refunds: the current cycle's price minus the used fee (daily rate x
/// whole days used; daily rate = price / (30 x months), or / (365 x years) for yearly), plus every
/// paid cycle that has not begun, in full. Returns (refund, end of the refunded cycles).
pub fn refund_at(mode: BillingMode, cycles: &[PaidCycle], t: i64) -> Result<(Decimal, i64), Overflow> {
    let mut refund = Decimal::ZERO;
    let mut until = t;
    for c in cycles {
        if c.end <= t {
            continue;
        }
        until = until.max(c.end);
        if c.start >= t {
            refund += c.price;
            continue;
        }
        let days_used = (t - c.start) / 86_400;
        let rate_days = match mode {
            BillingMode::Yearly => 365 * (c.months as i64 / 12).max(1),
            _ => 30 * c.months as i64,
        };
        let used = mul_div_round(&[c.price, Decimal::from(days_used)], rate_days)?;
        refund += (c.price - used).max(Decimal::ZERO);
    }
    Ok((refund, until))
}

/// Days from `today` to `expires_on`.
pub fn days_until(today: NaiveDate, expires_on: NaiveDate) -> i64 {
    (expires_on - today).num_days()
}

/// The local date of an instant, as the text stored and shown (`YYYY-MM-DD`).
pub fn date_text(d: NaiveDate) -> String {
    format!("{:04}-{:02}-{:02}", d.year(), d.month(), d.day())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::zone::parse_instant;
    use std::str::FromStr;

    fn date(s: &str) -> NaiveDate {
        NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
    }
    fn at(s: &str) -> i64 {
        parse_instant(s).unwrap()
    }

    #[test]
    fn month_ends_clamp_without_drift() {
        let jan31 = date("2023-01-31");
        assert_eq!(add_months(jan31, 1), date("2023-02-28"));
        assert_eq!(add_months(jan31, 2), date("2023-03-31"));
        assert_eq!(add_months(date("2024-01-31"), 1), date("2024-02-29"));
        assert_eq!(add_months(date("2023-02-08"), 1), date("2023-03-08"));
        assert_eq!(add_months(date("2024-02-29"), 12), date("2025-02-28"));
    }

    #[test]
    fn koophone_cycle_ends_at_midnight_after_expiry() {
        let z = BillingZone::parse("UTC").unwrap();
        assert_eq!(cycle_end(&z, date("2023-03-08")), at("2023-03-09T00:00:00Z"));
        let sh = BillingZone::parse("Asia/Shanghai").unwrap();
        assert_eq!(cycle_end(&sh, date("2023-03-08")), at("2023-03-09T00:00:00+08:00"));
    }

    #[test]
    fn renewal_window_is_eight_days() {
        let exp = date("2023-03-08");
        let days: Vec<_> = (0..20)
            .map(|i| date("2023-02-25") + chrono::Duration::days(i))
            .filter(|d| renewal_due(*d, exp, 7))
            .collect();
        assert_eq!(days.first(), Some(&date("2023-03-01")));
        assert_eq!(days.len(), 8);
    }

    #[test]
    fn arrears_freeze_and_release() {
        let z = BillingZone::parse("UTC").unwrap();
        let began = at("2024-01-01T10:00:00Z");
        let t = arrears_transitions(&z, &[ArrearsPeriod { began, cleared: None }], 15, 15);
        assert_eq!(
            t,
            vec![
                Transition {
                    state: State::Frozen,
                    at: at("2024-01-16T10:00:00Z")
                },
                Transition {
                    state: State::Released,
                    at: at("2024-01-31T10:00:00Z")
                }
            ]
        );
        let cleared = at("2024-01-20T00:00:00Z");
        let t = arrears_transitions(
            &z,
            &[ArrearsPeriod {
                began,
                cleared: Some(cleared),
            }],
            15,
            15,
        );
        assert_eq!(unbillable_windows(&t), vec![(at("2024-01-16T10:00:00Z"), Some(cleared))]);
        assert!(arrears_transitions(
            &z,
            &[ArrearsPeriod {
                began,
                cleared: Some(at("2024-01-05T00:00:00Z"))
            }],
            15,
            15
        )
        .is_empty());
    }

    #[test]
    fn twelve_days_of_a_month_cost_twelve_thirtieths() {
        let x = Decimal::from_str("99.00").unwrap();
        let start = at("2023-06-16T00:00:00Z");
        let c = PaidCycle {
            start,
            end: at("2023-07-17T00:00:00Z"),
            months: 1,
            price: x,
        };
        let (refund, until) = refund_at(BillingMode::Monthly, &[c], at("2023-06-28T08:58:30Z")).unwrap();
        assert_eq!(refund, x - x / Decimal::from(30) * Decimal::from(12));
        assert_eq!(until, c.end);
    }
}
