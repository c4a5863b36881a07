//! Transaction bills CSV (SPEC section 7): RFC 4180, header row, one row per ledger line, streamed.

use crate::billing::model::{LedgerLine, TransactionType};
use crate::billing::money::{fmt_amount, fmt_cents, fmt_plain};
use crate::billing::zone::BillingZone;
use crate::store::db::Db;
use crate::store::ledger::{stream_lines, ExportFilter};
use anyhow::Result;
use std::io::Write;

pub const COLUMNS: [&str; 21] = [
    "transaction_id",
    "transaction_time",
    "account_id",
    "resource_id",
    "product",
    "plan_id",
    "billing_mode",
    "transaction_type",
    "billing_item",
    "period_start",
    "period_end",
    "usage_seconds",
    "quantity",
    "unit_price",
    "list_amount",
    "truncated_amount",
    "amount_due",
    "paid_amount",
    "arrears_amount",
    "balance_after",
    "currency",
];

/// A text cell a spreadsheet would run as a formula gets a leading `'`.
pub fn text_cell(s: &str) -> String {
    if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{s}")
    } else {
        s.to_string()
    }
}

/// The CSV record of one line. Amounts that move a balance have two decimals; list and truncated
/// amounts as many as they need (up to 8); prices and quantities as given.
pub fn record(zone: &BillingZone, l: &LedgerLine) -> [String; 21] {
    fields(zone, l, text_cell)
}

/// The 21 fields of a line in CSV column order, text cells passed through `text`.
pub fn fields(zone: &BillingZone, l: &LedgerLine, text: fn(&str) -> String) -> [String; 21] {
    let metered = matches!(l.transaction_type, TransactionType::Usage | TransactionType::Adjustment);
    [
        text(&l.transaction_id),
        zone.format(l.transaction_time),
        text(&l.account_id),
        text(&l.resource_id),
        text(&l.product),
        text(&l.plan_id),
        l.billing_mode.as_str().to_string(),
        l.transaction_type.as_str().to_string(),
        if metered {
            text(l.billing_item.as_deref().unwrap_or(""))
        } else {
            String::new()
        },
        zone.format(l.period_start),
        zone.format(l.period_end),
        if metered {
            l.usage_seconds.map(|s| s.to_string()).unwrap_or_default()
        } else {
            String::new()
        },
        fmt_plain(l.quantity),
        fmt_plain(l.unit_price),
        fmt_amount(l.list_amount),
        fmt_amount(l.truncated_amount),
        fmt_cents(l.amount_due),
        fmt_cents(l.paid_amount),
        fmt_cents(l.arrears_amount),
        fmt_cents(l.balance_after),
        text(&l.currency),
    ]
}

/// Writes the bills CSV for `filter` to `out`, streaming; returns the number of rows.
pub async fn export<W: Write>(db: &Db, zone: &BillingZone, filter: &ExportFilter, out: W) -> Result<u64> {
    let mut w = csv::WriterBuilder::new().terminator(csv::Terminator::CRLF).from_writer(out);
    w.write_record(COLUMNS)?;
    let n = stream_lines(db, filter, |l| Ok(w.write_record(record(zone, &l))?)).await?;
    w.flush()?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formulas_are_defused() {
        assert_eq!(text_cell("=SUM(A1)"), "'=SUM(A1)");
        assert_eq!(text_cell("-1"), "'-1");
        assert_eq!(text_cell("@x"), "'@x");
        assert_eq!(text_cell("\tx"), "'\tx");
        assert_eq!(text_cell("acme"), "acme");
    }
}
