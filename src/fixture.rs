//! Fixture documents (SPEC section 6): parsed strictly, validated against what is already loaded,
//! turned into a `Batch` that the store writes all at once. Every rejection names the record, the
//! field and the reason.

use crate::billing::model::{BillingMode, PackageTerms, PartPrices, Plan};
use crate::billing::money::CENT_DP;
use crate::billing::zone::parse_instant;
use crate::error::InputError;
use rust_decimal::Decimal;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::str::FromStr;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Document {
    #[serde(default)]
    pub accounts: Vec<AccountDoc>,
    #[serde(default)]
    pub plans: Vec<PlanDoc>,
    #[serde(default)]
    pub resources: Vec<ResourceDoc>,
    #[serde(default)]
    pub usage: Vec<UsageDoc>,
    #[serde(default)]
    pub topups: Vec<TopupDoc>,
    #[serde(default)]
    pub packages: Vec<PackageDoc>,
    /// How many of the purchasing sections (`resources`, `packages`) come before `topups` in the
    /// document: purchases and top-ups are posted in the document's order.
    #[serde(skip)]
    pub topups_after: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountDoc {
    pub id: String,
    pub balance: Option<String>,
    pub currency: Option<String>,
    pub grace_days: Option<i64>,
    pub retention_days: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanDoc {
    pub id: String,
    pub product: String,
    #[serde(default)]
    pub hourly: BTreeMap<String, String>,
    #[serde(default)]
    pub per_unit: BTreeMap<String, String>,
    pub monthly: Option<String>,
    pub yearly: Option<String>,
    #[serde(default)]
    pub packages: BTreeMap<String, PackageTermsDoc>,
    #[serde(default)]
    pub parts: BTreeMap<String, PartDoc>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackageTermsDoc {
    pub item: String,
    pub quantity: String,
    pub price: String,
    pub months: i64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartDoc {
    pub monthly: Option<String>,
    pub yearly: Option<String>,
}

/// A prepaid package bought for a count-metered resource.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackageDoc {
    pub id: String,
    pub resource: String,
    pub package: String,
    pub purchased_at: String,
    pub periods: Option<i64>,
    pub auto_renew: Option<bool>,
    pub auto_renew_times: Option<i64>,
    pub renew_days_before: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceDoc {
    pub id: String,
    pub account: String,
    pub plan: String,
    pub mode: String,
    pub quantity: Option<i64>,
    pub created_at: Option<String>,
    pub deleted_at: Option<String>,
    pub periods: Option<i64>,
    pub purchased_at: Option<String>,
    pub auto_renew: Option<bool>,
    pub auto_renew_times: Option<i64>,
    pub renew_days_before: Option<i64>,
    pub parts: Option<BTreeMap<String, i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageDoc {
    pub resource: String,
    pub item: String,
    pub quantity: String,
    pub from: Option<String>,
    pub to: Option<String>,
    pub at: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopupDoc {
    pub account: String,
    pub amount: String,
    pub at: String,
}

/// Parses one document; a structural error names its path (`resources[1].quantity`).
pub fn parse_document(name: &str, text: &str) -> Result<Document, InputError> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| InputError(format!("{name}: {e}")))?;
    let topups_after = match &value {
        serde_json::Value::Object(m) => {
            let pos = |k: &str| m.keys().position(|x| x == k);
            match pos("topups") {
                None => 0,
                Some(t) => ["resources", "packages"].iter().filter(|k| pos(k).is_some_and(|p| p < t)).count(),
            }
        }
        _ => 0,
    };
    let mut doc: Document = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            InputError(format!("{name}: {inner}"))
        } else {
            InputError(format!("{name}: {path}: {inner}"))
        }
    })?;
    doc.topups_after = topups_after;
    Ok(doc)
}

// ---------- validated batch ----------

#[derive(Clone, Debug, PartialEq)]
pub struct NewAccount {
    pub id: String,
    pub currency: String,
    pub balance: Decimal,
    pub grace_days: i64,
    pub retention_days: i64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct NewResource {
    pub id: String,
    pub account_id: String,
    pub plan_id: String,
    pub mode: BillingMode,
    pub quantity: i64,
    /// Billing starts here: `created_at`, or `purchased_at` for a subscription.
    pub created_at: i64,
    pub deleted_at: Option<i64>,
    pub subscription: Option<NewSubscription>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct NewSubscription {
    pub periods: i64,
    pub auto_renew: bool,
    pub auto_renew_times: Option<i64>,
    pub renew_days_before: i64,
    /// Expansion parts with their count (KooDrive editions).
    pub parts: BTreeMap<String, i64>,
}

/// A prepaid package: a subscription of its own, covering units of the resource it serves.
#[derive(Clone, Debug, PartialEq)]
pub struct NewPackage {
    pub id: String,
    pub serves: String,
    pub account_id: String,
    pub plan_id: String,
    pub kind: String,
    pub mode: BillingMode,
    pub purchased_at: i64,
    pub subscription: NewSubscription,
}

/// A count record.
#[derive(Clone, Debug, PartialEq)]
pub struct NewCount {
    pub resource_id: String,
    pub item: String,
    pub quantity: Decimal,
    pub at: i64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct NewSegment {
    pub resource_id: String,
    pub item: String,
    pub quantity: Decimal,
    pub from: i64,
    pub to: i64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct NewTopup {
    pub account_id: String,
    pub amount: Decimal,
    pub at: i64,
}

/// What one `load` writes, in document order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Batch {
    pub accounts: Vec<NewAccount>,
    pub plans: Vec<Plan>,
    pub resources: Vec<NewResource>,
    pub segments: Vec<NewSegment>,
    pub counts: Vec<NewCount>,
    pub packages: Vec<NewPackage>,
    pub topups: Vec<NewTopup>,
    /// How many purchasing sections (resources, packages) are posted before the top-ups.
    pub topups_after: usize,
}

/// A resource already in the database, as validation needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct KnownResource {
    pub account_id: String,
    pub plan_id: String,
    pub mode: BillingMode,
    pub created_at: i64,
    pub deleted_at: Option<i64>,
}

/// What is already loaded that a document may refer to or collide with.
#[derive(Clone, Debug, Default)]
pub struct Known {
    pub accounts: HashSet<String>,
    pub plans: HashMap<String, Plan>,
    pub resources: HashMap<String, KnownResource>,
}

impl Known {
    /// Adds a validated batch so that a later document of the same load may refer to it.
    pub fn absorb(&mut self, b: &Batch) {
        self.accounts.extend(b.accounts.iter().map(|a| a.id.clone()));
        for p in &b.plans {
            self.plans.insert(p.id.clone(), p.clone());
        }
        for r in &b.resources {
            self.resources.insert(
                r.id.clone(),
                KnownResource {
                    account_id: r.account_id.clone(),
                    plan_id: r.plan_id.clone(),
                    mode: r.mode,
                    created_at: r.created_at,
                    deleted_at: r.deleted_at,
                },
            );
        }
        for p in &b.packages {
            self.resources.insert(
                p.id.clone(),
                KnownResource {
                    account_id: p.account_id.clone(),
                    plan_id: p.plan_id.clone(),
                    mode: p.mode,
                    created_at: p.purchased_at,
                    deleted_at: None,
                },
            );
        }
    }
}

/// Ids a document refers to, so the store can look up just those.
pub fn referenced_ids(doc: &Document) -> (Vec<String>, Vec<String>, Vec<String>) {
    let mut accounts: Vec<String> = doc.accounts.iter().map(|a| a.id.clone()).collect();
    accounts.extend(doc.resources.iter().map(|r| r.account.clone()));
    accounts.extend(doc.topups.iter().map(|t| t.account.clone()));
    let mut plans: Vec<String> = doc.plans.iter().map(|p| p.id.clone()).collect();
    plans.extend(doc.resources.iter().map(|r| r.plan.clone()));
    let mut resources: Vec<String> = doc.resources.iter().map(|r| r.id.clone()).collect();
    resources.extend(doc.usage.iter().map(|u| u.resource.clone()));
    resources.extend(doc.packages.iter().flat_map(|p| [p.id.clone(), p.resource.clone()]));
    for v in [&mut accounts, &mut plans, &mut resources] {
        v.sort();
        v.dedup();
    }
    (accounts, plans, resources)
}

/// Largest price, quantity or amount accepted: keeps every product exact in 128-bit arithmetic.
const MAX_MAGNITUDE: i64 = 1_000_000_000;
/// Most decimal places of a price or quantity.
const MAX_DP: u32 = 8;

/// A decimal string: `-`? digits (`.` digits)?, at most `max_dp` places, |x| < 10^9.
pub fn parse_decimal(s: &str, max_dp: u32) -> Result<Decimal, String> {
    let body = s.strip_prefix('-').unwrap_or(s);
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    if !digits(int) || (body.contains('.') && !digits(frac)) {
        return Err(format!("`{s}` is not a decimal number (write it like \"12.50\")"));
    }
    if int.trim_start_matches('0').len() > 9 {
        return Err(format!("`{s}` is too large (the limit is {MAX_MAGNITUDE})"));
    }
    if frac.len() as u32 > max_dp {
        return Err(format!("`{s}` has {} decimal places; at most {max_dp} are allowed", frac.len()));
    }
    let d = Decimal::from_str(s).map_err(|e| format!("`{s}`: {e}"))?;
    if d.abs() >= Decimal::from(MAX_MAGNITUDE) {
        return Err(format!("`{s}` is too large (the limit is {MAX_MAGNITUDE})"));
    }
    Ok(d)
}

fn check_id(record: &str, field: &str, id: &str) -> Result<(), InputError> {
    if id.is_empty() || id.chars().count() > 128 || id.chars().any(|c| c.is_control()) {
        return Err(InputError::field(
            record,
            field,
            "must be 1 to 128 characters with no control characters",
        ));
    }
    Ok(())
}

fn rec(section: &str, i: usize, id: Option<&str>) -> String {
    match id {
        Some(id) => format!("{section}[{i}] (id {id:?})"),
        None => format!("{section}[{i}]"),
    }
}

/// Checks a document against what is loaded (and what earlier documents of the load added).
pub fn validate(doc: &Document, known: &Known) -> Result<Batch, InputError> {
    let mut b = Batch::default();
    let mut seen = HashSet::new();
    for (i, a) in doc.accounts.iter().enumerate() {
        let r = rec("accounts", i, Some(&a.id));
        check_id(&r, "id", &a.id)?;
        if known.accounts.contains(&a.id) || !seen.insert(a.id.clone()) {
            return Err(InputError::field(&r, "id", "duplicate account id"));
        }
        let balance = match &a.balance {
            None => Decimal::ZERO,
            Some(s) => parse_decimal(s, CENT_DP).map_err(|e| InputError::field(&r, "balance", e))?,
        };
        if balance < Decimal::ZERO {
            return Err(InputError::field(&r, "balance", "an opening balance may not be negative"));
        }
        let currency = a.currency.clone().unwrap_or_else(|| "USD".to_string());
        if currency.len() != 3 || !currency.bytes().all(|c| c.is_ascii_uppercase()) {
            return Err(InputError::field(
                &r,
                "currency",
                format!("`{currency}` is not an ISO 4217 code like USD"),
            ));
        }
        let days = |v: Option<i64>, f: &str| match v {
            None => Ok(15),
            Some(d) if (0..=3650).contains(&d) => Ok(d),
            Some(d) => Err(InputError::field(&r, f, format!("{d} is not between 0 and 3650"))),
        };
        b.accounts.push(NewAccount {
            id: a.id.clone(),
            currency,
            balance,
            grace_days: days(a.grace_days, "grace_days")?,
            retention_days: days(a.retention_days, "retention_days")?,
        });
    }
    let mut plans: HashMap<String, Plan> = known.plans.clone();
    for (i, p) in doc.plans.iter().enumerate() {
        let r = rec("plans", i, Some(&p.id));
        check_id(&r, "id", &p.id)?;
        if plans.contains_key(&p.id) {
            return Err(InputError::field(&r, "id", "duplicate plan id"));
        }
        if p.product.trim().is_empty() {
            return Err(InputError::field(&r, "product", "must not be empty"));
        }
        let prices = |m: &BTreeMap<String, String>, f: &str| -> Result<BTreeMap<String, Decimal>, InputError> {
            m.iter()
                .map(|(item, s)| {
                    check_id(&r, &format!("{f}.{item}"), item)?;
                    let d = parse_decimal(s, MAX_DP).map_err(|e| InputError::field(&r, &format!("{f}.{item}"), e))?;
                    if d < Decimal::ZERO {
                        return Err(InputError::field(&r, &format!("{f}.{item}"), "a price may not be negative"));
                    }
                    Ok((item.clone(), d))
                })
                .collect()
        };
        let period_price = |v: &Option<String>, f: &str| -> Result<Option<Decimal>, InputError> {
            v.as_ref()
                .map(|s| {
                    let d = parse_decimal(s, MAX_DP).map_err(|e| InputError::field(&r, f, e))?;
                    if d < Decimal::ZERO {
                        return Err(InputError::field(&r, f, "a price may not be negative"));
                    }
                    Ok(d)
                })
                .transpose()
        };
        let per_unit = prices(&p.per_unit, "per_unit")?;
        for item in per_unit.keys() {
            if item.contains('@') {
                return Err(InputError::field(
                    &r,
                    &format!("per_unit.{item}"),
                    "an item name may not contain `@` (lines drawn from a package are named ITEM@PACKAGE)",
                ));
            }
        }
        let mut packages = BTreeMap::new();
        for (kind, t) in &p.packages {
            let f = |x: &str| format!("packages.{kind}.{x}");
            check_id(&r, &format!("packages.{kind}"), kind)?;
            if !per_unit.contains_key(&t.item) {
                return Err(InputError::field(
                    &r,
                    &f("item"),
                    format!("`{}` has no per_unit price in this plan to bill what exceeds the package", t.item),
                ));
            }
            let quantity = parse_decimal(&t.quantity, MAX_DP).map_err(|e| InputError::field(&r, &f("quantity"), e))?;
            if quantity <= Decimal::ZERO {
                return Err(InputError::field(&r, &f("quantity"), "a package's quota must be positive"));
            }
            let price = parse_decimal(&t.price, MAX_DP).map_err(|e| InputError::field(&r, &f("price"), e))?;
            if price < Decimal::ZERO {
                return Err(InputError::field(&r, &f("price"), "a price may not be negative"));
            }
            if !(1..=120).contains(&t.months) {
                return Err(InputError::field(
                    &r,
                    &f("months"),
                    format!("{} is not between 1 and 120", t.months),
                ));
            }
            packages.insert(
                kind.clone(),
                PackageTerms {
                    item: t.item.clone(),
                    quantity,
                    price,
                    months: t.months as u32,
                },
            );
        }
        let mut parts = BTreeMap::new();
        for (part, d) in &p.parts {
            check_id(&r, &format!("parts.{part}"), part)?;
            let prices = PartPrices {
                monthly: period_price(&d.monthly, &format!("parts.{part}.monthly"))?,
                yearly: period_price(&d.yearly, &format!("parts.{part}.yearly"))?,
            };
            if prices.monthly.is_none() && prices.yearly.is_none() {
                return Err(InputError::field(&r, &format!("parts.{part}"), "needs a monthly or a yearly price"));
            }
            parts.insert(part.clone(), prices);
        }
        let plan = Plan {
            id: p.id.clone(),
            product: p.product.clone(),
            hourly: prices(&p.hourly, "hourly")?,
            per_unit,
            monthly: period_price(&p.monthly, "monthly")?,
            yearly: period_price(&p.yearly, "yearly")?,
            packages,
            parts,
        };
        plans.insert(plan.id.clone(), plan.clone());
        b.plans.push(plan);
    }
    let new_accounts: HashSet<&str> = b.accounts.iter().map(|a| a.id.as_str()).collect();
    let accounts_known = |id: &str| known.accounts.contains(id) || new_accounts.contains(id);
    let mut resources: HashMap<String, KnownResource> = known.resources.clone();
    for (i, x) in doc.resources.iter().enumerate() {
        let r = rec("resources", i, Some(&x.id));
        check_id(&r, "id", &x.id)?;
        if resources.contains_key(&x.id) {
            return Err(InputError::field(&r, "id", "duplicate resource id"));
        }
        if !accounts_known(&x.account) {
            return Err(InputError::field(&r, "account", format!("unknown account {:?}", x.account)));
        }
        let Some(plan) = plans.get(&x.plan) else {
            return Err(InputError::field(&r, "plan", format!("unknown plan {:?}", x.plan)));
        };
        let mode = BillingMode::parse(&x.mode)
            .ok_or_else(|| InputError::field(&r, "mode", format!("`{}` is not pay_per_use, monthly or yearly", x.mode)))?;
        let quantity = x.quantity.unwrap_or(1);
        if !(1..=MAX_MAGNITUDE).contains(&quantity) {
            return Err(InputError::field(
                &r,
                "quantity",
                format!("{quantity} is not a whole number of instances from 1 to {MAX_MAGNITUDE}"),
            ));
        }
        let (created_at, deleted_at, subscription) = if mode == BillingMode::PayPerUse {
            for (f, present) in [
                ("periods", x.periods.is_some()),
                ("purchased_at", x.purchased_at.is_some()),
                ("auto_renew", x.auto_renew.is_some()),
                ("auto_renew_times", x.auto_renew_times.is_some()),
                ("renew_days_before", x.renew_days_before.is_some()),
                ("parts", x.parts.is_some()),
            ] {
                if present {
                    return Err(InputError::field(&r, f, "applies to yearly/monthly subscriptions, not pay_per_use"));
                }
            }
            let created_at = match &x.created_at {
                None => return Err(InputError::field(&r, "created_at", "is required for a pay_per_use resource")),
                Some(s) => parse_instant(s).map_err(|e| InputError::field(&r, "created_at", e))?,
            };
            let deleted_at = x
                .deleted_at
                .as_ref()
                .map(|s| parse_instant(s).map_err(|e| InputError::field(&r, "deleted_at", e)))
                .transpose()?;
            if let Some(d) = deleted_at {
                if d <= created_at {
                    return Err(InputError::field(&r, "deleted_at", "must be after created_at"));
                }
            }
            if plan.hourly.is_empty() && plan.per_unit.is_empty() {
                return Err(InputError::field(
                    &r,
                    "plan",
                    format!("plan {:?} has no pay-per-use prices", x.plan),
                ));
            }
            (created_at, deleted_at, None)
        } else {
            for (f, present) in [("created_at", x.created_at.is_some()), ("deleted_at", x.deleted_at.is_some())] {
                if present {
                    return Err(InputError::field(
                        &r,
                        f,
                        "applies to pay_per_use resources; a subscription starts at purchased_at",
                    ));
                }
            }
            let price = if mode == BillingMode::Monthly { plan.monthly } else { plan.yearly };
            if price.is_none() {
                return Err(InputError::field(
                    &r,
                    "mode",
                    format!("plan {:?} has no {} price", x.plan, mode.as_str()),
                ));
            }
            let purchased_at = match &x.purchased_at {
                None => {
                    return Err(InputError::field(
                        &r,
                        "purchased_at",
                        "is required for a yearly/monthly subscription",
                    ))
                }
                Some(s) => parse_instant(s).map_err(|e| InputError::field(&r, "purchased_at", e))?,
            };
            let periods = x.periods.unwrap_or(1);
            if !(1..=120).contains(&periods) {
                return Err(InputError::field(&r, "periods", format!("{periods} is not between 1 and 120")));
            }
            if let Some(t) = x.auto_renew_times {
                if !(0..=1000).contains(&t) {
                    return Err(InputError::field(&r, "auto_renew_times", format!("{t} is not between 0 and 1000")));
                }
            }
            let renew_days_before = x.renew_days_before.unwrap_or(7);
            if !(0..=60).contains(&renew_days_before) {
                return Err(InputError::field(
                    &r,
                    "renew_days_before",
                    format!("{renew_days_before} is not between 0 and 60"),
                ));
            }
            let mut parts = BTreeMap::new();
            for (part, &count) in x.parts.iter().flatten() {
                let prices = plan
                    .parts
                    .get(part)
                    .ok_or_else(|| InputError::field(&r, &format!("parts.{part}"), format!("plan {:?} has no part {part:?}", x.plan)))?;
                let priced = if mode == BillingMode::Monthly {
                    prices.monthly
                } else {
                    prices.yearly
                };
                if priced.is_none() {
                    return Err(InputError::field(
                        &r,
                        &format!("parts.{part}"),
                        format!("plan {:?} has no {} price for part {part:?}", x.plan, mode.as_str()),
                    ));
                }
                if !(1..=1000).contains(&count) {
                    return Err(InputError::field(
                        &r,
                        &format!("parts.{part}"),
                        format!("{count} is not a count from 1 to 1000"),
                    ));
                }
                parts.insert(part.clone(), count);
            }
            let sub = NewSubscription {
                periods,
                auto_renew: x.auto_renew.unwrap_or(false),
                auto_renew_times: x.auto_renew_times,
                renew_days_before,
                parts,
            };
            (purchased_at, None, Some(sub))
        };
        resources.insert(
            x.id.clone(),
            KnownResource {
                account_id: x.account.clone(),
                plan_id: x.plan.clone(),
                mode,
                created_at,
                deleted_at,
            },
        );
        b.resources.push(NewResource {
            id: x.id.clone(),
            account_id: x.account.clone(),
            plan_id: x.plan.clone(),
            mode,
            quantity,
            created_at,
            deleted_at,
            subscription,
        });
    }
    let mut readings = HashSet::new();
    let mut counts = HashSet::new();
    for (i, u) in doc.usage.iter().enumerate() {
        let r = rec("usage", i, None);
        let Some(res) = resources.get(&u.resource) else {
            return Err(InputError::field(&r, "resource", format!("unknown resource {:?}", u.resource)));
        };
        if res.mode != BillingMode::PayPerUse {
            return Err(InputError::field(
                &r,
                "resource",
                format!(
                    "{:?} is a {} subscription; usage is metered for pay_per_use resources",
                    u.resource,
                    res.mode.as_str()
                ),
            ));
        }
        let plan = &plans[&res.plan_id];
        if let Some(at) = &u.at {
            for (f, present) in [("from", u.from.is_some()), ("to", u.to.is_some())] {
                if present {
                    return Err(InputError::field(
                        &r,
                        f,
                        "a count record gives `at`; `from` and `to` are for usage segments",
                    ));
                }
            }
            if !plan.per_unit.contains_key(&u.item) {
                return Err(InputError::field(
                    &r,
                    "item",
                    format!("plan {:?} has no per_unit price for `{}`", res.plan_id, u.item),
                ));
            }
            let quantity = parse_decimal(&u.quantity, MAX_DP).map_err(|e| InputError::field(&r, "quantity", e))?;
            if quantity < Decimal::ZERO {
                return Err(InputError::field(&r, "quantity", "may not be negative"));
            }
            let at = parse_instant(at).map_err(|e| InputError::field(&r, "at", e))?;
            if at < res.created_at || res.deleted_at.is_some_and(|d| at >= d) {
                return Err(InputError::field(
                    &r,
                    "at",
                    format!("the record lies outside resource {:?}'s lifetime", u.resource),
                ));
            }
            if !counts.insert((u.resource.clone(), u.item.clone(), at)) {
                return Err(InputError::field(
                    &r,
                    "at",
                    "a second count for the same resource, item and instant in one load",
                ));
            }
            b.counts.push(NewCount {
                resource_id: u.resource.clone(),
                item: u.item.clone(),
                quantity,
                at,
            });
            continue;
        }
        if u.item == crate::billing::settle::INSTANCE_ITEM {
            return Err(InputError::field(
                &r,
                "item",
                "`instance` usage comes from the resource's lifetime, not from usage records",
            ));
        }
        if !plan.hourly.contains_key(&u.item) {
            let hint = if plan.per_unit.contains_key(&u.item) {
                " (it is count-metered: give `at` instead of `from`/`to`)"
            } else {
                ""
            };
            return Err(InputError::field(
                &r,
                "item",
                format!("plan {:?} has no hourly price for `{}`{hint}", res.plan_id, u.item),
            ));
        }
        let quantity = parse_decimal(&u.quantity, MAX_DP).map_err(|e| InputError::field(&r, "quantity", e))?;
        if quantity < Decimal::ZERO {
            return Err(InputError::field(&r, "quantity", "may not be negative"));
        }
        let from = match &u.from {
            None => return Err(InputError::field(&r, "from", "is required")),
            Some(s) => parse_instant(s).map_err(|e| InputError::field(&r, "from", e))?,
        };
        let to = match &u.to {
            None => return Err(InputError::field(&r, "to", "is required")),
            Some(s) => parse_instant(s).map_err(|e| InputError::field(&r, "to", e))?,
        };
        if to <= from {
            return Err(InputError::field(&r, "to", "must be after from"));
        }
        if from < res.created_at || res.deleted_at.is_some_and(|d| to > d) {
            return Err(InputError::field(
                &r,
                "from",
                format!("the segment lies outside resource {:?}'s lifetime", u.resource),
            ));
        }
        if !readings.insert((u.resource.clone(), u.item.clone(), from)) {
            return Err(InputError::field(
                &r,
                "from",
                "a second reading for the same resource, item and from in one load",
            ));
        }
        b.segments.push(NewSegment {
            resource_id: u.resource.clone(),
            item: u.item.clone(),
            quantity,
            from,
            to,
        });
    }
    for (i, k) in doc.packages.iter().enumerate() {
        let r = rec("packages", i, Some(&k.id));
        check_id(&r, "id", &k.id)?;
        if resources.contains_key(&k.id) {
            return Err(InputError::field(
                &r,
                "id",
                "duplicate id (packages and resources share one set of ids)",
            ));
        }
        let Some(res) = resources.get(&k.resource) else {
            return Err(InputError::field(&r, "resource", format!("unknown resource {:?}", k.resource)));
        };
        if res.mode != BillingMode::PayPerUse {
            return Err(InputError::field(
                &r,
                "resource",
                format!(
                    "{:?} is not pay_per_use; a package covers the metered units of a pay_per_use resource",
                    k.resource
                ),
            ));
        }
        let plan = &plans[&res.plan_id];
        let Some(terms) = plan.packages.get(&k.package) else {
            return Err(InputError::field(
                &r,
                "package",
                format!("plan {:?} has no package {:?}", res.plan_id, k.package),
            ));
        };
        let purchased_at = parse_instant(&k.purchased_at).map_err(|e| InputError::field(&r, "purchased_at", e))?;
        if res.deleted_at.is_some_and(|d| purchased_at >= d) {
            return Err(InputError::field(
                &r,
                "purchased_at",
                format!("resource {:?} is deleted by then", k.resource),
            ));
        }
        let periods = k.periods.unwrap_or(1);
        if !(1..=120).contains(&periods) {
            return Err(InputError::field(&r, "periods", format!("{periods} is not between 1 and 120")));
        }
        if let Some(t) = k.auto_renew_times {
            if !(0..=1000).contains(&t) {
                return Err(InputError::field(&r, "auto_renew_times", format!("{t} is not between 0 and 1000")));
            }
        }
        let renew_days_before = k.renew_days_before.unwrap_or(7);
        if !(0..=60).contains(&renew_days_before) {
            return Err(InputError::field(
                &r,
                "renew_days_before",
                format!("{renew_days_before} is not between 0 and 60"),
            ));
        }
        let account_id = res.account_id.clone();
        let plan_id = res.plan_id.clone();
        resources.insert(
            k.id.clone(),
            KnownResource {
                account_id: account_id.clone(),
                plan_id: plan_id.clone(),
                mode: terms.mode(),
                created_at: purchased_at,
                deleted_at: None,
            },
        );
        b.packages.push(NewPackage {
            id: k.id.clone(),
            serves: k.resource.clone(),
            account_id,
            plan_id,
            kind: k.package.clone(),
            mode: terms.mode(),
            purchased_at,
            subscription: NewSubscription {
                periods,
                auto_renew: k.auto_renew.unwrap_or(false),
                auto_renew_times: k.auto_renew_times,
                renew_days_before,
                parts: BTreeMap::new(),
            },
        });
    }
    for (i, t) in doc.topups.iter().enumerate() {
        let r = rec("topups", i, None);
        if !accounts_known(&t.account) {
            return Err(InputError::field(&r, "account", format!("unknown account {:?}", t.account)));
        }
        let amount = parse_decimal(&t.amount, CENT_DP).map_err(|e| InputError::field(&r, "amount", e))?;
        if amount <= Decimal::ZERO {
            return Err(InputError::field(&r, "amount", "a top-up must be positive"));
        }
        let at = parse_instant(&t.at).map_err(|e| InputError::field(&r, "at", e))?;
        b.topups.push(NewTopup {
            account_id: t.account.clone(),
            amount,
            at,
        });
    }
    b.topups_after = doc.topups_after;
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = r#"{
      "accounts": [{"id": "acme", "balance": "100.00", "currency": "USD"}],
      "plans": [{"id": "drive", "product": "KooDrive", "hourly": {"users": "0.012", "storage_gb": "0.0001"}}],
      "resources": [{"id": "d1", "account": "acme", "plan": "drive", "mode": "pay_per_use", "created_at": "2024-02-01T09:00:00+08:00"}],
      "usage": [{"resource": "d1", "item": "storage_gb", "quantity": "100", "from": "2024-02-01T10:00:00+08:00", "to": "2024-02-01T11:00:00+08:00"}]
    }"#;

    fn err(text: &str) -> String {
        match parse_document("doc.json", text) {
            Err(e) => e.0,
            Ok(d) => validate(&d, &Known::default()).map(|_| String::new()).unwrap_or_else(|e| e.0),
        }
    }

    #[test]
    fn accepts_the_spec_document() {
        let b = validate(&parse_document("doc.json", DOC).unwrap(), &Known::default()).unwrap();
        assert_eq!(b.segments[0].to - b.segments[0].from, 3600);
        assert_eq!(b.accounts[0].balance, Decimal::new(10000, 2));
    }

    #[test]
    fn rejections_name_the_record_and_field() {
        assert!(
            err(r#"{"accounts": [{"id": "a", "colour": "red"}]}"#).contains("accounts[0].colour"),
            "{}",
            err(r#"{"accounts": [{"id": "a", "colour": "red"}]}"#)
        );
        assert!(err(r#"{"accounts": [{"id": "a", "balance": 5}]}"#).contains("accounts[0].balance"));
        assert!(err(r#"{"accounts": [{"id": "a"}, {"id": "a"}]}"#).contains("accounts[1] (id \"a\"): field `id`: duplicate"));
        assert!(err(r#"{"accounts": [{"id": "a", "balance": "NaN"}]}"#).contains("not a decimal"));
        assert!(err(r#"{"accounts": [{"id": "a", "balance": "1.005"}]}"#).contains("decimal places"));
        let bad_deleted = DOC.replace(
            r#""created_at": "2024-02-01T09:00:00+08:00""#,
            r#""created_at": "2024-02-01T09:00:00+08:00", "deleted_at": "2024-02-01T08:00:00+08:00""#,
        );
        assert!(err(&bad_deleted).contains("resources[0] (id \"d1\"): field `deleted_at`: must be after created_at"));
        let naive = DOC.replace("2024-02-01T09:00:00+08:00", "2024-02-01T09:00:00");
        assert!(err(&naive).contains("no UTC offset"));
        let negative = DOC.replace(r#""0.0001""#, r#""-0.0001""#);
        assert!(err(&negative).contains("plans[0] (id \"drive\"): field `hourly.storage_gb`: a price may not be negative"));
        let unknown_ref = DOC.replace(r#""resource": "d1""#, r#""resource": "d9""#);
        assert!(err(&unknown_ref).contains("usage[0]: field `resource`: unknown resource \"d9\""));
        let deep = format!("{{\"usage\": [{}{}]}}", "[".repeat(5000), "]".repeat(5000));
        assert!(err(&deep).contains("recursion limit"), "{}", err(&deep));
    }
}
