//! The hour-splitting rules: any interval in any of the zones split into billing hours conserves
//! its seconds, every piece lies inside its hour, hours start on the local grid and follow each
//! other without gap or overlap.
#![no_main]

use billrun::billing::zone::{split_by_hour, BillingZone};
use libfuzzer_sys::fuzz_target;

const ZONES: &[&str] = &["UTC", "+05:30", "-09:30", "+14:00", "Europe/Berlin", "America/St_Johns", "Australia/Lord_Howe", "Asia/Kathmandu", "America/Santiago"];

fuzz_target!(|input: (u8, u32, u32)| {
    let (z, start, len) = input;
    let zone = BillingZone::parse(ZONES[z as usize % ZONES.len()]).unwrap();
    // 1970 to about 2106, intervals up to about 50 days
    let start = start as i64;
    let end = start + (len % 4_320_000) as i64;
    let pieces = split_by_hour(&zone, start, end);
    let total: i64 = pieces.iter().map(|(_, a, b)| b - a).sum();
    assert_eq!(total, end - start);
    let mut prev_end = None;
    for &(h, a, b) in &pieces {
        let next = zone.next_hour(h);
        assert!(h <= a && a < b && b <= next, "{h} {a} {b} {next}");
        assert_eq!(zone.hour_start(a), h);
        assert!(next > h && next - h <= 3600, "an hour is at most 3600 s");
        if let Some(p) = prev_end {
            assert_eq!(p, h, "hours follow each other");
        }
        prev_end = Some(next);
    }
});
