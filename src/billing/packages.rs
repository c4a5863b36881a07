//! Count-metered usage and prepaid packages (KooMessage), as pure functions: the units of one
//! (resource, item, hour) are drawn from the valid package cycles first, the one expiring first,
//! and what exceeds them is billed at the plan's unit price. Re-settling an hour recomputes its
//! draws against what the other hours have drawn and posts only the difference.

use super::model::TransactionType;
use super::money::{amount_due, fmt_amount, fmt_cents, fmt_plain, mul_div_round, Overflow};
use super::settle::UsageDraft;
use rust_decimal::Decimal;
use serde_json::json;
use std::collections::HashMap;

/// One paid cycle of a package: `quota` units of `item` for use in [valid_from, end), of which
/// `used` have been drawn by posted lines (all hours).
#[derive(Clone, Debug, PartialEq)]
pub struct CycleQuota {
    pub package_id: String,
    pub serves: String,
    pub item: String,
    pub cycle: i64,
    pub start: i64,
    pub end: i64,
    pub valid_from: i64,
    pub quota: Decimal,
    pub used: Decimal,
}

impl CycleQuota {
    fn covers(&self, t: i64) -> bool {
        self.valid_from <= t && t < self.end
    }
}

/// The key of the line billing what exceeds the packages for (resource, item, hour).
pub fn excess_key(resource_id: &str, item: &str, hour_start: i64) -> String {
    json!(["count", resource_id, item, hour_start]).to_string()
}

/// The key of the line drawing units of (resource, item, hour) from one package cycle.
pub fn draw_key(resource_id: &str, item: &str, package_id: &str, cycle: i64, hour_start: i64) -> String {
    json!(["count", resource_id, item, package_id, cycle, hour_start]).to_string()
}

/// Whether a line key is a count line's (excess or draw).
pub fn is_count_key(key: &str) -> bool {
    key.starts_with("[\"count\",")
}

/// The `billing_item` of units drawn from a package: `ITEM@PACKAGE_ID`.
pub fn drawn_item(item: &str, package_id: &str) -> String {
    format!("{item}@{package_id}")
}

/// What is posted for one count line key: the sums of its lines.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PostedCount {
    pub quantity: Decimal,
    pub list_amount: Decimal,
    pub amount_due: Decimal,
    pub lines: i64,
    pub period_start: i64,
    pub period_end: i64,
}

/// The lines that bring one (resource, item, hour) to what its count records say now.
/// `counts` are the billable records of the hour (instant, units); `cycles` the package cycles
/// that cover this resource's item (their `used` is updated for what the drafts draw); `posted`
/// the count lines already posted for the hour, by key.
#[allow(clippy::too_many_arguments)]
pub fn count_drafts(
    resource_id: &str,
    item: &str,
    hour_start: i64,
    hour_end: i64,
    unit_price: Decimal,
    counts: &[(i64, Decimal)],
    cycles: &mut [CycleQuota],
    posted: &HashMap<String, PostedCount>,
) -> Result<Vec<UsageDraft>, Overflow> {
    let mut counts = counts.to_vec();
    counts.sort();
    let total: Decimal = counts.iter().map(|c| c.1).sum();
    // what each cycle can give this hour: its quota less what the other hours drew
    let posted_draw = |c: &CycleQuota| {
        posted
            .get(&draw_key(resource_id, item, &c.package_id, c.cycle, hour_start))
            .map(|p| p.quantity)
            .unwrap_or_default()
    };
    let mut available: Vec<Decimal> = cycles
        .iter()
        .map(|c| (c.quota - (c.used - posted_draw(c))).max(Decimal::ZERO))
        .collect();
    let mut order: Vec<usize> = (0..cycles.len()).collect();
    order.sort_by(|&a, &b| {
        let (x, y) = (&cycles[a], &cycles[b]);
        (x.end, x.start, &x.package_id, x.cycle).cmp(&(y.end, y.start, &y.package_id, y.cycle))
    });
    let mut drawn = vec![Decimal::ZERO; cycles.len()];
    let mut first_draw = vec![i64::MAX; cycles.len()];
    let mut last_draw = vec![i64::MIN; cycles.len()];
    let mut excess = Decimal::ZERO;
    let (mut excess_first, mut excess_last) = (i64::MAX, i64::MIN);
    for &(t, n) in &counts {
        let mut left = n;
        for &i in &order {
            if left <= Decimal::ZERO {
                break;
            }
            if !cycles[i].covers(t) || available[i] <= Decimal::ZERO {
                continue;
            }
            let take = left.min(available[i]);
            available[i] -= take;
            drawn[i] += take;
            first_draw[i] = first_draw[i].min(t);
            last_draw[i] = last_draw[i].max(t);
            left -= take;
        }
        if left > Decimal::ZERO {
            excess += left;
            excess_first = excess_first.min(t);
            excess_last = excess_last.max(t);
        }
    }
    let span = |first: i64, last: i64| {
        if first == i64::MAX {
            (hour_start, hour_end)
        } else {
            (first, last)
        }
    };
    let records: Vec<serde_json::Value> = counts.iter().map(|(t, n)| json!({"at": t, "units": fmt_plain(*n)})).collect();
    let mut out = Vec::new();
    for i in 0..cycles.len() {
        let key = draw_key(resource_id, item, &cycles[i].package_id, cycles[i].cycle, hour_start);
        let before = posted.get(&key);
        let was = before.map(|p| p.quantity).unwrap_or_default();
        if drawn[i] == was {
            continue;
        }
        let c = &cycles[i];
        let (period_start, period_end) = match before {
            Some(p) if drawn[i].is_zero() => (p.period_start, p.period_end),
            _ => span(first_draw[i], last_draw[i]),
        };
        let other_hours = c.used - was;
        let explain = json!({
            "formula": format!(
                "{} of the hour's {} units drawn from package {} (cycle {}: quota {}, {} drawn by other hours){}",
                fmt_plain(drawn[i]), fmt_plain(total), c.package_id, c.cycle, fmt_plain(c.quota), fmt_plain(other_hours),
                if before.is_some() { format!("; {} drawn before, so {}", fmt_plain(was), fmt_plain(drawn[i] - was)) } else { String::new() }
            ),
            "package": c.package_id,
            "cycle": {"number": c.cycle, "start": c.start, "end": c.end, "valid_from": c.valid_from, "quota": fmt_plain(c.quota)},
            "drawn_by_other_hours": fmt_plain(other_hours),
            "records": records,
            "amount_due": "0.00",
        });
        out.push(UsageDraft {
            transaction_type: if before.is_some() {
                TransactionType::Adjustment
            } else {
                TransactionType::Usage
            },
            revision: before.map(|p| p.lines).unwrap_or(0),
            resource_id: resource_id.to_string(),
            item: drawn_item(item, &c.package_id),
            hour_start,
            quantity: drawn[i] - was,
            unit_price: Decimal::ZERO,
            period_start,
            period_end,
            seconds: 0,
            counted: true,
            list_amount: Decimal::ZERO,
            amount_due: Decimal::ZERO,
            explain: explain.to_string(),
            line_key: key,
        });
        cycles[i].used += drawn[i] - was;
    }
    let key = excess_key(resource_id, item, hour_start);
    let before = posted.get(&key);
    let was = before.map(|p| p.quantity).unwrap_or_default();
    if excess != was {
        let list = mul_div_round(&[excess, unit_price], 1)?;
        let due = amount_due(list);
        let drawn_total: Decimal = drawn.iter().sum();
        let priced = format!("{} x {} = {}", fmt_plain(excess), fmt_plain(unit_price), fmt_plain(list));
        let (period_start, period_end) = match before {
            Some(p) if excess.is_zero() => (p.period_start, p.period_end),
            _ => span(excess_first, excess_last),
        };
        let mut explain = json!({
            "formula": format!("{} units - {} drawn from packages = {} billed: {}", fmt_plain(total), fmt_plain(drawn_total), fmt_plain(excess), priced),
            "unit_price": fmt_plain(unit_price),
            "records": records,
            "list_amount": fmt_amount(list),
            "rounding": "list amount rounded half-up to 8 decimal places; amount due truncated toward zero to cents",
            "amount_due": fmt_cents(due),
            "truncated_amount": fmt_amount(list - due),
        });
        let (list_amount, amount, transaction_type, revision) = match before {
            None => (list, due, TransactionType::Usage, 0),
            Some(p) => {
                explain["posted"] = json!({"lines": p.lines, "units": fmt_plain(p.quantity), "list_amount": fmt_amount(p.list_amount), "amount_due": fmt_cents(p.amount_due)});
                explain["due_formula"] = json!(format!(
                    "truncated corrected total {} - posted due {} = {}",
                    fmt_cents(due),
                    fmt_cents(p.amount_due),
                    fmt_cents(due - p.amount_due)
                ));
                (list - p.list_amount, due - p.amount_due, TransactionType::Adjustment, p.lines)
            }
        };
        out.push(UsageDraft {
            transaction_type,
            revision,
            resource_id: resource_id.to_string(),
            item: item.to_string(),
            hour_start,
            quantity: excess - was,
            unit_price,
            period_start,
            period_end,
            seconds: 0,
            counted: true,
            list_amount,
            amount_due: amount,
            explain: explain.to_string(),
            line_key: key,
        });
    }
    Ok(out)
}

/// Adds drafts, once posted, to what is posted per line key (their sums).
pub fn add_posted(posted: &mut HashMap<String, PostedCount>, drafts: &[UsageDraft]) {
    for d in drafts {
        let p = posted.entry(d.line_key.clone()).or_default();
        p.quantity += d.quantity;
        p.list_amount += d.list_amount;
        p.amount_due += d.amount_due;
        p.lines += 1;
        p.period_start = d.period_start;
        p.period_end = d.period_end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }
    const H: i64 = 1_714_644_000; // 2024-05-02T10:00:00Z

    fn cycle(id: &str, start: i64, end: i64, quota: &str) -> CycleQuota {
        CycleQuota {
            package_id: id.into(),
            serves: "m1".into(),
            item: "email".into(),
            cycle: 0,
            start,
            end,
            valid_from: start,
            quota: d(quota),
            used: Decimal::ZERO,
        }
    }

    /// Settles resource m1's emails for the hour starting at `h`.
    fn settle(
        h: i64,
        price: &str,
        counts: &[(i64, Decimal)],
        cycles: &mut [CycleQuota],
        posted: &HashMap<String, PostedCount>,
    ) -> Vec<UsageDraft> {
        count_drafts("m1", "email", h, h + 3600, d(price), counts, cycles, posted).unwrap()
    }

    #[test]
    fn draws_the_package_then_bills_the_excess() {
        let mut cycles = vec![cycle("pk1", H - 86_400, H + 30 * 86_400, "10000")];
        let out = settle(H, "0.0005", &[(H + 900, d("12000"))], &mut cycles, &HashMap::new());
        assert_eq!(out.len(), 2);
        assert_eq!(
            (out[0].item.as_str(), out[0].quantity, out[0].amount_due),
            ("email@pk1", d("10000"), d("0"))
        );
        assert_eq!(
            (out[1].item.as_str(), out[1].quantity, out[1].list_amount, out[1].amount_due),
            ("email", d("2000"), d("1.0000"), d("1.00"))
        );
        assert_eq!(cycles[0].used, d("10000"));
        // the next hour: the quota is gone, everything billed
        let next = settle(H + 3600, "0.0005", &[(H + 4000, d("300"))], &mut cycles, &HashMap::new());
        assert_eq!(next.len(), 1);
        assert_eq!(
            (next[0].item.as_str(), next[0].quantity, next[0].amount_due),
            ("email", d("300"), d("0.15"))
        );
    }

    #[test]
    fn earlier_expiry_first_and_expired_rest_not_drawn() {
        let late = cycle("pkB", H - 86_400, H + 20 * 86_400, "100");
        let early = cycle("pkA", H - 86_400, H + 3600 + 1800, "100");
        let mut cycles = vec![late, early];
        let out = settle(H, "0.01", &[(H + 10, d("50"))], &mut cycles, &HashMap::new());
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].item.as_str(), out[0].quantity), ("email@pkA", d("50")));
        // after pkA's end its 50 left are not drawn
        let out = settle(H + 3600, "0.01", &[(H + 3600 + 1800, d("120"))], &mut cycles, &HashMap::new());
        let items: Vec<_> = out.iter().map(|l| (l.item.clone(), l.quantity)).collect();
        assert_eq!(items, vec![("email@pkB".to_string(), d("100")), ("email".to_string(), d("20"))]);
    }

    #[test]
    fn a_rerun_with_late_records_posts_only_the_difference() {
        let mut cycles = vec![cycle("pk1", H - 86_400, H + 30 * 86_400, "1000")];
        let mut posted = HashMap::new();
        let first = settle(H, "0.0005", &[(H + 10, d("800"))], &mut cycles, &posted);
        add_posted(&mut posted, &first);
        // the next hour draws 150 more
        let mut other = HashMap::new();
        let h2 = settle(H + 3600, "0.0005", &[(H + 3700, d("150"))], &mut cycles, &other);
        add_posted(&mut other, &h2);
        assert_eq!(cycles[0].used, d("950"));
        // late: 300 more in the first hour; 50 are left in the package, 250 billed
        let again = settle(H, "0.0005", &[(H + 10, d("800")), (H + 20, d("300"))], &mut cycles, &posted);
        let got: Vec<_> = again
            .iter()
            .map(|l| (l.transaction_type, l.item.clone(), l.quantity, l.amount_due))
            .collect();
        assert_eq!(
            got,
            vec![
                (TransactionType::Adjustment, "email@pk1".to_string(), d("50"), d("0")),
                (TransactionType::Usage, "email".to_string(), d("250"), d("0.12")),
            ]
        );
        assert_eq!(cycles[0].used, d("1000"));
        add_posted(&mut posted, &again);
        // the same data again posts nothing
        assert!(settle(H, "0.0005", &[(H + 10, d("800")), (H + 20, d("300"))], &mut cycles, &posted).is_empty());
    }
}
