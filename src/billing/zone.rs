//! The billing time zone and the local hour grid. Instants are i64 seconds since the Unix epoch (UTC).

use chrono::{DateTime, FixedOffset, LocalResult, NaiveDate, NaiveDateTime, Offset, SecondsFormat, TimeZone, Utc};
use chrono_tz::Tz;
use std::fmt;

pub const HOUR: i64 = 3600;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BillingZone {
    Iana(Tz),
    Fixed(FixedOffset),
}

impl BillingZone {
    /// An IANA name (`Asia/Shanghai`, `UTC`) or a fixed offset (`+08:00`, `-03:30`).
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some(rest) = s.strip_prefix(['+', '-']) {
            let sign = if s.starts_with('-') { -1 } else { 1 };
            let (h, m) = rest
                .split_once(':')
                .ok_or_else(|| format!("time zone `{s}`: a fixed offset is written +HH:MM"))?;
            let (h, m): (i32, i32) = match (h.parse(), m.parse()) {
                (Ok(h), Ok(m)) if (0..=18).contains(&h) && (0..60).contains(&m) => (h, m),
                _ => return Err(format!("time zone `{s}`: a fixed offset is written +HH:MM, at most 18 hours")),
            };
            let off = FixedOffset::east_opt(sign * (h * 3600 + m * 60)).ok_or_else(|| format!("time zone `{s}`: offset out of range"))?;
            return Ok(BillingZone::Fixed(off));
        }
        s.parse::<Tz>()
            .map(BillingZone::Iana)
            .map_err(|_| format!("time zone `{s}`: not an IANA zone name (like Asia/Shanghai) or a fixed offset (like +08:00)"))
    }

    /// Offset from UTC in seconds at instant `t`.
    pub fn offset_at(&self, t: i64) -> i64 {
        let utc = utc(t);
        match self {
            BillingZone::Iana(tz) => tz.offset_from_utc_datetime(&utc.naive_utc()).fix().local_minus_utc() as i64,
            BillingZone::Fixed(f) => f.local_minus_utc() as i64,
        }
    }

    /// Start of the billing hour that contains `t`: the latest local full hour at or before `t`,
    /// or the latest change of UTC offset after it. Offset changes are hour boundaries, so where a
    /// zone shifts by half an hour (Australia/Lord_Howe) the hour around the shift is cut in two
    /// rather than overlapping its neighbour; for whole-hour shifts this changes nothing.
    pub fn hour_start(&self, t: i64) -> i64 {
        let off = self.offset_at(t);
        let c = t - (t + off).rem_euclid(HOUR);
        if self.offset_at(c) == off {
            c
        } else {
            self.first_offset_change(c, t)
        }
    }

    /// Start of the billing hour after the one starting at (or containing) `h`: the next local full
    /// hour, or the next change of UTC offset before it.
    pub fn next_hour(&self, h: i64) -> i64 {
        let off = self.offset_at(h);
        let n = h + HOUR - (h + off).rem_euclid(HOUR);
        if self.offset_at(n - 1) == off {
            n
        } else {
            self.first_offset_change(h, n - 1)
        }
    }

    /// The first instant in (a, b] whose UTC offset differs from `a`'s; `b`'s must differ.
    pub fn first_offset_change(&self, a: i64, b: i64) -> i64 {
        let off = self.offset_at(a);
        let (mut lo, mut hi) = (a, b);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if self.offset_at(mid) == off {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        hi
    }

    pub fn local_date(&self, t: i64) -> NaiveDate {
        (utc(t).naive_utc() + chrono::Duration::seconds(self.offset_at(t))).date()
    }

    /// The instant of local wall time `local`; in a DST gap, the first instant after it, and in an
    /// overlap, the earlier one.
    pub fn instant_of_local(&self, local: NaiveDateTime) -> i64 {
        match self {
            BillingZone::Fixed(f) => local.and_utc().timestamp() - f.local_minus_utc() as i64,
            BillingZone::Iana(tz) => match tz.from_local_datetime(&local) {
                LocalResult::Single(d) => d.timestamp(),
                LocalResult::Ambiguous(a, _) => a.timestamp(),
                LocalResult::None => {
                    // In a gap the clock reading is taken with the offset in force before the jump,
                    // which lands just as far past the transition as the reading is past the gap's start.
                    let before = tz.offset_from_utc_datetime(&(local - chrono::Duration::days(1))).fix();
                    local.and_utc().timestamp() - before.local_minus_utc() as i64
                }
            },
        }
    }

    /// RFC 3339 in this zone, whole seconds (`Z` for a zero offset).
    pub fn format(&self, t: i64) -> String {
        match self {
            BillingZone::Iana(tz) => utc(t).with_timezone(tz).to_rfc3339_opts(SecondsFormat::Secs, true),
            BillingZone::Fixed(f) => utc(t).with_timezone(f).to_rfc3339_opts(SecondsFormat::Secs, true),
        }
    }

    pub fn name(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for BillingZone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BillingZone::Iana(tz) => write!(f, "{}", tz.name()),
            BillingZone::Fixed(o) => write!(f, "{o}"),
        }
    }
}

pub fn utc(t: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(t, 0).expect("instant within chrono's range")
}

/// Parses an input instant: RFC 3339 with an offset, whole seconds.
pub fn parse_instant(s: &str) -> Result<i64, String> {
    let d = DateTime::parse_from_rfc3339(s.trim()).map_err(|e| {
        if NaiveDateTime::parse_from_str(s.trim(), "%Y-%m-%dT%H:%M:%S").is_ok() {
            format!("`{s}` has no UTC offset; write it as RFC 3339 with `Z` or `+08:00`")
        } else {
            format!("`{s}` is not an RFC 3339 instant ({e})")
        }
    })?;
    if d.timestamp_subsec_nanos() != 0 {
        return Err(format!("`{s}` has fractional seconds; billing instants are whole seconds"));
    }
    let t = d.timestamp();
    // 1970-01-01 .. 2200-01-01: outside it an instant is a typo, not a billing event
    if !(0..7_258_118_400).contains(&t) {
        return Err(format!("`{s}` is outside 1970-01-01..2200-01-01"));
    }
    Ok(t)
}

/// A half-open interval [start, end) cut at the billing hours it crosses: (hour_start, start, end).
pub fn split_by_hour(zone: &BillingZone, start: i64, end: i64) -> Vec<(i64, i64, i64)> {
    let mut out = Vec::new();
    if end <= start {
        return out;
    }
    let mut h = zone.hour_start(start);
    while h < end {
        let next = zone.next_hour(h);
        out.push((h, start.max(h), end.min(next)));
        h = next;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(s: &str) -> i64 {
        parse_instant(s).unwrap()
    }

    #[test]
    fn parses_zones() {
        assert_eq!(BillingZone::parse("UTC").unwrap().name(), "UTC");
        assert_eq!(BillingZone::parse("+05:30").unwrap().offset_at(0), 19800);
        assert_eq!(BillingZone::parse("Asia/Shanghai").unwrap().offset_at(0), 28800);
        assert!(BillingZone::parse("Mars/Olympus").is_err());
        assert!(BillingZone::parse("+25:00").is_err());
    }

    #[test]
    fn instants_need_an_offset() {
        assert!(parse_instant("2023-04-18T09:59:30").unwrap_err().contains("no UTC offset"));
        assert!(parse_instant("2023-04-18T09:59:30.5Z").unwrap_err().contains("fractional"));
        assert_eq!(at("2023-04-18T17:59:30+08:00"), at("2023-04-18T09:59:30Z"));
    }

    #[test]
    fn koophone_example_splits() {
        let z = BillingZone::parse("UTC").unwrap();
        let parts = split_by_hour(&z, at("2023-04-18T09:59:30Z"), at("2023-04-18T10:45:46Z"));
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].2 - parts[0].1, 30);
        assert_eq!(parts[1].2 - parts[1].1, 2746);
        assert_eq!(parts[1].0, at("2023-04-18T10:00:00Z"));
    }

    #[test]
    fn half_hour_zone_grid() {
        let z = BillingZone::parse("+05:30").unwrap();
        assert_eq!(z.hour_start(at("2024-01-01T10:10:00Z")), at("2024-01-01T09:30:00Z"));
        assert_eq!(z.format(at("2024-01-01T09:30:00Z")), "2024-01-01T15:00:00+05:30");
    }

    #[test]
    fn dst_days_have_23_and_25_hours() {
        let z = BillingZone::parse("Europe/Berlin").unwrap();
        let day = |d: &str| {
            let start = z.instant_of_local(NaiveDate::parse_from_str(d, "%Y-%m-%d").unwrap().and_hms_opt(0, 0, 0).unwrap());
            let end = z.instant_of_local(
                NaiveDate::parse_from_str(d, "%Y-%m-%d")
                    .unwrap()
                    .succ_opt()
                    .unwrap()
                    .and_hms_opt(0, 0, 0)
                    .unwrap(),
            );
            split_by_hour(&z, start, end).len()
        };
        assert_eq!(day("2024-03-31"), 23);
        assert_eq!(day("2024-10-27"), 25);
        assert_eq!(day("2024-06-01"), 24);
    }

    /// Found by fuzzing (fuzz/fuzz_targets/hours.rs): Lord Howe Island shifts by half an hour, and
    /// the hour after the shift began before it, inside its neighbour, and 1,800 s went unbilled. The shift is now an
    /// hour boundary: the hour before it is whole, the half hour after it a hour of its own.
    #[test]
    fn half_hour_dst_shifts_cut_the_hour_without_overlap() {
        let z = BillingZone::parse("Australia/Lord_Howe").unwrap();
        let day = |d: &str| {
            let date = NaiveDate::parse_from_str(d, "%Y-%m-%d").unwrap();
            let start = z.instant_of_local(date.and_hms_opt(0, 0, 0).unwrap());
            let end = z.instant_of_local(date.succ_opt().unwrap().and_hms_opt(0, 0, 0).unwrap());
            let parts = split_by_hour(&z, start, end);
            let total: i64 = parts.iter().map(|(_, a, b)| b - a).sum();
            assert_eq!(total, end - start);
            (parts.len(), total, parts.iter().map(|p| p.2 - p.1).collect::<Vec<_>>())
        };
        // spring forward 2024-10-06 02:00 +10:30 -> 02:30 +11:00: a 23.5-hour day
        let (n, total, lens) = day("2024-10-06");
        assert_eq!((n, total), (24, 23 * 3600 + 1800));
        assert_eq!(&lens[..3], &[3600, 3600, 1800]);
        assert_eq!(z.format(at("2024-10-05T15:30:00Z")), "2024-10-06T02:30:00+11:00");
        assert_eq!(z.hour_start(at("2024-10-05T15:45:00Z")), at("2024-10-05T15:30:00Z"));
        assert_eq!(z.next_hour(at("2024-10-05T15:30:00Z")), at("2024-10-05T16:00:00Z"));
        // fall back 2024-04-07 02:00 +11:00 -> 01:30 +10:30: a 24.5-hour day
        let (n, total, lens) = day("2024-04-07");
        assert_eq!((n, total), (25, 24 * 3600 + 1800));
        assert_eq!(&lens[..3], &[3600, 3600, 1800]);
        // the fuzzer's input
        let (start, end) = (655_027_200, 655_027_200 + 4_190_044_268 % 4_320_000);
        let total: i64 = split_by_hour(&z, start, end).iter().map(|(_, a, b)| b - a).sum();
        assert_eq!(total, end - start);
    }

    proptest! {
        #[test]
        fn splitting_conserves_seconds(start in 0i64..4_000_000_000, len in 0i64..400_000, zi in 0usize..5) {
            let zones = ["UTC", "+05:30", "Europe/Berlin", "America/St_Johns", "Australia/Lord_Howe"];
            let z = BillingZone::parse(zones[zi]).unwrap();
            let parts = split_by_hour(&z, start, start + len);
            let total: i64 = parts.iter().map(|(_, a, b)| b - a).sum();
            prop_assert_eq!(total, len);
            for w in parts.windows(2) {
                prop_assert_eq!(w[0].2, w[1].1);
            }
            for (h, a, b) in &parts {
                prop_assert!(*h <= *a && *a < *b && *b - *h <= HOUR);
                prop_assert_eq!(z.hour_start(*a), *h);
            }
        }
    }
}
