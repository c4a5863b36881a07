//! Transaction bills CSV (SPEC section 7): RFC 4180, header row, one row per ledger line, streamed.

use crate::billing::model::{BillingMode, LedgerLine, TransactionType};
use crate::billing::money::{fmt_amount, fmt_cents, fmt_plain, show_stored, Shown};
use crate::billing::zone::BillingZone;
use crate::store::db::Db;
use crate::store::ledger::{stream_export_rows, Cell, ExportFilter};
use anyhow::{Context, Result};
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

/// What a spreadsheet runs as a formula when a cell starts with it.
const FORMULA_STARTS: [char; 6] = ['=', '+', '-', '@', '\t', '\r'];

/// A text cell a spreadsheet would run as a formula gets a leading `'`.
pub fn text_cell(s: &str) -> String {
    if s.starts_with(FORMULA_STARTS) {
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
///
/// Rows go from the stored cells to the file without building a `LedgerLine`: amounts stored in
/// their canonical form are cut to the CSV's decimals as text (`show_stored`, property-tested
/// against the `Decimal` formatting `record` uses), instants repeat from row to row and are
/// formatted once per value.
pub async fn export<W: Write>(db: &Db, zone: &BillingZone, filter: &ExportFilter, out: W) -> Result<u64> {
    let mut w = csv::WriterBuilder::new().terminator(csv::Terminator::CRLF).from_writer(out);
    w.write_record(COLUMNS)?;
    let mut rows = RowWriter::new(zone);
    let n = stream_export_rows(db, filter, |cells| rows.write(&mut w, cells)).await?;
    w.flush()?;
    Ok(n)
}

/// Turns stored cells (the CSV's columns, in order) into CSV records, reusing its buffers.
struct RowWriter<'z> {
    zone: &'z BillingZone,
    record: csv::ByteRecord,
    times: [(i64, String); 3],
    scratch: String,
}

impl<'z> RowWriter<'z> {
    fn new(zone: &'z BillingZone) -> Self {
        let first = |_| (i64::MIN, zone.format(0));
        RowWriter {
            zone,
            record: csv::ByteRecord::new(),
            times: [0, 1, 2].map(first),
            scratch: String::new(),
        }
    }

    fn write<W: Write>(&mut self, w: &mut csv::Writer<W>, c: &[Cell]) -> Result<()> {
        if c.len() != COLUMNS.len() {
            anyhow::bail!("a ledger row has {} columns, expected {}", c.len(), COLUMNS.len());
        }
        let text = |i: usize| c[i].text().with_context(|| format!("stored {} is not text", COLUMNS[i]));
        let mode = BillingMode::parse(text(6)?).context("stored billing_mode")?;
        let kind = TransactionType::parse(text(7)?).context("stored transaction_type")?;
        let metered = matches!(kind, TransactionType::Usage | TransactionType::Adjustment);
        self.record.clear();
        for i in 0..COLUMNS.len() {
            match i {
                0 | 2 | 3 | 4 | 5 | 20 => self.push_text(text(i)?),
                6 => self.record.push_field(mode.as_str().as_bytes()),
                7 => self.record.push_field(kind.as_str().as_bytes()),
                8 if metered => self.push_text(c[i].text().unwrap_or("")),
                11 if metered => {
                    self.scratch.clear();
                    if let Some(s) = c[i].int()? {
                        use std::fmt::Write as _;
                        write!(self.scratch, "{s}")?;
                    }
                    self.record.push_field(self.scratch.as_bytes());
                }
                8 | 11 => self.record.push_field(b""),
                1 | 9 | 10 => {
                    let t = c[i].int()?.with_context(|| format!("stored {} is empty", COLUMNS[i]))?;
                    let slot = &mut self.times[if i == 1 { 0 } else { i - 8 }];
                    if slot.0 != t {
                        *slot = (t, self.zone.format(t));
                    }
                    self.record.push_field(slot.1.as_bytes());
                }
                _ => {
                    let how = match i {
                        12 | 13 => Shown::Plain,
                        14 | 15 => Shown::Amount,
                        _ => Shown::Cents,
                    };
                    let shown = show_stored(text(i)?, how).map_err(|e| anyhow::anyhow!("{}: {e}", COLUMNS[i]))?;
                    self.record.push_field(shown.as_bytes());
                }
            }
        }
        w.write_byte_record(&self.record)?;
        Ok(())
    }

    /// A text cell, with `text_cell`'s formula defusing.
    fn push_text(&mut self, s: &str) {
        if s.starts_with(FORMULA_STARTS) {
            self.scratch.clear();
            self.scratch.push('\'');
            self.scratch.push_str(s);
            self.record.push_field(self.scratch.as_bytes());
        } else {
            self.record.push_field(s.as_bytes());
        }
    }
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
