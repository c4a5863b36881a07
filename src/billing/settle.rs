//! Settling one billing hour, as pure functions: what the hour's usage lines should be
//! (`desired_usage`), what must be posted so the ledger says that (`reconcile`), and how posted
//! amounts move the balances (`AccountBook::charge`).

use super::model::{Account, LedgerLine, MeteredResource, Plan, TransactionType, UsageSegment};
use super::money::{amount_due, fmt_amount, fmt_cents, fmt_plain, usage_list_amount, Overflow};
use super::zone::BillingZone;
use rust_decimal::Decimal;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};

pub const INSTANCE_ITEM: &str = "instance";

/// A piece of use [from, to) and where it came from (`lifetime` or `segment`).
pub type UsePiece = (i64, i64, &'static str);

/// What a first settlement of the current data would charge for one (resource, item, hour, quantity).
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredUsage {
    pub resource_id: String,
    pub item: String,
    pub hour_start: i64,
    pub quantity: Decimal,
    pub unit_price: Decimal,
    pub seconds: i64,
    pub period_start: i64,
    pub period_end: i64,
    pub list_amount: Decimal,
    /// The pieces of use inside the hour, each with where it came from.
    pub intervals: Vec<UsePiece>,
}

impl DesiredUsage {
    pub fn line_key(&self) -> String {
        usage_key(&self.resource_id, &self.item, self.hour_start, self.quantity)
    }
}

/// The natural key of a metered line; unambiguous whatever the ids contain.
pub fn usage_key(resource_id: &str, item: &str, hour_start: i64, quantity: Decimal) -> String {
    // a tuple serializes as the same compact JSON array as `json!([...])`, without building a
    // tree of values first (one of a big hour's hottest allocations)
    serde_json::to_string(&("usage", resource_id, item, hour_start, fmt_plain(quantity))).expect("a key of strings and an integer")
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn key_digest(line_key: &str, revision: i64) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(line_key.as_bytes());
    hasher.update(b"#");
    hasher.update(revision.to_string().as_bytes());
    hasher.finalize().into()
}

fn push_hex(id: &mut String, bytes: &[u8]) {
    for b in bytes {
        id.push(HEX[usize::from(b >> 4)] as char);
        id.push(HEX[usize::from(b & 15)] as char);
    }
}

/// A transaction id is fixed by the line's key and revision, so a rerun or a resumed run posts the
/// same id for the same line: `tx_` and 24 hex digits of a hash of both. Purchases, renewals,
/// refunds; metered lines use [`metered_transaction_id`].
pub fn transaction_id(line_key: &str, revision: i64) -> String {
    let mut id = String::with_capacity(3 + 24);
    id.push_str("tx_");
    push_hex(&mut id, &key_digest(line_key, revision)[..12]);
    id
}

/// The id of a metered line (usage, a package draw, an excess, and their adjustments): `tx_`, the
/// billing hour as 6 hex digits (hours since 1970), the account's [`chunk_bucket`] as 4 hex
/// digits, then 18 hex digits of the same hash as [`transaction_id`]. The hour is part of every
/// metered line's key and the account is fixed by it (the resource's), so the id is still fixed by
/// (key, revision) and a second posting of a line still collides on the unique id.
///
/// What the prefix buys: the ledger's unique id index and its export-order index (time, id) are
/// written in the order settlement posts. The hour keeps an hour's lines in one region instead of
/// anywhere in the ledger's history (that made every hour of a catch-up slower than the one before);
/// the bucket follows the chunks, which settle accounts in (bucket, account) order, so each chunk
/// appends to its own stretch of the hour instead of touching every page of it (at 1M lines an
/// hour, every chunk rewrote most of both indexes).
pub fn metered_transaction_id(hour_start: i64, bucket: u16, line_key: &str, revision: i64) -> String {
    let hour = (hour_start.div_euclid(3600) & 0xFF_FFFF) as u32;
    let mut id = String::with_capacity(METERED_ID_LEN);
    id.push_str("tx_");
    push_hex(&mut id, &hour.to_be_bytes()[1..]);
    push_hex(&mut id, &bucket.to_be_bytes());
    push_hex(&mut id, &key_digest(line_key, revision)[..9]);
    id
}

/// The length of every [`metered_transaction_id`]. Ids of metered lines posted before migration
/// 10 (hash only, or hour and hash) are 27 characters long, as are [`transaction_id`]'s.
pub const METERED_ID_LEN: usize = 3 + 6 + 4 + 18;

/// The half-open range `[lo, hi)` of the [`metered_transaction_id`]s of billing hour `hour_start`
/// whose bucket is in `lo_bucket..=hi_bucket` (None: from the first, to the last bucket). Every
/// such id lies in it and no id of another hour or of a bucket outside it does, so a chunk reads
/// its lines of an hour through the unique id index instead of an index of its own. Both bounds
/// are lowercase hex after `tx_` like the ids, and `g` sorts after every hex digit.
pub fn metered_id_range(hour_start: i64, lo_bucket: Option<u16>, hi_bucket: Option<u16>) -> (String, String) {
    let hour = (hour_start.div_euclid(3600) & 0xFF_FFFF) as u32;
    let mut prefix = String::with_capacity(METERED_ID_LEN);
    prefix.push_str("tx_");
    push_hex(&mut prefix, &hour.to_be_bytes()[1..]);
    let mut lo = prefix.clone();
    if let Some(b) = lo_bucket {
        push_hex(&mut lo, &b.to_be_bytes());
    }
    let mut hi = prefix;
    match hi_bucket.and_then(|b| b.checked_add(1)) {
        Some(next) => push_hex(&mut hi, &next.to_be_bytes()),
        None => hi.push('g'),
    }
    (lo, hi)
}

/// The chunk bucket of an account: (c1 + 31 c2 + 961 c3 + 29791 c4) mod 65536 over the code points
/// of its last four characters (c1 the last; 0 where the id is shorter). Settlement chunks accounts
/// in (bucket, account id) order and metered ids carry the bucket, so a chunk's lines sort
/// together. The databases compute the same function in SQL (`store::settle::bucket_sql`, pinned
/// against this one on both backends), so it only uses what both can: the last characters, which
/// is where sequential ids and random ids vary. A poor spread (ids ending alike) costs speed only,
/// never correctness: chunks are ranges of (bucket, account id) whatever the buckets are.
pub fn chunk_bucket(account_id: &str) -> u16 {
    let mut tail = account_id.chars().rev().map(u64::from);
    let mut sum = 0u64;
    for weight in [1u64, 31, 961, 29_791] {
        sum += weight * tail.next().unwrap_or(0);
    }
    (sum % 65_536) as u16
}

/// Windows in which a resource must not be billed (frozen or released), half-open, end None = forever.
pub type Unbillable = HashMap<String, Vec<(i64, Option<i64>)>>;

fn subtract_windows(start: i64, end: i64, windows: Option<&Vec<(i64, Option<i64>)>>) -> Vec<(i64, i64)> {
    let mut pieces = vec![(start, end)];
    for &(ws, we) in windows.into_iter().flatten() {
        let we = we.unwrap_or(i64::MAX);
        pieces = pieces
            .into_iter()
            .flat_map(|(a, b)| {
                let mut out = Vec::new();
                if a < ws.min(b) {
                    out.push((a, ws.min(b)));
                }
                if we.max(a) < b {
                    out.push((we.max(a), b));
                }
                out
            })
            .collect();
    }
    pieces
}

/// The usage of hour [hour_start, next hour) from resource lifetimes (`instance` priced plans) and
/// usage segments, one entry per (resource, item, quantity).
pub fn desired_usage<'a>(
    zone: &BillingZone,
    hour_start: i64,
    plans: &HashMap<String, Plan>,
    resources: &'a HashMap<String, MeteredResource>,
    segments: &'a [UsageSegment],
    unbillable: &Unbillable,
) -> Result<Vec<DesiredUsage>, Overflow> {
    let hour_end = zone.next_hour(hour_start);
    // (resource, item, quantity) -> (price, pieces); keys borrowed from the inputs, owned once
    // per line at the end
    let mut acc: BTreeMap<(&str, &str, Decimal), (Decimal, Vec<UsePiece>)> = BTreeMap::new();
    let mut add = |r: &'a MeteredResource, item: &'a str, qty: Decimal, price: Decimal, from: i64, to: i64, source: &'static str| {
        let (a, b) = (from.max(hour_start), to.min(hour_end));
        if a >= b {
            return;
        }
        for (x, y) in subtract_windows(a, b, unbillable.get(&r.id)) {
            acc.entry((r.id.as_str(), item, qty.normalize()))
                .or_insert_with(|| (price, Vec::new()))
                .1
                .push((x, y, source));
        }
    };
    for r in resources.values() {
        let Some(plan) = plans.get(&r.plan_id) else { continue };
        if let Some(price) = plan.hourly.get(INSTANCE_ITEM) {
            add(
                r,
                INSTANCE_ITEM,
                Decimal::from(r.quantity),
                *price,
                r.created_at,
                r.deleted_at.unwrap_or(i64::MAX),
                "lifetime",
            );
        }
    }
    for s in segments {
        let Some(r) = resources.get(&s.resource_id) else { continue };
        let Some(price) = plans.get(&r.plan_id).and_then(|p| p.hourly.get(&s.item)) else {
            continue;
        };
        // use only counts while the resource exists
        add(
            r,
            &s.item,
            s.quantity,
            *price,
            s.from.max(r.created_at),
            s.to.min(r.deleted_at.unwrap_or(i64::MAX)),
            "segment",
        );
    }
    let mut out = Vec::with_capacity(acc.len());
    for ((resource_id, item, quantity), (unit_price, mut intervals)) in acc {
        intervals.sort();
        let seconds: i64 = intervals.iter().map(|(a, b, _)| b - a).sum();
        let list_amount = usage_list_amount(unit_price, quantity, seconds)?;
        out.push(DesiredUsage {
            period_start: intervals.iter().map(|p| p.0).min().unwrap_or(hour_start),
            period_end: intervals.iter().map(|p| p.1).max().unwrap_or(hour_start),
            resource_id: resource_id.to_string(),
            item: item.to_string(),
            hour_start,
            quantity,
            unit_price,
            seconds,
            list_amount,
            intervals,
        });
    }
    Ok(out)
}

/// What is already posted for one line key (usage line plus any adjustments).
#[derive(Clone, Debug, PartialEq)]
pub struct PostedUsage {
    pub resource_id: String,
    pub item: String,
    pub hour_start: i64,
    pub quantity: Decimal,
    pub unit_price: Decimal,
    pub period_start: i64,
    pub period_end: i64,
    pub seconds: i64,
    pub list_amount: Decimal,
    pub amount_due: Decimal,
    pub lines: i64,
}

impl PostedUsage {
    pub fn add(&mut self, line: &PostedUsage) {
        self.seconds += line.seconds;
        self.list_amount += line.list_amount;
        self.amount_due += line.amount_due;
        self.lines += line.lines;
        self.period_start = line.period_start;
        self.period_end = line.period_end;
    }
}

/// A line to post before balances are applied.
#[derive(Clone, Debug, PartialEq)]
pub struct UsageDraft {
    pub transaction_type: TransactionType,
    pub line_key: String,
    pub revision: i64,
    pub resource_id: String,
    pub item: String,
    pub hour_start: i64,
    pub quantity: Decimal,
    pub unit_price: Decimal,
    pub period_start: i64,
    pub period_end: i64,
    pub seconds: i64,
    /// A count line (units, no seconds): its `usage_seconds` is empty.
    pub counted: bool,
    pub list_amount: Decimal,
    pub amount_due: Decimal,
    /// The line's stored explanation (JSON text).
    pub explain: String,
}

fn formula(d: &DesiredUsage) -> String {
    format!(
        "{}/h x {} x {} s / 3600 = {}",
        fmt_plain(d.unit_price),
        fmt_plain(d.quantity),
        d.seconds,
        fmt_plain(d.list_amount)
    )
}

/// What a first usage line stores to explain itself: only its pieces of use. Everything else
/// `usage_explain` shows follows from the line's own fields, so `expand_explain` rebuilds it when
/// asked; the hot path of settlement writes a tenth of the bytes and builds no JSON tree.
fn compact_explain(d: &DesiredUsage) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(24 + 64 * d.intervals.len());
    s.push_str("{\"intervals\":[");
    for (i, (a, b, source)) in d.intervals.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        // sources are this crate's own constants: no escaping needed
        let _ = write!(s, "{sep}{{\"from\":{a},\"to\":{b},\"seconds\":{},\"source\":\"{source}\"}}", b - a);
    }
    s.push_str("]}");
    s
}

/// The full explanation of a line from what it stored: usage lines stored compactly get their
/// formula, prices and rounding back from the line's fields; anything else is returned as stored.
pub fn expand_explain(line: &LedgerLine, stored: serde_json::Value) -> serde_json::Value {
    if line.transaction_type != TransactionType::Usage || stored.get("formula").is_some() {
        return stored;
    }
    let Some(pieces) = stored.get("intervals").and_then(|v| v.as_array()) else {
        return stored;
    };
    let intervals: Vec<UsePiece> = pieces
        .iter()
        .map(|p| {
            let source = match p["source"].as_str() {
                Some("segment") => "segment",
                _ => "lifetime",
            };
            (p["from"].as_i64().unwrap_or(0), p["to"].as_i64().unwrap_or(0), source)
        })
        .collect();
    usage_explain(&DesiredUsage {
        resource_id: line.resource_id.clone(),
        item: line.billing_item.clone().unwrap_or_default(),
        hour_start: line.hour_start.unwrap_or(line.period_start),
        quantity: line.quantity,
        unit_price: line.unit_price,
        seconds: line.usage_seconds.unwrap_or(0),
        period_start: line.period_start,
        period_end: line.period_end,
        list_amount: line.list_amount,
        intervals,
    })
}

fn usage_explain(d: &DesiredUsage) -> serde_json::Value {
    json!({
        "formula": formula(d),
        "hourly_price": fmt_plain(d.unit_price),
        "quantity": fmt_plain(d.quantity),
        "seconds": d.seconds,
        "intervals": d.intervals.iter().map(|(a, b, s)| json!({"from": a, "to": b, "seconds": b - a, "source": s})).collect::<Vec<_>>(),
        "list_amount": fmt_amount(d.list_amount),
        "rounding": "list amount rounded half-up to 8 decimal places; amount due truncated toward zero to cents",
        "amount_due": fmt_cents(amount_due(d.list_amount)),
        "truncated_amount": fmt_amount(d.list_amount - amount_due(d.list_amount)),
    })
}

/// Lines that bring what is posted for an hour to what the current data says: a `usage` line for a
/// key never posted, an `adjustment` for the difference where it changed, nothing where it did not.
pub fn reconcile(desired: &[DesiredUsage], posted: &HashMap<String, PostedUsage>) -> Vec<UsageDraft> {
    // a first settlement drafts a line for each desired one: room for them at once, where growing
    // the list copied it again and again into fresh memory
    let mut out = Vec::with_capacity(desired.len());
    let mut seen = std::collections::HashSet::new();
    for d in desired {
        let key = d.line_key();
        // only a key posted before can be gone from the data (a first settlement has none)
        if !posted.is_empty() {
            seen.insert(key.clone());
        }
        match posted.get(&key) {
            None => out.push(UsageDraft {
                transaction_type: TransactionType::Usage,
                revision: 0,
                resource_id: d.resource_id.clone(),
                item: d.item.clone(),
                hour_start: d.hour_start,
                quantity: d.quantity,
                unit_price: d.unit_price,
                period_start: d.period_start,
                period_end: d.period_end,
                seconds: d.seconds,
                counted: false,
                list_amount: d.list_amount,
                amount_due: amount_due(d.list_amount),
                explain: compact_explain(d),
                line_key: key,
            }),
            Some(p) if p.list_amount != d.list_amount || p.seconds != d.seconds => {
                let due = amount_due(d.list_amount) - p.amount_due;
                out.push(UsageDraft {
                    transaction_type: TransactionType::Adjustment,
                    revision: p.lines,
                    resource_id: d.resource_id.clone(),
                    item: d.item.clone(),
                    hour_start: d.hour_start,
                    quantity: d.quantity,
                    unit_price: d.unit_price,
                    period_start: d.period_start,
                    period_end: d.period_end,
                    seconds: d.seconds - p.seconds,
                    counted: false,
                    list_amount: d.list_amount - p.list_amount,
                    amount_due: due,
                    explain: json!({
                        "formula": format!("corrected {} - posted {} = {}", fmt_plain(d.list_amount), fmt_plain(p.list_amount), fmt_plain(d.list_amount - p.list_amount)),
                        "due_formula": format!("truncated corrected total {} - posted due {} = {}", fmt_cents(amount_due(d.list_amount)), fmt_cents(p.amount_due), fmt_cents(due)),
                        "posted": {"lines": p.lines, "seconds": p.seconds, "list_amount": fmt_amount(p.list_amount), "amount_due": fmt_cents(p.amount_due)},
                        "corrected": usage_explain(d),
                    })
                    .to_string(),
                    line_key: key,
                });
            }
            Some(_) => {}
        }
    }
    // keys posted earlier that the corrected data no longer has: take them back in full
    let mut gone: Vec<(&String, &PostedUsage)> = posted
        .iter()
        .filter(|(k, p)| !seen.contains(*k) && (p.list_amount != Decimal::ZERO || p.seconds != 0 || p.amount_due != Decimal::ZERO))
        .collect();
    gone.sort_by(|a, b| a.0.cmp(b.0));
    for (key, p) in gone {
        out.push(UsageDraft {
            transaction_type: TransactionType::Adjustment,
            line_key: key.clone(),
            revision: p.lines,
            resource_id: p.resource_id.clone(),
            item: p.item.clone(),
            hour_start: p.hour_start,
            quantity: p.quantity,
            unit_price: p.unit_price,
            period_start: p.period_start,
            period_end: p.period_end,
            seconds: -p.seconds,
            counted: false,
            list_amount: -p.list_amount,
            amount_due: -p.amount_due,
            explain: json!({
                "formula": format!("usage no longer in the data: 0 - posted {} = {}", fmt_plain(p.list_amount), fmt_plain(-p.list_amount)),
                "posted": {"lines": p.lines, "seconds": p.seconds, "list_amount": fmt_amount(p.list_amount), "amount_due": fmt_cents(p.amount_due)},
            })
            .to_string(),
        });
    }
    out
}

/// An account's balance while lines are charged to it in order.
#[derive(Clone, Debug, PartialEq)]
pub struct AccountBook {
    pub account: Account,
    pub changed: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArrearsEvent {
    Began { account_id: String, at: i64 },
    Cleared { account_id: String, at: i64 },
}

/// How one posting splits between the balance and arrears.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Charge {
    pub paid: Decimal,
    pub arrears: Decimal,
    pub balance_after: Decimal,
}

impl AccountBook {
    pub fn new(account: Account) -> Self {
        AccountBook { account, changed: false }
    }

    /// Moves the balance by `due` at instant `at`; money back (negative due) is paid in full.
    pub fn charge(&mut self, due: Decimal, at: i64, events: &mut Vec<ArrearsEvent>) -> Charge {
        let balance = self.account.balance;
        let paid = if due <= Decimal::ZERO {
            due
        } else {
            due.min(balance.max(Decimal::ZERO))
        };
        let mut arrears = due - paid;
        arrears.rescale(2);
        let mut balance_after = balance - due;
        balance_after.rescale(2);
        self.apply(balance_after, at, events);
        let mut paid = paid;
        paid.rescale(2);
        Charge {
            paid,
            arrears,
            balance_after,
        }
    }

    /// Sets the balance after a posting at `at` and records arrears beginning or ending.
    pub fn apply(&mut self, balance_after: Decimal, at: i64, events: &mut Vec<ArrearsEvent>) {
        self.account.balance = balance_after;
        self.changed = true;
        match self.account.in_arrears_since {
            None if balance_after < Decimal::ZERO => {
                self.account.in_arrears_since = Some(at);
                events.push(ArrearsEvent::Began {
                    account_id: self.account.id.clone(),
                    at,
                });
            }
            Some(_) if balance_after >= Decimal::ZERO => {
                self.account.in_arrears_since = None;
                events.push(ArrearsEvent::Cleared {
                    account_id: self.account.id.clone(),
                    at,
                });
            }
            _ => {}
        }
    }
}

/// Who a metered resource bills: for the ledger line's descriptive columns.
pub struct LineContext<'a> {
    pub resource: &'a MeteredResource,
    pub plan: &'a Plan,
}

/// Charges drafts to their accounts in a fixed order (hour, account, resource, item, quantity) and
/// turns them into ledger lines with `transaction_time` = `at`.
pub fn post_drafts<'a>(
    mut drafts: Vec<UsageDraft>,
    context: impl Fn(&str) -> Option<(&'a MeteredResource, &'a Plan)>,
    books: &mut HashMap<String, AccountBook>,
    at: i64,
    run_job: &str,
    events: &mut Vec<ArrearsEvent>,
) -> Result<Vec<LedgerLine>, String> {
    let mut keyed: Vec<(String, UsageDraft)> = Vec::with_capacity(drafts.len());
    for d in drafts.drain(..) {
        let account = context(&d.resource_id)
            .map(|(r, _)| r.account_id.clone())
            .ok_or_else(|| format!("resource {} is not loaded", d.resource_id))?;
        keyed.push((account, d));
    }
    keyed.sort_by(|(a1, d1), (a2, d2)| {
        (d1.hour_start, a1, &d1.resource_id, &d1.item, d1.quantity, &d1.line_key).cmp(&(
            d2.hour_start,
            a2,
            &d2.resource_id,
            &d2.item,
            d2.quantity,
            &d2.line_key,
        ))
    });
    let mut lines = Vec::with_capacity(keyed.len());
    for (account_id, d) in keyed {
        let (resource, plan) = context(&d.resource_id).expect("checked above");
        let book = books
            .get_mut(&account_id)
            .ok_or_else(|| format!("account {account_id} is not loaded"))?;
        let charge = book.charge(d.amount_due, at, events);
        lines.push(LedgerLine {
            transaction_id: metered_transaction_id(d.hour_start, chunk_bucket(&account_id), &d.line_key, d.revision),
            transaction_time: at,
            account_id,
            resource_id: resource.id.clone(),
            product: plan.product.clone(),
            plan_id: plan.id.clone(),
            billing_mode: super::model::BillingMode::PayPerUse,
            transaction_type: d.transaction_type,
            billing_item: Some(d.item.clone()),
            period_start: d.period_start,
            period_end: d.period_end,
            usage_seconds: (!d.counted).then_some(d.seconds),
            quantity: d.quantity,
            unit_price: d.unit_price,
            list_amount: d.list_amount,
            truncated_amount: d.list_amount - d.amount_due,
            amount_due: d.amount_due,
            paid_amount: charge.paid,
            arrears_amount: charge.arrears,
            balance_after: charge.balance_after,
            currency: book.account.currency.clone(),
            hour_start: Some(d.hour_start),
            line_key: d.line_key,
            revision: d.revision,
            run_job: run_job.to_string(),
            run_at: at,
            explain: d.explain,
        });
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::zone::parse_instant;
    use proptest::prelude::*;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    /// Ids are stable: the same as the first hex-by-format implementation gave, for every key.
    #[test]
    fn transaction_ids_never_change() {
        for (key, revision) in [("usage|r1|instance|1704880800", 0), ("renewal|s1|2024-03-01", 3), ("ü|口", -1)] {
            let digest = Sha256::digest(format!("{key}#{revision}").as_bytes());
            let hex: String = digest.iter().take(12).map(|b| format!("{b:02x}")).collect();
            assert_eq!(transaction_id(key, revision), format!("tx_{hex}"));
        }
        assert_eq!(transaction_id("k", 0).len(), 27);
    }

    /// Metered ids: the billing hour in hex, the account's bucket, then the first 18 hex digits of
    /// the same hash; pinned.
    #[test]
    fn metered_ids_lead_with_their_hour_and_bucket() {
        let key = usage_key("r1", "instance", 1_704_880_800, d("2"));
        let id = metered_transaction_id(1_704_880_800, 0x1f2e, &key, 0);
        assert_eq!(&id[..9], "tx_0739ea", "hour 473,578 since 1970");
        assert_eq!(&id[9..13], "1f2e");
        assert_eq!(&id[13..], &transaction_id(&key, 0)[3..21]);
        assert_eq!(id.len(), 31);
        // the next hour sorts after it whatever the bucket and hash; so does a higher bucket in
        // the same hour; another revision is another id
        let next = metered_transaction_id(1_704_884_400, 0, &key, 0);
        assert_eq!(&next[..13], "tx_0739eb0000");
        assert!(next > metered_transaction_id(1_704_880_800, 0xffff, &key, 0));
        assert!(metered_transaction_id(1_704_880_800, 0x1f2f, &key, 0) > id);
        assert_ne!(metered_transaction_id(1_704_880_800, 0x1f2e, &key, 1), id);
        // a half-hour zone's hours still lead with the hour they start in
        assert_eq!(&metered_transaction_id(1_704_880_800 + 1800, 0, &key, 0)[..9], "tx_0739ea");
    }

    /// A chunk's id range holds every metered id of its hour and buckets, and none of the hour
    /// before or after or of a bucket outside. (Older ids, 27 characters, may fall in it: the
    /// chunk read tells them apart by their length.)
    #[test]
    fn metered_id_ranges_hold_exactly_their_hour_and_buckets() {
        let hour = 1_704_880_800;
        let in_range = |id: &str, (lo, hi): &(String, String)| id >= lo.as_str() && id < hi.as_str();
        for (lo_b, hi_b) in [
            (None, None),
            (Some(0), Some(0)),
            (Some(0x00ff), Some(0x0100)),
            (Some(0x0fff), None),
            (None, Some(0xffff)),
            (Some(0x1f2e), Some(0xfffe)),
        ] {
            let range = metered_id_range(hour, lo_b, hi_b);
            let (lo, hi) = (lo_b.unwrap_or(0), hi_b.unwrap_or(0xffff));
            for bucket in [
                0u16, 1, 0x00fe, 0x00ff, 0x0100, 0x0101, 0x0ffe, 0x0fff, 0x1000, 0x1f2d, 0x1f2e, 0x1f2f, 0xfffe, 0xffff,
            ] {
                for n in 0..40 {
                    let key = usage_key(&format!("r{n}"), "instance", hour, d("1"));
                    let expected = (lo..=hi).contains(&bucket);
                    let id = metered_transaction_id(hour, bucket, &key, n % 3);
                    assert_eq!(in_range(&id, &range), expected, "{id} in {range:?}");
                    for other in [hour - 3600, hour + 3600, hour + 1800 + 3600] {
                        assert!(
                            !in_range(&metered_transaction_id(other, bucket, &key, 0), &range),
                            "hour {other}: {range:?}"
                        );
                    }
                    // a half-hour zone's hour is in the range of the hour it starts in
                    assert_eq!(in_range(&metered_transaction_id(hour + 1800, bucket, &key, 0), &range), expected);
                }
            }
        }
    }

    #[test]
    fn chunk_buckets_are_pinned() {
        // (c1 + 31 c2 + 961 c3 + 29791 c4) mod 65536 over the last four code points
        assert_eq!(chunk_bucket(""), 0);
        assert_eq!(chunk_bucket("a"), 97);
        assert_eq!(chunk_bucket("ab"), 98 + 31 * 97);
        assert_eq!(
            chunk_bucket("acct000123"),
            ((51 + 31 * 50 + 961 * 49 + 29_791 * 48) % 65_536) as u16
        );
        assert_eq!(chunk_bucket("xacct000123"), chunk_bucket("acct000123"), "only the last four count");
        // code points, not bytes: U+1F600 is one character
        assert_eq!(chunk_bucket("\u{1F600}"), (0x1F600 % 65_536) as u16);
        assert_eq!(
            chunk_bucket("\u{10FFFF}\u{10FFFF}\u{10FFFF}\u{10FFFF}"),
            ((0x10FFFFu64 * (1 + 31 + 961 + 29_791)) % 65_536) as u16
        );
        // sequential ids spread: 1,000 consecutive accounts land in 1,000 buckets
        let buckets: std::collections::HashSet<u16> = (0..1000).map(|n| chunk_bucket(&format!("acct{n:06}"))).collect();
        assert_eq!(buckets.len(), 1000);
    }

    fn at(s: &str) -> i64 {
        parse_instant(s).unwrap()
    }
    fn phone_plan() -> HashMap<String, Plan> {
        let mut hourly = BTreeMap::new();
        hourly.insert("instance".to_string(), d("0.36"));
        HashMap::from([(
            "p".to_string(),
            Plan {
                id: "p".into(),
                product: "KooPhone".into(),
                hourly,
                per_unit: BTreeMap::new(),
                monthly: None,
                yearly: None,
                packages: BTreeMap::new(),
                parts: BTreeMap::new(),
            },
        )])
    }
    fn res(created: i64, deleted: Option<i64>) -> HashMap<String, MeteredResource> {
        HashMap::from([(
            "r".to_string(),
            MeteredResource {
                id: "r".into(),
                account_id: "a".into(),
                plan_id: "p".into(),
                quantity: 1,
                created_at: created,
                deleted_at: deleted,
            },
        )])
    }

    #[test]
    fn lifetime_split_over_two_hours() {
        let z = BillingZone::parse("UTC").unwrap();
        let r = res(at("2023-04-18T09:59:30Z"), Some(at("2023-04-18T10:45:46Z")));
        let h9 = desired_usage(&z, at("2023-04-18T09:00:00Z"), &phone_plan(), &r, &[], &Unbillable::new()).unwrap();
        assert_eq!(h9.len(), 1);
        assert_eq!((h9[0].seconds, h9[0].list_amount), (30, d("0.003")));
        let h10 = desired_usage(&z, at("2023-04-18T10:00:00Z"), &phone_plan(), &r, &[], &Unbillable::new()).unwrap();
        assert_eq!(
            (h10[0].seconds, h10[0].period_start, h10[0].period_end),
            (2746, at("2023-04-18T10:00:00Z"), at("2023-04-18T10:45:46Z"))
        );
    }

    #[test]
    fn frozen_window_is_not_billed() {
        let z = BillingZone::parse("UTC").unwrap();
        let r = res(at("2023-04-18T00:00:00Z"), None);
        let unbillable = Unbillable::from([(
            "r".to_string(),
            vec![(at("2023-04-18T10:15:00Z"), Some(at("2023-04-18T10:45:00Z")))],
        )]);
        let h = desired_usage(&z, at("2023-04-18T10:00:00Z"), &phone_plan(), &r, &[], &unbillable).unwrap();
        assert_eq!(h[0].seconds, 1800);
    }

    #[test]
    fn reconcile_posts_only_the_difference() {
        let z = BillingZone::parse("UTC").unwrap();
        let hour = at("2023-04-18T10:00:00Z");
        let first = desired_usage(
            &z,
            hour,
            &phone_plan(),
            &res(at("2023-04-18T10:00:00Z"), Some(at("2023-04-18T10:39:45Z"))),
            &[],
            &Unbillable::new(),
        )
        .unwrap();
        let drafts = reconcile(&first, &HashMap::new());
        assert_eq!(drafts.len(), 1);
        let posted = HashMap::from([(
            drafts[0].line_key.clone(),
            PostedUsage {
                resource_id: "r".into(),
                item: "instance".into(),
                hour_start: hour,
                quantity: d("1"),
                unit_price: d("0.36"),
                period_start: hour,
                period_end: hour,
                seconds: drafts[0].seconds,
                list_amount: drafts[0].list_amount,
                amount_due: drafts[0].amount_due,
                lines: 1,
            },
        )]);
        assert!(reconcile(&first, &posted).is_empty(), "unchanged data posts nothing");
        let corrected = desired_usage(
            &z,
            hour,
            &phone_plan(),
            &res(hour, Some(at("2023-04-18T10:59:59Z"))),
            &[],
            &Unbillable::new(),
        )
        .unwrap();
        let adj = reconcile(&corrected, &posted);
        assert_eq!(adj.len(), 1);
        assert_eq!(adj[0].transaction_type, TransactionType::Adjustment);
        // 2385 s -> 0.2385 (due 0.23); 3599 s -> 0.3599 (due 0.35): the adjustment is 0.1214, due 0.12
        assert_eq!(
            (adj[0].list_amount, adj[0].amount_due, adj[0].revision),
            (d("0.1214"), d("0.12"), 1)
        );
        assert_ne!(transaction_id(&adj[0].line_key, 1), transaction_id(&adj[0].line_key, 0));
    }

    #[test]
    fn charging_splits_paid_and_arrears() {
        let mut book = AccountBook::new(Account {
            id: "a".into(),
            currency: "USD".into(),
            balance: d("0.50"),
            in_arrears_since: None,
            grace_days: 15,
            retention_days: 15,
        });
        let mut ev = Vec::new();
        let c = book.charge(d("0.95"), 100, &mut ev);
        assert_eq!((c.paid, c.arrears, c.balance_after), (d("0.50"), d("0.45"), d("-0.45")));
        assert_eq!(
            ev,
            vec![ArrearsEvent::Began {
                account_id: "a".into(),
                at: 100
            }]
        );
        let c = book.charge(d("-0.50"), 200, &mut ev);
        assert_eq!((c.paid, c.arrears, c.balance_after), (d("-0.50"), d("0.00"), d("0.05")));
        assert_eq!(
            ev[1],
            ArrearsEvent::Cleared {
                account_id: "a".into(),
                at: 200
            }
        );
    }

    proptest! {
        /// A usage key is exactly the JSON array the first implementation built with `json!`
        /// (stored keys are matched against new ones): any resource and item text, quotes,
        /// backslashes, control and non-ASCII characters included, any hour and quantity.
        #[test]
        fn usage_keys_are_the_json_arrays_they_always_were(
            resource in "\\PC{0,12}|[\"\\\\\u{0}-\u{1f}口é]{0,6}",
            item in "\\PC{0,8}",
            hour in any::<i64>(),
            units in any::<i64>(),
            scale in 0u32..12,
        ) {
            let quantity = Decimal::new(units, scale);
            let first = json!(["usage", resource, item, hour, fmt_plain(quantity)]).to_string();
            prop_assert_eq!(usage_key(&resource, &item, hour, quantity), first);
        }

        /// Billing an interval hour by hour charges the whole interval's fee, less at most the
        /// truncation each hour keeps on the bill.
        #[test]
        fn hourly_lines_sum_to_the_whole_fee(start in 1_600_000_000i64..1_700_000_000, len in 1i64..200_000, price_cents in 1i64..100_000, qty in 1i64..50) {
            let z = BillingZone::parse("+05:30").unwrap();
            let price = Decimal::new(price_cents, 4);
            let mut plans = phone_plan();
            plans.get_mut("p").unwrap().hourly.insert("instance".into(), price);
            let mut r = res(start, Some(start + len));
            r.get_mut("r").unwrap().quantity = qty;
            let mut list = Decimal::ZERO;
            let mut due = Decimal::ZERO;
            let mut truncated = Decimal::ZERO;
            let mut seconds = 0;
            let mut h = z.hour_start(start);
            while h < start + len {
                for u in desired_usage(&z, h, &plans, &r, &[], &Unbillable::new()).unwrap() {
                    seconds += u.seconds;
                    list += u.list_amount;
                    due += amount_due(u.list_amount);
                    truncated += u.list_amount - amount_due(u.list_amount);
                }
                h = z.next_hour(h);
            }
            prop_assert_eq!(seconds, len);
            let whole = price * Decimal::from(qty) * Decimal::from(len) / Decimal::from(3600);
            // each hour's rounding to 8 places moves it by at most half a unit
            let hours = Decimal::from(len / 3600 + 2);
            prop_assert!((list - whole).abs() <= hours * d("0.000000005"));
            prop_assert_eq!(due + truncated, list);
            prop_assert!(truncated >= Decimal::ZERO && truncated < hours * d("0.01"));
        }
    }
}
