//! The billing world as the rules see it: plain data, no IO.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub id: String,
    pub product: String,
    /// Hourly price per billing item (`instance`, `users`, `storage_gb`).
    #[serde(default)]
    pub hourly: BTreeMap<String, Decimal>,
    /// Price per unit of count-metered items (`email`).
    #[serde(default)]
    pub per_unit: BTreeMap<String, Decimal>,
    pub monthly: Option<Decimal>,
    pub yearly: Option<Decimal>,
    /// Prepaid packages of count-metered units, by kind (`email-10k`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub packages: BTreeMap<String, PackageTerms>,
    /// Expansion parts of a yearly/monthly edition (KooDrive storage and user packs), by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub parts: BTreeMap<String, PartPrices>,
}

/// One kind of prepaid package: `quantity` units of `item` for each period of `months` months.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PackageTerms {
    pub item: String,
    pub quantity: Decimal,
    pub price: Decimal,
    pub months: u32,
}

impl PackageTerms {
    /// A package of whole years is billed as yearly, any other as monthly.
    pub fn mode(&self) -> BillingMode {
        if self.months.is_multiple_of(12) {
            BillingMode::Yearly
        } else {
            BillingMode::Monthly
        }
    }
}

/// Prices of one expansion part per period.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PartPrices {
    pub monthly: Option<Decimal>,
    pub yearly: Option<Decimal>,
}

/// A count record: `quantity` units of `item` used at instant `at`.
#[derive(Clone, Debug, PartialEq)]
pub struct UsageCount {
    pub resource_id: String,
    pub item: String,
    pub quantity: Decimal,
    pub at: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BillingMode {
    PayPerUse,
    Monthly,
    Yearly,
}

impl BillingMode {
    pub fn as_str(&self) -> &'static str {
        match self {
            BillingMode::PayPerUse => "pay_per_use",
            BillingMode::Monthly => "monthly",
            BillingMode::Yearly => "yearly",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pay_per_use" => Some(BillingMode::PayPerUse),
            "monthly" => Some(BillingMode::Monthly),
            "yearly" => Some(BillingMode::Yearly),
            _ => None,
        }
    }
}

/// A pay-per-use resource as settlement needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct MeteredResource {
    pub id: String,
    pub account_id: String,
    pub plan_id: String,
    pub quantity: i64,
    pub created_at: i64,
    pub deleted_at: Option<i64>,
}

/// A usage segment: `quantity` of `item` in use over [from, to).
#[derive(Clone, Debug, PartialEq)]
pub struct UsageSegment {
    pub resource_id: String,
    pub item: String,
    pub quantity: Decimal,
    pub from: i64,
    pub to: i64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Account {
    pub id: String,
    pub currency: String,
    pub balance: Decimal,
    pub in_arrears_since: Option<i64>,
    pub grace_days: i64,
    pub retention_days: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransactionType {
    Usage,
    Purchase,
    Renewal,
    Refund,
    Adjustment,
}

impl TransactionType {
    pub fn as_str(&self) -> &'static str {
        match self {
            TransactionType::Usage => "usage",
            TransactionType::Purchase => "purchase",
            TransactionType::Renewal => "renewal",
            TransactionType::Refund => "refund",
            TransactionType::Adjustment => "adjustment",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Usage, Self::Purchase, Self::Renewal, Self::Refund, Self::Adjustment]
            .into_iter()
            .find(|t| t.as_str() == s)
    }
}

/// One line of the ledger, as exported. Posted lines are never edited or deleted.
#[derive(Clone, Debug, PartialEq)]
pub struct LedgerLine {
    pub transaction_id: String,
    pub transaction_time: i64,
    pub account_id: String,
    pub resource_id: String,
    pub product: String,
    pub plan_id: String,
    pub billing_mode: BillingMode,
    pub transaction_type: TransactionType,
    pub billing_item: Option<String>,
    pub period_start: i64,
    pub period_end: i64,
    pub usage_seconds: Option<i64>,
    pub quantity: Decimal,
    pub unit_price: Decimal,
    pub list_amount: Decimal,
    pub truncated_amount: Decimal,
    pub amount_due: Decimal,
    pub paid_amount: Decimal,
    pub arrears_amount: Decimal,
    pub balance_after: Decimal,
    pub currency: String,
    /// The billing hour a usage/adjustment line belongs to.
    pub hour_start: Option<i64>,
    /// The natural key of what the line charges; with `revision` it is unique and fixes the id.
    pub line_key: String,
    pub revision: i64,
    /// The run that posted it: job name and scheduled instant.
    pub run_job: String,
    pub run_at: i64,
    /// What the line was computed from (JSON), for `explain`.
    pub explain: String,
}
