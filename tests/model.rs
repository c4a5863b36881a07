//! A reference model of the billing rules, and a property test that generates random worlds
//! (accounts, pay-per-use resources, usage segments, count records, prepaid packages, monthly
//! subscriptions with and without auto-renewal, top-ups in the fixture and by the operator, late
//! usage loaded between ticks, ticks at random instants) and checks that billrun's ledger and
//! balances equal the model's, on SQLite and PostgreSQL, with the invariants every world must keep.
//!
//! The model is a plain simulation, slow and small: it walks the scheduled runs in time order
//! (settle runs at every local full hour for the hour that ended an hour before, the daily run at
//! 00:03:00 local), keeps what it has posted per line key, and posts the difference between that and
//! what the data known at that moment says. It shares no code with billrun but the decimal type.
//!
//! `BILLRUN_MODEL_CASES` sets the number of worlds (default 12 per backend).

mod common;

use billrun::app::Billing;
use chrono::{Months, NaiveDate};
use common::*;
use proptest::prelude::*;
use rust_decimal::{Decimal, RoundingStrategy};
use std::collections::{BTreeMap, BTreeSet};

const DAY: i64 = 86_400;
const HOUR: i64 = 3_600;
const SUB_PRICE: &str = "9.90";
const PACKAGE_PRICE: &str = "0.50";

#[derive(Clone, Debug)]
struct Res {
    account: usize,
    qty: i64,
    created: i64,
    life: Option<i64>,
}

#[derive(Clone, Debug)]
struct Seg {
    res: usize,
    centi: i64,
    from: i64,
    len: i64,
    stage: usize,
}

#[derive(Clone, Debug)]
struct Cnt {
    res: usize,
    units: i64,
    at: i64,
    stage: usize,
}

#[derive(Clone, Debug)]
struct Pkg {
    res: usize,
    quota: i64,
    bought: i64,
}

#[derive(Clone, Debug)]
struct Sub {
    account: usize,
    bought: i64,
    auto: bool,
}

#[derive(Clone, Debug)]
struct World {
    half_hour_zone: bool,
    balances: Vec<i64>,
    /// (grace_days, retention_days) per account: short tiers freeze and release within the world
    tiers: Vec<(i64, i64)>,
    prices: (i64, i64, i64),
    resources: Vec<Res>,
    segments: Vec<Seg>,
    counts: Vec<Cnt>,
    packages: Vec<Pkg>,
    subs: Vec<Sub>,
    topups: Vec<(usize, i64, i64)>,
    operator: Vec<(usize, i64, usize)>,
    cuts: Vec<i64>,
}

fn world() -> impl Strategy<Value = World> {
    let res = (0usize..3, 1i64..3, 0i64..60 * HOUR, prop::option::of(1i64..30 * HOUR)).prop_map(|(account, qty, created, life)| Res {
        account,
        qty,
        created,
        life,
    });
    // few distinct quantities, so that late segments add to lines already posted (adjustments)
    let seg = (
        0usize..3,
        prop::sample::select(vec![100i64, 250, 1_234, 33_333]),
        0i64..6 * HOUR,
        1i64..3 * HOUR,
        0usize..4,
    )
        .prop_map(|(res, centi, from, len, stage)| Seg {
            res,
            centi,
            from,
            len,
            stage,
        });
    // counts and packages favour the first two resources, so that packages stack and run out
    let cnt = (0usize..2, 0i64..40, 0i64..60 * HOUR, 0usize..4).prop_map(|(res, units, at, stage)| Cnt { res, units, at, stage });
    let pkg = (0usize..2, 1i64..30, 0i64..36 * HOUR).prop_map(|(res, quota, bought)| Pkg { res, quota, bought });
    let sub = (0usize..3, 0i64..72 * HOUR, any::<bool>()).prop_map(|(account, bought, auto)| Sub { account, bought, auto });
    (
        (
            any::<bool>(),
            prop::collection::vec(0i64..3_000, 1..4),
            prop::collection::vec(prop::sample::select(vec![(15i64, 15i64), (0, 1), (1, 1), (0, 0), (1, 15)]), 3),
            (1i64..20_000, 1i64..20_000, 1i64..20_000),
            prop::collection::vec(res, 1..6),
            prop::collection::vec(seg, 0..10),
            prop::collection::vec(cnt, 0..10),
        ),
        (
            prop::collection::vec(pkg, 0..4),
            prop::collection::vec(sub, 0..3),
            prop::collection::vec((0usize..3, 1i64..2_000, 0i64..72 * HOUR), 0..3),
            prop::collection::vec((0usize..3, 1i64..2_000, 0usize..4), 0..3),
            prop::collection::vec(1i64..40 * DAY, 0..4),
        ),
    )
        .prop_map(
            |((half_hour_zone, balances, tiers, prices, resources, segments, counts), (packages, subs, topups, operator, cuts))| World {
                half_hour_zone,
                balances,
                tiers,
                prices,
                resources,
                segments,
                counts,
                packages,
                subs,
                topups,
                operator,
                cuts,
            },
        )
}

fn d(units: i64, scale: u32) -> Decimal {
    Decimal::new(units, scale)
}

fn round8(x: Decimal) -> Decimal {
    x.round_dp_with_strategy(8, RoundingStrategy::MidpointAwayFromZero)
}

fn trunc2(x: Decimal) -> Decimal {
    x.round_dp_with_strategy(2, RoundingStrategy::ToZero)
}

/// The world made concrete: instants, the zone, every record with the stage it is loaded at.
struct Plan {
    off: i64,
    zone: &'static str,
    t0: i64,
    end: i64,
    ticks: Vec<i64>,
    balances: Vec<Decimal>,
    tiers: Vec<(i64, i64)>,
    price: (Decimal, Decimal, Decimal),
    /// (account, qty, created, deleted)
    resources: Vec<(usize, i64, i64, Option<i64>)>,
    /// (res, qty, from, to, stage)
    segments: Vec<(usize, Decimal, i64, i64, usize)>,
    /// (res, units, at, stage)
    counts: Vec<(usize, Decimal, i64, usize)>,
    /// (res, quota, bought)
    packages: Vec<(usize, Decimal, i64)>,
    subs: Vec<(usize, i64, bool)>,
    topups: Vec<(usize, Decimal, i64)>,
    operator: Vec<(usize, Decimal, usize)>,
}

impl Plan {
    fn of(w: &World) -> Plan {
        let off = if w.half_hour_zone { 5 * HOUR + 1800 } else { 0 };
        let t0 = 1_709_251_200 - off; // 2024-03-01 00:00 local
        let long = !w.subs.is_empty();
        let end = t0 + if long { 40 * DAY } else { 72 * HOUR };
        let n = w.balances.len();
        let resources: Vec<_> = w
            .resources
            .iter()
            .map(|r| {
                // with subscriptions the world runs 40 days: pay-per-use resources end early so the
                // quiet weeks stay cheap
                let life = if long { Some(r.life.unwrap_or(20 * HOUR)) } else { r.life };
                (r.account % n, r.qty, t0 + r.created, life.map(|l| t0 + r.created + l))
            })
            .collect();
        let nr = resources.len();
        let lifetime = |i: usize| (resources[i].2, resources[i].3.unwrap_or(end));
        let mut ticks: Vec<i64> = w.cuts.iter().map(|c| t0 + c % (end - t0)).collect();
        ticks.push(end);
        ticks.sort();
        ticks.dedup();
        let stages = ticks.len();
        let mut segments = Vec::new();
        let mut keys = BTreeSet::new();
        for s in &w.segments {
            let res = s.res % nr;
            let (a, b) = lifetime(res);
            // segments start within six hours of their resource's creation, so they overlap
            let from = a + s.from;
            let to = (from + s.len).min(b);
            if from < to && keys.insert((res, from)) {
                segments.push((res, d(s.centi, 2), from, to, s.stage % stages));
            }
        }
        let mut counts = Vec::new();
        let mut at_keys = BTreeSet::new();
        for c in &w.counts {
            let res = c.res % nr;
            let (a, b) = lifetime(res);
            let at = t0 + c.at;
            // packages draw in the order hours are settled: late counts are left to the package tests
            let stage = if w.packages.is_empty() { c.stage % stages } else { 0 };
            if a <= at && at < b && at_keys.insert((res, at)) {
                counts.push((res, Decimal::from(c.units), at, stage));
            }
        }
        let packages = w
            .packages
            .iter()
            .filter_map(|p| {
                let res = p.res % nr;
                let at = t0 + p.bought;
                resources[res].3.is_none_or(|d| at < d).then_some((res, Decimal::from(p.quota), at))
            })
            .collect::<Vec<_>>();
        let subs: Vec<_> = w.subs.iter().map(|s| (s.account % n, t0 + s.bought, s.auto)).collect();
        // opening balances cover the purchases made at load (a prepaid charge may not go below zero)
        let mut balances: Vec<Decimal> = w.balances.iter().map(|b| d(*b, 2)).collect();
        for (a, _, _) in &subs {
            balances[*a] += SUB_PRICE.parse::<Decimal>().unwrap();
        }
        for (res, _, _) in &packages {
            balances[resources[*res].0] += PACKAGE_PRICE.parse::<Decimal>().unwrap();
        }
        Plan {
            off,
            zone: if w.half_hour_zone { "+05:30" } else { "UTC" },
            t0,
            end,
            ticks,
            tiers: (0..n).map(|i| w.tiers[i % w.tiers.len()]).collect(),
            balances,
            price: (d(w.prices.0, 4), d(w.prices.1, 4), d(w.prices.2, 4)),
            resources,
            segments,
            counts,
            packages,
            subs,
            topups: w.topups.iter().map(|(a, c, at)| (a % n, d(*c, 2), t0 + at)).collect(),
            operator: w.operator.iter().map(|(a, c, k)| (a % n, d(*c, 2), k % stages)).collect(),
        }
    }

    fn hour(&self, t: i64) -> i64 {
        (t + self.off).div_euclid(HOUR) * HOUR - self.off
    }

    fn date(&self, t: i64) -> NaiveDate {
        chrono::DateTime::from_timestamp(t + self.off, 0).unwrap().date_naive()
    }

    fn midnight(&self, date: NaiveDate) -> i64 {
        date.and_hms_opt(0, 0, 0).unwrap().and_utc().timestamp() - self.off
    }

    fn rfc(&self, t: i64) -> String {
        let tz = chrono::FixedOffset::east_opt(self.off as i32).unwrap();
        chrono::DateTime::from_timestamp(t, 0)
            .unwrap()
            .with_timezone(&tz)
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    }

    fn document(&self) -> String {
        let mut accounts = Vec::new();
        for (i, b) in self.balances.iter().enumerate() {
            let (grace, retention) = self.tiers[i];
            accounts.push(serde_json::json!({"id": format!("a{i}"), "balance": b.to_string(),
                "grace_days": grace, "retention_days": retention}));
        }
        // one package kind per quota drawn
        let kinds: serde_json::Map<String, serde_json::Value> = self
            .packages
            .iter()
            .map(|(_, q, _)| {
                (
                    format!("req-{q}"),
                    serde_json::json!({"item": "req", "quantity": q.to_string(), "price": PACKAGE_PRICE, "months": 1}),
                )
            })
            .collect();
        let plans = serde_json::json!([
            {"id": "ppu", "product": "KooPhone", "hourly": {"instance": self.price.0.to_string(), "gb": self.price.1.to_string()},
             "per_unit": {"req": self.price.2.to_string()}, "packages": kinds},
            {"id": "sub", "product": "KooPhone", "hourly": {"instance": "0.36"}, "monthly": SUB_PRICE}
        ]);
        let mut resources = Vec::new();
        for (i, (a, q, c, del)) in self.resources.iter().enumerate() {
            let mut r = serde_json::json!({"id": format!("r{i}"), "account": format!("a{a}"), "plan": "ppu", "mode": "pay_per_use",
                "quantity": q, "created_at": self.rfc(*c)});
            if let Some(x) = del {
                r["deleted_at"] = self.rfc(*x).into();
            }
            resources.push(r);
        }
        for (i, (a, at, auto)) in self.subs.iter().enumerate() {
            resources.push(
                serde_json::json!({"id": format!("s{i}"), "account": format!("a{a}"), "plan": "sub", "mode": "monthly",
                "purchased_at": self.rfc(*at), "auto_renew": auto}),
            );
        }
        let packages: Vec<_> = self
            .packages
            .iter()
            .enumerate()
            .map(|(i, (res, q, at))| serde_json::json!({"id": format!("k{i}"), "resource": format!("r{res}"), "package": format!("req-{q}"), "purchased_at": self.rfc(*at)}))
            .collect();
        let topups: Vec<_> = self
            .topups
            .iter()
            .map(|(a, c, at)| serde_json::json!({"account": format!("a{a}"), "amount": c.to_string(), "at": self.rfc(*at)}))
            .collect();
        let mut doc = serde_json::json!({"accounts": accounts, "plans": plans, "resources": resources, "packages": packages,
            "topups": topups});
        doc["usage"] = self.usage(0).into();
        doc.to_string()
    }

    fn usage(&self, stage: usize) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        for (res, q, from, to, s) in &self.segments {
            if *s == stage {
                out.push(
                    serde_json::json!({"resource": format!("r{res}"), "item": "gb", "quantity": q.to_string(),
                    "from": self.rfc(*from), "to": self.rfc(*to)}),
                );
            }
        }
        for (res, n, at, s) in &self.counts {
            if *s == stage {
                out.push(serde_json::json!({"resource": format!("r{res}"), "item": "req", "quantity": n.to_string(), "at": self.rfc(*at)}));
            }
        }
        out
    }
}

/// (resource, item, hour, quantity) of a time-metered line.
type TimeKey = (usize, String, i64, String);

/// Posted sums per line key: time lines (resource, item, hour, quantity) -> (seconds, list, due);
/// count lines (resource, item, hour) -> (units, list, due); draws (resource, package, hour) -> units.
#[derive(Clone, Debug, Default, PartialEq)]
struct Ledger {
    time: BTreeMap<TimeKey, (i64, Decimal, Decimal)>,
    count: BTreeMap<(usize, i64), (Decimal, Decimal, Decimal)>,
    draw: BTreeMap<(usize, usize, i64), Decimal>,
    /// (resource id, type, period start, period end, amount due)
    prepaid: BTreeSet<(String, String, i64, i64, Decimal)>,
}

impl Ledger {
    fn without_zeros(mut self) -> Ledger {
        self.time.retain(|_, v| *v != (0, Decimal::ZERO, Decimal::ZERO));
        self.count.retain(|_, v| *v != (Decimal::ZERO, Decimal::ZERO, Decimal::ZERO));
        self.draw.retain(|_, v| !v.is_zero());
        for v in self.time.values_mut() {
            v.1 = v.1.normalize();
            v.2 = v.2.normalize();
        }
        for v in self.count.values_mut() {
            *v = (v.0.normalize(), v.1.normalize(), v.2.normalize());
        }
        for v in self.draw.values_mut() {
            *v = v.normalize();
        }
        self
    }
}

/// Balances, and the arrears periods postings open and close.
struct Books {
    bal: Vec<Decimal>,
    /// per account: [began, cleared) periods
    periods: Vec<Vec<(i64, Option<i64>)>>,
}

impl Books {
    /// Moves account `a`'s balance by `-due` at `at`: in arrears from a posting that leaves it below
    /// zero, out of them at one that brings it back to zero or above.
    fn post(&mut self, a: usize, due: Decimal, at: i64) {
        self.bal[a] -= due;
        let open = self.periods[a].last().is_some_and(|p| p.1.is_none());
        if !open && self.bal[a] < Decimal::ZERO {
            self.periods[a].push((at, None));
        } else if open && self.bal[a] >= Decimal::ZERO {
            self.periods[a].last_mut().unwrap().1 = Some(at);
        }
    }

    /// Windows in which account `a`'s pay-per-use resources are frozen or released: frozen
    /// `grace` days after arrears began, released `retention` days later (for good), unfrozen when
    /// the arrears clear first. Fixed-offset zones: a day is 86,400 s.
    fn unbillable(&self, a: usize, (grace, retention): (i64, i64)) -> Vec<(i64, i64)> {
        let mut out = Vec::new();
        for &(began, cleared) in &self.periods[a] {
            let frozen = began + grace * DAY;
            let released = frozen + retention * DAY;
            match cleared {
                Some(c) if c <= frozen => {}
                Some(c) if c < released => out.push((frozen, c)),
                _ => {
                    out.push((frozen, i64::MAX));
                    break;
                }
            }
        }
        out
    }
}

/// The model: walks the scheduled runs and returns the ledger and the balances it expects.
fn model(p: &Plan) -> (Ledger, Vec<Decimal>) {
    let mut led = Ledger::default();
    let mut books = Books {
        bal: p.balances.clone(),
        periods: vec![Vec::new(); p.balances.len()],
    };
    let bal = &mut books.bal;
    let sub_price: Decimal = SUB_PRICE.parse().unwrap();
    // load: top-ups and purchases (amounts only; balances never go below zero on these)
    for (a, c, _) in &p.topups {
        bal[*a] += c;
    }
    // subscriptions: (account, anchor date, months paid, auto)
    let mut subs: Vec<(usize, NaiveDate, u32, bool)> = Vec::new();
    for (i, (a, at, auto)) in p.subs.iter().enumerate() {
        bal[*a] -= sub_price;
        let anchor = p.date(*at);
        let exp = anchor.checked_add_months(Months::new(1)).unwrap();
        led.prepaid.insert((
            format!("s{i}"),
            "purchase".into(),
            *at,
            p.midnight(exp.succ_opt().unwrap()),
            sub_price,
        ));
        subs.push((*a, anchor, 1, *auto));
    }
    // package cycles: (resource, end, bought, id, quota, used)
    let mut cycles: Vec<(usize, i64, i64, usize, Decimal, Decimal)> = Vec::new();
    for (i, (res, quota, at)) in p.packages.iter().enumerate() {
        let package_price: Decimal = PACKAGE_PRICE.parse().unwrap();
        bal[p.resources[*res].0] -= package_price;
        let exp = p.date(*at).checked_add_months(Months::new(1)).unwrap();
        let end = p.midnight(exp.succ_opt().unwrap());
        led.prepaid.insert((format!("k{i}"), "purchase".into(), *at, end, package_price));
        cycles.push((*res, end, *at, i, *quota, Decimal::ZERO));
    }
    let mut events: Vec<(i64, u8, usize)> = Vec::new(); // (time, 0 settle / 1 daily / 2 after tick k, k)
    let first_hour = p.hour(p.t0) + HOUR;
    let mut r = first_hour;
    while r <= p.end {
        events.push((r, 0, 0));
        r += HOUR;
    }
    let mut day = p.date(p.t0);
    while p.midnight(day) + 180 <= p.end {
        events.push((p.midnight(day) + 180, 1, 0));
        day = day.succ_opt().unwrap();
    }
    for (k, t) in p.ticks.iter().enumerate() {
        events.push((*t, 2, k));
    }
    events.sort();
    let mut stage = 0usize;
    let mut settled_through: Option<i64> = None;
    let mut dirty: BTreeSet<i64> = BTreeSet::new();
    for (t, kind, k) in events {
        match kind {
            0 => {
                let own = t - 2 * HOUR;
                let mut hours = std::mem::take(&mut dirty);
                hours.insert(own);
                // the frozen windows as the run finds them
                let windows: Vec<Vec<(i64, i64)>> = (0..p.balances.len()).map(|a| books.unbillable(a, p.tiers[a])).collect();
                for h in hours {
                    for (a, due) in settle_hour(p, h, stage, &windows, &mut led, &mut cycles) {
                        books.post(a, due, t);
                    }
                }
                settled_through = Some(own);
            }
            1 => {
                let today = p.date(t);
                let mut order: Vec<usize> = (0..subs.len()).collect();
                order.sort_by_key(|&i| (subs[i].0, format!("s{i}")));
                for i in order {
                    let (a, anchor, months, auto) = subs[i];
                    let exp = anchor.checked_add_months(Months::new(months)).unwrap();
                    let end = p.midnight(exp.succ_opt().unwrap());
                    if !auto || end <= t || today < exp - chrono::Duration::days(7) || today > exp {
                        continue;
                    }
                    if books.bal[a] < Decimal::ZERO || books.bal[a] < sub_price {
                        continue;
                    }
                    books.post(a, sub_price, t);
                    subs[i].2 += 1;
                    let new_exp = anchor.checked_add_months(Months::new(months + 1)).unwrap();
                    led.prepaid.insert((
                        format!("s{i}"),
                        "renewal".into(),
                        end,
                        p.midnight(new_exp.succ_opt().unwrap()),
                        sub_price,
                    ));
                }
            }
            _ => {
                // after tick k: the operator's top-ups, then the usage loaded late
                for (a, c, at_k) in &p.operator {
                    if *at_k == k {
                        books.post(*a, -c, t);
                    }
                }
                stage = k + 1;
                if let Some(w) = settled_through {
                    for (_, _, from, to, s) in &p.segments {
                        if *s == stage {
                            let mut h = p.hour(*from);
                            while h < *to && h <= w {
                                dirty.insert(h);
                                h += HOUR;
                            }
                        }
                    }
                    for (_, _, at, s) in &p.counts {
                        if *s == stage && p.hour(*at) <= w {
                            dirty.insert(p.hour(*at));
                        }
                    }
                }
            }
        }
    }
    (led.without_zeros(), books.bal)
}

/// Settles hour `h` with the data loaded up to `stage` (inclusive of stage `stage`'s loads, which
/// happen after tick `stage - 1`): posts the difference from what is posted.
/// Returns the amounts due it posts, by account, in the order billrun charges them (account,
/// resource, item, quantity).
fn settle_hour(
    p: &Plan,
    h: i64,
    stage: usize,
    windows: &[Vec<(i64, i64)>],
    led: &mut Ledger,
    cycles: &mut [(usize, i64, i64, usize, Decimal, Decimal)],
) -> Vec<(usize, Decimal)> {
    let e = h + HOUR;
    let account = |res: usize| p.resources[res].0;
    let frozen = |res: usize, t: i64| windows[account(res)].iter().any(|&(a, b)| a <= t && t < b);
    // seconds of [a, b) inside the hour and outside the resource's frozen or released windows
    let overlap = |res: usize, a: i64, b: i64| {
        let (a, b) = (a.max(h), b.min(e));
        if a >= b {
            return 0;
        }
        let mut secs = b - a;
        for &(wa, wb) in &windows[account(res)] {
            secs -= (b.min(wb) - a.max(wa)).max(0);
        }
        secs
    };
    let mut postings: Vec<((usize, String, String, Decimal), Decimal)> = Vec::new();
    // time-metered: instance lifetimes and gb segments
    let mut desired: BTreeMap<TimeKey, (i64, Decimal)> = BTreeMap::new();
    for (i, (_, q, c, del)) in p.resources.iter().enumerate() {
        let s = overlap(i, *c, del.unwrap_or(i64::MAX));
        if s > 0 {
            let qty = Decimal::from(*q);
            let v = desired.entry((i, "instance".into(), h, qty.normalize().to_string())).or_default();
            v.0 += s;
            v.1 = p.price.0 * qty;
        }
    }
    for (res, q, from, to, s) in &p.segments {
        let secs = overlap(*res, *from, *to);
        if *s <= stage && secs > 0 {
            let v = desired.entry((*res, "gb".into(), h, q.normalize().to_string())).or_default();
            v.0 += secs;
            v.1 = p.price.1 * q;
        }
    }
    let mut keys: BTreeSet<_> = desired.keys().cloned().collect();
    keys.extend(led.time.keys().filter(|k| k.2 == h).cloned());
    for key in keys {
        let (secs, rate) = desired.get(&key).copied().unwrap_or_default();
        let list = round8(rate * Decimal::from(secs) / Decimal::from(3600));
        let due = trunc2(list);
        let posted = led.time.entry(key.clone()).or_default();
        let delta = due - posted.2;
        *posted = (secs, list, due);
        postings.push((
            (account(key.0), format!("r{}", key.0), key.1.clone(), key.3.parse().unwrap()),
            delta,
        ));
    }
    // count-metered: records of the hour, drawn from packages (expiring first), the rest billed
    let mut records: BTreeMap<usize, Vec<(i64, Decimal)>> = BTreeMap::new();
    for (res, n, at, s) in &p.counts {
        if *s <= stage && h <= *at && *at < e && !frozen(*res, *at) {
            records.entry(*res).or_default().push((*at, *n));
        }
    }
    for (res, _) in led
        .count
        .iter()
        .filter(|(k, _)| k.1 == h)
        .map(|(k, v)| (k.0, v))
        .collect::<Vec<_>>()
    {
        records.entry(res).or_default();
    }
    for (res, mut recs) in records {
        recs.sort();
        let mut idx: Vec<usize> = (0..cycles.len()).filter(|&i| cycles[i].0 == res).collect();
        idx.sort_by_key(|&i| (cycles[i].1, cycles[i].2, format!("k{}", cycles[i].3)));
        let mut avail: BTreeMap<usize, Decimal> = BTreeMap::new();
        for &i in &idx {
            let mine = led.draw.get(&(res, cycles[i].3, h)).copied().unwrap_or_default();
            avail.insert(i, (cycles[i].4 - (cycles[i].5 - mine)).max(Decimal::ZERO));
        }
        let mut drawn: BTreeMap<usize, Decimal> = BTreeMap::new();
        let mut excess = Decimal::ZERO;
        for (at, n) in recs {
            let mut left = n;
            for &i in &idx {
                if left.is_zero() {
                    break;
                }
                if cycles[i].2 <= at && at < cycles[i].1 {
                    let take = left.min(avail[&i]);
                    *avail.get_mut(&i).unwrap() -= take;
                    *drawn.entry(i).or_default() += take;
                    left -= take;
                }
            }
            excess += left;
        }
        for &i in &idx {
            let now = drawn.get(&i).copied().unwrap_or_default();
            let slot = led.draw.entry((res, cycles[i].3, h)).or_default();
            cycles[i].5 += now - *slot;
            *slot = now;
        }
        let list = round8(excess * p.price.2);
        let due = trunc2(list);
        let posted = led.count.entry((res, h)).or_default();
        postings.push(((account(res), format!("r{res}"), "req".into(), excess - posted.0), due - posted.2));
        *posted = (excess, list, due);
    }
    postings.sort_by(|a, b| a.0.cmp(&b.0));
    postings.into_iter().map(|((a, ..), due)| (a, due)).collect()
}

/// What billrun posted, in the model's terms, and checks the per-line invariants on the way.
fn ledger_of(p: &Plan, csv: &str) -> Ledger {
    let mut led = Ledger::default();
    let mut usage_keys = BTreeSet::new();
    for r in rows(csv) {
        let list = dec(&r["list_amount"]);
        let due = dec(&r["amount_due"]);
        let (paid, arrears) = (dec(&r["paid_amount"]), dec(&r["arrears_amount"]));
        assert_eq!(
            due + dec(&r["truncated_amount"]),
            list,
            "amount_due + truncated_amount = list_amount: {r:?}"
        );
        if due >= Decimal::ZERO {
            assert!(paid >= Decimal::ZERO && arrears >= Decimal::ZERO && paid + arrears == due, "{r:?}");
        } else {
            assert!(paid == due && arrears.is_zero(), "money back is paid in full: {r:?}");
        }
        let t = |c: &str| billrun::billing::zone::parse_instant(&r[c]).unwrap();
        let kind = r["transaction_type"].as_str();
        if kind == "purchase" || kind == "renewal" {
            led.prepaid
                .insert((r["resource_id"].clone(), kind.to_string(), t("period_start"), t("period_end"), due));
            continue;
        }
        let res: usize = r["resource_id"][1..].parse().unwrap();
        let hour = p.hour(t("period_start"));
        let item = r["billing_item"].clone();
        let qty = dec(&r["quantity"]).normalize().to_string();
        if kind == "usage" {
            let key = if r["usage_seconds"].is_empty() {
                (item.clone(), hour, String::new())
            } else {
                (item.clone(), hour, qty.clone())
            };
            assert!(usage_keys.insert((res, key)), "one usage line per key: {r:?}");
        }
        if let Some((_, k)) = item.split_once('@') {
            assert!(due.is_zero() && list.is_zero(), "{r:?}");
            *led.draw.entry((res, k[1..].parse().unwrap(), hour)).or_default() += dec(&r["quantity"]);
        } else if r["usage_seconds"].is_empty() {
            let v = led.count.entry((res, hour)).or_default();
            *v = (v.0 + dec(&r["quantity"]), v.1 + list, v.2 + due);
        } else {
            let v = led.time.entry((res, item, hour, qty)).or_default();
            *v = (v.0 + r["usage_seconds"].parse::<i64>().unwrap(), v.1 + list, v.2 + due);
        }
    }
    led.without_zeros()
}

async fn run_world(be: &Backend, p: &Plan, split: bool) -> (String, Vec<Decimal>) {
    let b: Billing = be.open(p.zone).await;
    b.load_json("world.json", &p.document())
        .await
        .unwrap_or_else(|e| panic!("{}: {e:#}", be.name));
    let ticks: Vec<i64> = if split { p.ticks.clone() } else { vec![p.end] };
    for (k, t) in ticks.iter().enumerate() {
        b.tick(*t, |_, _| {}).await.unwrap_or_else(|e| panic!("{}: {e:#}", be.name));
        if !split {
            continue;
        }
        for (a, c, at_k) in &p.operator {
            if *at_k == k {
                b.topup(&format!("a{a}"), &c.to_string(), *t).await.unwrap();
            }
        }
        let late = p.usage(k + 1);
        if !late.is_empty() {
            b.load_json("late.json", &serde_json::json!({"usage": late}).to_string())
                .await
                .unwrap();
        }
    }
    let s = b.status().await.unwrap();
    let balances = (0..p.balances.len())
        .map(|i| {
            let a = s.accounts.iter().find(|a| a.id == format!("a{i}")).unwrap();
            let balance = dec(&a.balance);
            assert_eq!(
                a.in_arrears_since.is_some(),
                balance < Decimal::ZERO,
                "in arrears exactly when below zero: {a:?}"
            );
            balance
        })
        .collect();
    // every notification at most once
    let notes = b.notifications(None).await.unwrap();
    let keys: BTreeSet<String> = notes
        .iter()
        .map(|n| {
            format!(
                "{} {} {} {} {} {}",
                n["kind"], n["account_id"], n["resource_id"], n["at"], n["days_before"], n["expires_on"]
            )
        })
        .collect();
    assert_eq!(keys.len(), notes.len(), "a notification twice: {notes:?}");
    (csv(&b).await, balances)
}

/// Map equality that reports only the entries that differ.
fn same<K: Ord + std::fmt::Debug, V: PartialEq + std::fmt::Debug>(got: &BTreeMap<K, V>, want: &BTreeMap<K, V>, what: &str) {
    let keys: BTreeSet<&K> = got.keys().chain(want.keys()).collect();
    let diff: Vec<_> = keys
        .into_iter()
        .filter(|k| got.get(k) != want.get(k))
        .map(|k| format!("{k:?}: billrun {:?}, model {:?}", got.get(k), want.get(k)))
        .collect();
    assert!(diff.is_empty(), "{what} differ from the model:\n{}", diff.join("\n"));
}

fn cases() -> u32 {
    std::env::var("BILLRUN_MODEL_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(12)
}

fn check(w: &World) {
    let p = Plan::of(w);
    let (expected, expected_balances) = model(&p);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(on_each_backend(async |be| {
        let (csv_split, balances) = run_world(be, &p, true).await;
        let got = ledger_of(&p, &csv_split);
        same(&got.time, &expected.time, &format!("{}: time-metered lines", be.name));
        same(&got.count, &expected.count, &format!("{}: count lines", be.name));
        same(&got.draw, &expected.draw, &format!("{}: units drawn from packages", be.name));
        assert_eq!(got.prepaid, expected.prepaid, "{}: purchases and renewals", be.name);
        assert_eq!(balances, expected_balances, "{}: balances", be.name);
        // with nothing loaded or paid in between, one tick equals any split into ticks, to the byte
        let quiet = p.operator.is_empty() && p.segments.iter().all(|s| s.4 == 0) && p.counts.iter().all(|c| c.3 == 0);
        if quiet && p.ticks.len() > 1 {
            let single = fresh(be.name).await;
            let (csv_one, _) = run_world(&single, &p, false).await;
            assert_eq!(csv_one, csv_split, "{}: one tick = {} ticks", be.name, p.ticks.len());
        }
    }));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), max_shrink_iters: 200, .. ProptestConfig::default() })]

    #[test]
    fn billrun_agrees_with_the_reference_model(w in world()) {
        check(&w);
    }
}
