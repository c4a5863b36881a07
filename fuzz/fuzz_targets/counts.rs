//! Drawing count records from package cycles: units are conserved (drawn + billed = counted), no
//! cycle gives more than its quota, a record draws only from cycles valid at its instant, and
//! settling the same hour again with the same records posts nothing.
#![no_main]

use billrun::billing::packages::{add_posted, count_drafts, CycleQuota, PostedCount};
use libfuzzer_sys::fuzz_target;
use rust_decimal::Decimal;
use std::collections::HashMap;

const H: i64 = 1_714_644_000;

fuzz_target!(|input: (Vec<(u16, u16)>, Vec<(u8, u16, u16, u16)>, u16)| {
    let (records, packages, price) = input;
    let counts: Vec<(i64, Decimal)> = records.iter().take(20).map(|(t, n)| (H + (*t % 3600) as i64, Decimal::from(*n))).collect();
    let mut cycles: Vec<CycleQuota> = packages
        .iter()
        .take(5)
        .enumerate()
        .map(|(i, (c, from, len, quota))| CycleQuota {
            package_id: format!("pk{i}"),
            serves: "m1".into(),
            item: "email".into(),
            cycle: *c as i64 % 3,
            start: H - 100_000 + *from as i64,
            end: H - 100_000 + *from as i64 + 1 + *len as i64 * 3,
            valid_from: H - 100_000 + *from as i64,
            quota: Decimal::from(*quota),
            used: Decimal::ZERO,
        })
        .collect();
    let price = Decimal::new(price as i64, 4);
    let drafts = count_drafts("m1", "email", H, H + 3600, price, &counts, &mut cycles, &HashMap::new()).unwrap();
    let total: Decimal = counts.iter().map(|c| c.1).sum();
    let moved: Decimal = drafts.iter().map(|d| d.quantity).sum();
    assert_eq!(moved, total, "drawn + billed = counted");
    for c in &cycles {
        assert!(c.used <= c.quota, "a cycle gives at most its quota");
        let valid_units: Decimal = counts.iter().filter(|(t, _)| c.valid_from <= *t && *t < c.end).map(|x| x.1).sum();
        assert!(c.used <= valid_units, "drawn only by records it covers");
    }
    for d in &drafts {
        assert_eq!(d.amount_due + (d.list_amount - d.amount_due), d.list_amount);
        assert!(d.amount_due <= d.list_amount && d.list_amount - d.amount_due < Decimal::new(1, 2));
    }
    // the same records settled again: nothing more
    let mut posted: HashMap<String, PostedCount> = HashMap::new();
    add_posted(&mut posted, &drafts);
    assert!(count_drafts("m1", "email", H, H + 3600, price, &counts, &mut cycles, &posted).unwrap().is_empty());
});
