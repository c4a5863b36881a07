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
    let csv_columns = crate::export::COLUMNS.join(", ");
    let sql = format!(
        "SELECT {csv_columns}, CAST(NULL AS BIGINT), '', CAST(0 AS BIGINT), '', CAST(0 AS BIGINT), '' FROM ledger WHERE transaction_time >= $1 AND transaction_time < $2 AND ($3 = '' OR account_id = $3) ORDER BY transaction_time, transaction_id"
    );
    let args = vec![
        f.from.unwrap_or(i64::MIN).into(),
        f.to.unwrap_or(i64::MAX).into(),
        f.account.clone().unwrap_or_default().into(),
    ];
    db.stream(sqlx::AssertSqlSafe(sql), args, LINE_KINDS, |r| each(line_of(&r)?)).await
}
