//! The ledger: posting lines (append only, unique by line key and revision) and reading them back.

use super::db::{Db, Kind, Row, Tx, Val};
use crate::billing::model::{BillingMode, LedgerLine, TransactionType};
use anyhow::{Context, Result};

/// The ledger's columns: the CSV's, then what a line keeps for re-settlement and `explain`.
pub fn line_columns() -> &'static [&'static str] {
    static COLUMNS: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
    COLUMNS.get_or_init(|| {
        crate::export::COLUMNS
            .iter()
            .copied()
            .chain(["hour_start", "line_key", "revision", "run_job", "run_at", "explain"])
            .collect()
    })
}

const SELECT_LINE: &str = "SELECT transaction_id, transaction_time, account_id, resource_id, product, plan_id, billing_mode, \
    transaction_type, billing_item, period_start, period_end, usage_seconds, quantity, unit_price, list_amount, \
    truncated_amount, amount_due, paid_amount, arrears_amount, balance_after, currency, hour_start, line_key, revision, \
    run_job, run_at, explain FROM ledger";

const LINE_KINDS: &[Kind] = &[
    Kind::Text,
    Kind::Int,
    Kind::Text,
    Kind::Text,
    Kind::Text,
    Kind::Text,
    Kind::Text,
    Kind::Text,
    Kind::Text,
    Kind::Int,
    Kind::Int,
    Kind::Int,
    Kind::Money,
    Kind::Money,
    Kind::Money,
    Kind::Money,
    Kind::Money,
    Kind::Money,
    Kind::Money,
    Kind::Money,
    Kind::Text,
    Kind::Int,
    Kind::Text,
    Kind::Int,
    Kind::Text,
    Kind::Int,
    Kind::Text,
];

pub fn line_row(l: &LedgerLine) -> Vec<Val> {
    vec![
        l.transaction_id.clone().into(),
        l.transaction_time.into(),
        l.account_id.clone().into(),
        l.resource_id.clone().into(),
        l.product.clone().into(),
        l.plan_id.clone().into(),
        l.billing_mode.as_str().into(),
        l.transaction_type.as_str().into(),
        l.billing_item.clone().into(),
        l.period_start.into(),
        l.period_end.into(),
        l.usage_seconds.into(),
        l.quantity.into(),
        l.unit_price.into(),
        l.list_amount.into(),
        l.truncated_amount.into(),
        l.amount_due.into(),
        l.paid_amount.into(),
        l.arrears_amount.into(),
        l.balance_after.into(),
        l.currency.clone().into(),
        l.hour_start.into(),
        l.line_key.clone().into(),
        l.revision.into(),
        l.run_job.clone().into(),
        l.run_at.into(),
        l.explain.clone().into(),
    ]
}

fn line_of(r: &Row) -> Result<LedgerLine> {
    Ok(LedgerLine {
        transaction_id: r.text(0),
        transaction_time: r.int(1),
        account_id: r.text(2),
        resource_id: r.text(3),
        product: r.text(4),
        plan_id: r.text(5),
        billing_mode: BillingMode::parse(&r.text(6)).context("stored billing_mode")?,
        transaction_type: TransactionType::parse(&r.text(7)).context("stored transaction_type")?,
        billing_item: r.opt_text(8),
        period_start: r.int(9),
        period_end: r.int(10),
        usage_seconds: r.opt_int(11),
        quantity: r.money(12),
        unit_price: r.money(13),
        list_amount: r.money(14),
        truncated_amount: r.money(15),
        amount_due: r.money(16),
        paid_amount: r.money(17),
        arrears_amount: r.money(18),
        balance_after: r.money(19),
        currency: r.text(20),
        hour_start: r.opt_int(21),
        line_key: r.text(22),
        revision: r.int(23),
        run_job: r.text(24),
        run_at: r.int(25),
        explain: r.text(26),
    })
}

/// Appends lines. The unique (line_key, revision) makes a second posting of the same line fail the
/// whole transaction instead of charging twice.
pub(crate) async fn post_lines(tx: &mut Tx, lines: &[LedgerLine]) -> Result<u64> {
    let rows = lines.iter().map(line_row).collect();
    tx.insert_rows("ledger", line_columns(), rows, "").await
}

/// Lines already posted for the billing hour to the accounts in a range, in posting order.
pub(crate) async fn hour_lines(tx: &mut Tx, hour_start: i64, accounts: (Option<&str>, Option<&str>)) -> Result<Vec<LedgerLine>> {
    let (cond, extra) = super::settle::range_sql("account_id", accounts, 2);
    let sql = format!("{SELECT_LINE} WHERE hour_start = $1{cond} ORDER BY seq");
    tx.rows(sqlx::AssertSqlSafe(sql), [vec![hour_start.into()], extra].concat(), LINE_KINDS)
        .await?
        .iter()
        .map(line_of)
        .collect()
}

/// One line by transaction id.
pub async fn line(db: &Db, transaction_id: &str) -> Result<Option<LedgerLine>> {
    let sql = format!("{SELECT_LINE} WHERE transaction_id = $1");
    db.rows(sqlx::AssertSqlSafe(sql), vec![transaction_id.into()], LINE_KINDS)
        .await?
        .first()
        .map(line_of)
        .transpose()
}

#[derive(Clone, Debug, Default)]
pub struct ExportFilter {
    pub from: Option<i64>,
    pub to: Option<i64>,
    pub account: Option<String>,
}

/// Streams the lines with `transaction_time` in [from, to), by time then id, with the CSV's
/// columns only (what a line keeps for re-settlement and `explain` is left empty: the export
/// reads a tenth of the bytes).
pub async fn stream_lines(db: &Db, f: &ExportFilter, mut each: impl FnMut(LedgerLine) -> Result<()>) -> Result<u64> {
    if let Db::Sqlite(_) = db {
        return stream_lines_packed(db, f, &mut each).await;
    }
    let csv_columns = crate::export::COLUMNS.join(", ");
    let sql = format!(
        "SELECT {csv_columns} FROM ledger WHERE transaction_time >= $1 AND transaction_time < $2 AND ($3 = '' OR account_id = $3) \
         ORDER BY transaction_time, transaction_id"
    );
    let args = vec![
        f.from.unwrap_or(i64::MIN).into(),
        f.to.unwrap_or(i64::MAX).into(),
        f.account.clone().unwrap_or_default().into(),
    ];
    db.stream(sqlx::AssertSqlSafe(sql), args, csv_kinds(), |r| each(csv_line_of(r)?))
        .await
}

/// The kinds of the CSV's columns, the first of the ledger's.
fn csv_kinds() -> &'static [Kind] {
    &LINE_KINDS[..crate::export::COLUMNS.len()]
}

/// A line from a row of the CSV's columns only; what the CSV does not show is left empty.
fn csv_line_of(mut row: Row) -> Result<LedgerLine> {
    row.0
        .extend([Val::Int(None), "".into(), 0i64.into(), "".into(), 0i64.into(), "".into()]);
    line_of(&row)
}

/// Rows per page of the SQLite export.
const EXPORT_PAGE: i64 = 5_000;

/// SQLite: sqlx hands rows over one at a time across its worker thread (about 10 µs a row), so the
/// export reads pages of rows packed into one JSON array each (SQLite's `json_group_array`, in key
/// order), walking the (transaction_time, transaction_id) index page after page. Amounts are stored
/// as decimal text and stay text in the JSON: nothing passes through a float.
async fn stream_lines_packed(db: &Db, f: &ExportFilter, each: &mut impl FnMut(LedgerLine) -> Result<()>) -> Result<u64> {
    let cols = crate::export::COLUMNS.join(", ");
    let sql = format!(
        "SELECT json_group_array(json_array({cols}) ORDER BY transaction_time, transaction_id), COUNT(*) FROM \
         (SELECT {cols} FROM ledger WHERE (transaction_time, transaction_id) > ($3, $4) AND transaction_time < $1 \
         AND ($2 = '' OR account_id = $2) ORDER BY transaction_time, transaction_id LIMIT {EXPORT_PAGE})"
    );
    // each page seeks the index past the last key read (the first: from `from`, as no id is empty)
    let (mut after_time, mut after_id) = (f.from.unwrap_or(i64::MIN), String::new());
    let mut n = 0;
    loop {
        let args = vec![
            f.to.unwrap_or(i64::MAX).into(),
            f.account.clone().unwrap_or_default().into(),
            after_time.into(),
            after_id.clone().into(),
        ];
        let page = db.rows(sqlx::AssertSqlSafe(sql.clone()), args, &[Kind::Text, Kind::Int]).await?;
        let count = page[0].int(1);
        if count == 0 {
            break;
        }
        let rows: Vec<Vec<serde_json::Value>> = serde_json::from_str(&page[0].text(0)).context("a packed page of the ledger")?;
        for values in rows {
            let line = csv_line_of(row_of_json(values, csv_kinds())?)?;
            after_time = line.transaction_time;
            after_id.clone_from(&line.transaction_id);
            each(line)?;
            n += 1;
        }
        if count < EXPORT_PAGE {
            break;
        }
    }
    Ok(n)
}

/// A JSON array read back as a row of the given kinds.
fn row_of_json(values: Vec<serde_json::Value>, kinds: &[Kind]) -> Result<Row> {
    use serde_json::Value as J;
    if values.len() != kinds.len() {
        anyhow::bail!("a packed row has {} values, expected {}", values.len(), kinds.len());
    }
    values
        .into_iter()
        .zip(kinds)
        .map(|(v, k)| {
            Ok(match (k, v) {
                (Kind::Int, J::Null) => Val::Int(None),
                (Kind::Int, J::Number(n)) => Val::Int(Some(n.as_i64().context("an integer column")?)),
                (Kind::Text, J::Null) => Val::Text(None),
                (Kind::Text, J::String(s)) => Val::Text(Some(s)),
                (Kind::Money, J::Null) => Val::Money(None),
                (Kind::Money, J::String(s)) => Val::Money(Some(s.parse().with_context(|| format!("a stored amount {s:?}"))?)),
                (k, v) => anyhow::bail!("a packed row holds {v} where a {k:?} column was expected"),
            })
        })
        .collect::<Result<Vec<_>>>()
        .map(Row)
}
