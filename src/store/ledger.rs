//! The ledger: posting lines (append only, unique by line key and revision) and reading them back.

use super::db::{Backend, Db, Kind, Row, Tx, Val};
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

/// A line's columns, as stored, in [`LINE_KINDS`]' order.
macro_rules! line_column_list {
    () => {
        "transaction_id, transaction_time, account_id, resource_id, product, plan_id, billing_mode, \
         transaction_type, billing_item, period_start, period_end, usage_seconds, quantity, unit_price, list_amount, \
         truncated_amount, amount_due, paid_amount, arrears_amount, balance_after, currency, hour_start, line_key, revision, \
         run_job, run_at, explain"
    };
}

const SELECT_LINE: &str = concat!("SELECT ", line_column_list!(), " FROM ledger");

/// `SELECT` and a line's columns, without `FROM`.
const LINE_COLUMNS: &str = concat!("SELECT ", line_column_list!());

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
///
/// Rows are inserted in the export's order (time, then id), not in the order they were charged
/// (`balance_after` carries that): the ids are hashes, so charging order scatters them, and a
/// table written in id order is read back by the export's index walk page after page instead of
/// one random page per row, and keeps the unique id index's inserts local.
pub(crate) async fn post_lines(tx: &mut Tx, lines: &[LedgerLine]) -> Result<u64> {
    let mut sorted: Vec<&LedgerLine> = lines.iter().collect();
    sorted.sort_unstable_by(|a, b| (a.transaction_time, &a.transaction_id).cmp(&(b.transaction_time, &b.transaction_id)));
    match tx {
        Tx::Postgres(t) if sorted.len() >= COPY_FROM_LINES => copy_lines(t, &sorted).await,
        Tx::Sqlite(_) if sorted.len() >= super::db::DIRECT_FROM_ROWS => tx.sqlite_direct(|conn| insert_lines_direct(conn, &sorted)).await,
        _ => {
            let rows = sorted.into_iter().map(line_row).collect();
            tx.insert_rows("ledger", line_columns(), rows, "").await
        }
    }
}

/// SQLite: one prepared single-row INSERT stepped for every line on the transaction's own
/// connection, each value bound from the line itself, texts without a copy. Through sqlx every
/// value was copied into an argument list and the rows went as 1,000-row statements to its worker
/// thread: 12 of a 1M hour's 29 s went on posting its lines.
fn insert_lines_direct(conn: &rusqlite::Connection, lines: &[&LedgerLine]) -> Result<u64> {
    let cols = line_columns();
    let marks = vec!["?"; cols.len()].join(", ");
    let mut stmt = super::db::CStatement::prepare(conn, &format!("INSERT INTO ledger ({}) VALUES ({marks})", cols.join(", ")))?;
    let mut n = 0;
    for l in lines {
        stmt.bind_static(1, &l.transaction_id)?;
        stmt.bind_int(2, Some(l.transaction_time))?;
        stmt.bind_static(3, &l.account_id)?;
        stmt.bind_static(4, &l.resource_id)?;
        stmt.bind_static(5, &l.product)?;
        stmt.bind_static(6, &l.plan_id)?;
        stmt.bind_static(7, l.billing_mode.as_str())?;
        stmt.bind_static(8, l.transaction_type.as_str())?;
        stmt.bind_opt_static(9, l.billing_item.as_deref())?;
        stmt.bind_int(10, Some(l.period_start))?;
        stmt.bind_int(11, Some(l.period_end))?;
        stmt.bind_int(12, l.usage_seconds)?;
        stmt.bind_decimal(13, l.quantity)?;
        stmt.bind_decimal(14, l.unit_price)?;
        stmt.bind_decimal(15, l.list_amount)?;
        stmt.bind_decimal(16, l.truncated_amount)?;
        stmt.bind_decimal(17, l.amount_due)?;
        stmt.bind_decimal(18, l.paid_amount)?;
        stmt.bind_decimal(19, l.arrears_amount)?;
        stmt.bind_decimal(20, l.balance_after)?;
        stmt.bind_static(21, &l.currency)?;
        stmt.bind_int(22, l.hour_start)?;
        stmt.bind_static(23, &l.line_key)?;
        stmt.bind_int(24, Some(l.revision))?;
        stmt.bind_static(25, &l.run_job)?;
        stmt.bind_int(26, Some(l.run_at))?;
        stmt.bind_static(27, &l.explain)?;
        n += stmt
            .execute()
            .with_context(|| format!("posting line {} ({})", l.transaction_id, l.line_key))?;
    }
    Ok(n)
}

/// From this many lines on, PostgreSQL posts with COPY: a COPY costs more round trips than one
/// INSERT, which loads posting a purchase at a time felt (10k subscriptions: minutes instead of
/// seconds); settlement chunks are thousands of lines.
const COPY_FROM_LINES: usize = 32;

/// PostgreSQL: `COPY ledger FROM STDIN` (text format) inside the posting transaction, so it
/// commits or rolls back with the balances like the INSERTs do, and a duplicate id still fails
/// the whole transaction.
///
/// A COPY waiting for data is an active statement that no server timeout ends while the client
/// sends nothing (a statement timeout is not acted on while the server waits on the client), so
/// a runner paused mid-COPY would hold its accounts' row locks for as long as it stays paused. The
/// runner that takes its run over ends that session (`runs::claim`).
async fn copy_lines(tx: &mut sqlx::Transaction<'static, sqlx::Postgres>, lines: &[&LedgerLine]) -> Result<u64> {
    const SEND_AT: usize = 4 << 20;
    let sql = format!("COPY ledger ({}) FROM STDIN", line_columns().join(", "));
    let mut copy = tx.copy_in_raw(&sql).await?;
    let mut buf = String::with_capacity(SEND_AT + 4096);
    for l in lines {
        copy_line(&mut buf, l);
        if buf.len() > SEND_AT {
            let full = std::mem::replace(&mut buf, String::with_capacity(SEND_AT + 4096));
            copy.send(full.into_bytes()).await?;
        }
    }
    if !buf.is_empty() {
        copy.send(buf.into_bytes()).await?;
    }
    Ok(copy.finish().await?)
}

/// One line as a row of COPY's text format, its values written straight from the line (the
/// columns of [`line_row`], in order, without copying them into a row of values first).
fn copy_line(buf: &mut String, l: &LedgerLine) {
    use std::fmt::Write as _;
    let text = |buf: &mut String, s: Option<&str>| {
        match s {
            Some(s) => copy_text(buf, s),
            None => buf.push_str("\\N"),
        }
        buf.push('\t');
    };
    let int = |buf: &mut String, v: Option<i64>| {
        match v {
            Some(v) => {
                let _ = write!(buf, "{v}");
            }
            None => buf.push_str("\\N"),
        }
        buf.push('\t');
    };
    let money = |buf: &mut String, d: rust_decimal::Decimal| {
        let _ = write!(buf, "{d}\t");
    };
    text(buf, Some(&l.transaction_id));
    int(buf, Some(l.transaction_time));
    text(buf, Some(&l.account_id));
    text(buf, Some(&l.resource_id));
    text(buf, Some(&l.product));
    text(buf, Some(&l.plan_id));
    text(buf, Some(l.billing_mode.as_str()));
    text(buf, Some(l.transaction_type.as_str()));
    text(buf, l.billing_item.as_deref());
    int(buf, Some(l.period_start));
    int(buf, Some(l.period_end));
    int(buf, l.usage_seconds);
    for d in [
        l.quantity,
        l.unit_price,
        l.list_amount,
        l.truncated_amount,
        l.amount_due,
        l.paid_amount,
        l.arrears_amount,
        l.balance_after,
    ] {
        money(buf, d);
    }
    text(buf, Some(&l.currency));
    int(buf, l.hour_start);
    text(buf, Some(&l.line_key));
    int(buf, Some(l.revision));
    text(buf, Some(&l.run_job));
    int(buf, Some(l.run_at));
    copy_text(buf, &l.explain);
    buf.push('\n');
}

/// A text in COPY's text format: backslash, tab, newline and carriage return escaped.
fn copy_text(buf: &mut String, s: &str) {
    if !s.bytes().any(|b| matches!(b, b'\\' | b'\t' | b'\n' | b'\r')) {
        buf.push_str(s);
        return;
    }
    for c in s.chars() {
        match c {
            '\\' => buf.push_str("\\\\"),
            '\t' => buf.push_str("\\t"),
            '\n' => buf.push_str("\\n"),
            '\r' => buf.push_str("\\r"),
            c => buf.push(c),
        }
    }
}

/// The query of [`hour_lines`] and its arguments: two branches, each searching an index.
///
/// - Lines posted since migration 10 have [`metered_transaction_id`]s, which lead with their hour
///   and their account's bucket, so a chunk's lines of an hour are one range of the unique id
///   index ([`metered_id_range`] over the chunk's buckets). The ledger has no index of its own for
///   this read (migration 14 dropped it: a fourth index written for every posted line).
/// - Older metered lines (27-character ids: hash only, or hour and hash) are in the partial index
///   `ledger_hour_legacy`, which nothing posted now goes into.
///
/// Both branches keep the exact chunk condition on the row (the id range covers whole buckets),
/// and their length conditions make them disjoint. That a posted id's bucket is the one the
/// database computes for its account is checked when its chunk reads its resources.
///
/// [`metered_transaction_id`]: crate::billing::settle::metered_transaction_id
/// [`metered_id_range`]: crate::billing::settle::metered_id_range
pub fn hour_lines_sql(backend: Backend, hour_start: i64, accounts: super::settle::ChunkRange<'_>) -> (String, Vec<Val>) {
    use super::settle::ChunkRange;
    use crate::billing::settle::{metered_id_range, METERED_ID_LEN};
    // a bound that is not a bucket (never written by a plan) widens the range, never narrows it
    let bucket = |k: Option<&super::settle::ChunkKey>| k.and_then(|(b, _)| u16::try_from(*b).ok());
    let (lo, hi) = match accounts {
        ChunkRange::Keys(lo, hi) => metered_id_range(hour_start, bucket(lo), bucket(hi)),
        // a plan made before migration 10 bounds accounts by id, not bucket: the whole hour
        ChunkRange::Accounts(..) => metered_id_range(hour_start, None, None),
    };
    let (cond, extra) = super::settle::range_sql(backend, "account_id", accounts, 4);
    let sql = format!(
        "{LINE_COLUMNS}, seq FROM ledger WHERE transaction_id >= $2 AND transaction_id < $3 \
         AND length(transaction_id) = {METERED_ID_LEN} AND hour_start = $1{cond} \
         UNION ALL {LINE_COLUMNS}, seq FROM ledger WHERE hour_start = $1 AND length(transaction_id) <> {METERED_ID_LEN}{cond} \
         ORDER BY seq"
    );
    (sql, [vec![hour_start.into(), lo.into(), hi.into()], extra].concat())
}

/// Lines already posted for the billing hour to the accounts in a range, in posting order.
pub(crate) async fn hour_lines(tx: &mut Tx, hour_start: i64, accounts: super::settle::ChunkRange<'_>) -> Result<Vec<LedgerLine>> {
    let (sql, args) = hour_lines_sql(tx.backend(), hour_start, accounts);
    let kinds: Vec<Kind> = LINE_KINDS.iter().copied().chain([Kind::Int]).collect();
    tx.rows_bulk(sqlx::AssertSqlSafe(sql), args, &kinds)
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

/// A stored cell of a ledger row, borrowed from the reader's buffer for one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cell<'a> {
    Null,
    Int(i64),
    Text(&'a str),
}

impl<'a> Cell<'a> {
    pub fn text(self) -> Option<&'a str> {
        match self {
            Cell::Text(s) => Some(s),
            _ => None,
        }
    }

    /// An integer column (PostgreSQL's COPY hands it over as text).
    pub fn int(self) -> Result<Option<i64>> {
        match self {
            Cell::Null => Ok(None),
            Cell::Int(v) => Ok(Some(v)),
            Cell::Text(s) => s.parse().map(Some).with_context(|| format!("a stored integer {s:?}")),
        }
    }
}

/// The export's statement: the CSV's columns of the lines with `transaction_time` in [from, to)
/// (of one account if given), by time then id. Ids and bounds are literals (PostgreSQL's COPY takes
/// no parameters): integers, and the account quoted as a standard SQL string.
pub fn export_select(f: &ExportFilter) -> String {
    let account = match &f.account {
        Some(a) => format!(" AND account_id = '{}'", a.replace('\'', "''")),
        None => String::new(),
    };
    format!(
        "SELECT {} FROM ledger WHERE transaction_time >= {} AND transaction_time < {}{account} ORDER BY transaction_time, transaction_id",
        crate::export::COLUMNS.join(", "),
        f.from.unwrap_or(i64::MIN),
        f.to.unwrap_or(i64::MAX)
    )
}

/// Streams the export's rows (the CSV's columns, as stored) to `each`, in one read transaction,
/// so the file is one consistent snapshot however long it takes. Memory stays flat.
///
/// The driver's per-row cost, not the database, bounded the export (sqlx hands SQLite rows over
/// one at a time across its worker thread, ~10 µs a row), so the rows are read with the least
/// per-row work each backend allows: on SQLite a read-only rusqlite connection to the same file
/// (WAL: readers never block the writer) stepping one prepared statement on a thread of its own,
/// in batches the calling thread formats; on PostgreSQL `COPY (SELECT ...) TO STDOUT` received
/// by a task of its own, parsed from the text format by the calling task.
pub async fn stream_export_rows(db: &Db, f: &ExportFilter, mut each: impl FnMut(&[Cell]) -> Result<()>) -> Result<u64> {
    if f.account.as_deref().is_some_and(|a| a.contains('\0')) {
        anyhow::bail!("ACCOUNT: contains a NUL character");
    }
    match db {
        Db::Sqlite(pool) => {
            let path = pool.connect_options().get_filename().to_path_buf();
            sqlite_export_rows(&path, &export_select(f), &mut each)
        }
        Db::Postgres(pool) => {
            let mut tx = pool.begin().await?;
            for set in pg_export_settings(f) {
                sqlx::query(*set).execute(&mut *tx).await?;
            }
            pg_export_rows(tx, export_select(f), &mut each).await
        }
    }
}

/// What the PostgreSQL export sets for its own transaction. Without an account, the file is the
/// ledger in the order of `ledger_time`, so it walks that index: streamed, in flat memory on both
/// sides. Left to itself the planner chose that walk only with fresh statistics; after a big hour,
/// before autovacuum had analyzed the ledger (or on a server without it), it read the ledger by a
/// bitmap and sorted it on disk (1M lines: 187 MB of temporary files, the export at 480k rows/s
/// instead of 800k). An account's export keeps the planner's choice: its index gives a few rows to
/// sort, while the time index would mean walking every account's lines.
pub fn pg_export_settings(f: &ExportFilter) -> &'static [&'static str] {
    if f.account.is_some() {
        &[]
    } else {
        &["SET LOCAL enable_sort = off"]
    }
}

/// Rows read but not yet written, their texts packed in one buffer: what the reader thread hands
/// the writer, and gets back empty to fill again.
#[derive(Default)]
struct Batch {
    texts: Vec<u8>,
    cells: Vec<Packed>,
    width: usize,
}

#[derive(Clone, Copy)]
enum Packed {
    Null,
    Int(i64),
    Text(usize, usize),
}

const BATCH_ROWS: usize = 2048;

/// On SQLite the export is two threads: this one formats and writes what a reader thread steps out
/// of the database (the two halves cost about the same; one core each). The reader's own read
/// transaction is the snapshot. Whichever side fails stops the other, and the export fails: a
/// reader error or panic is returned even when every row it sent was written.
fn sqlite_export_rows(path: &std::path::Path, select: &str, each: &mut impl FnMut(&[Cell]) -> Result<()>) -> Result<u64> {
    use std::sync::mpsc;
    let (full_tx, full_rx) = mpsc::sync_channel::<Batch>(2);
    let (empty_tx, empty_rx) = mpsc::channel::<Batch>();
    std::thread::scope(|s| {
        let reader = s.spawn(move || read_export_batches(path, select, &full_tx, &empty_rx));
        let mut n = 0;
        let written = || -> Result<()> {
            for batch in full_rx {
                // checked once a batch: a cell of a valid whole is valid exactly when it starts
                // and ends on character boundaries, which `get` checks
                let texts = std::str::from_utf8(&batch.texts).context("a stored text is not UTF-8")?;
                let mut cells = [Cell::Null; 32];
                for row in batch.cells.chunks(batch.width) {
                    for (cell, p) in cells.iter_mut().zip(row) {
                        *cell = match *p {
                            Packed::Null => Cell::Null,
                            Packed::Int(v) => Cell::Int(v),
                            Packed::Text(a, b) => Cell::Text(texts.get(a..b).context("a stored text is not UTF-8")?),
                        };
                    }
                    each(&cells[..batch.width])?;
                    n += 1;
                }
                // the reader may have finished: then the batch is simply dropped
                let _ = empty_tx.send(batch);
            }
            Ok(())
        };
        let wrote = written();
        let read = reader.join().map_err(|_| anyhow::anyhow!("the ledger's reader thread panicked"))?;
        wrote?;
        read?;
        Ok(n)
    })
}

fn read_export_batches(
    path: &std::path::Path,
    select: &str,
    full: &std::sync::mpsc::SyncSender<Batch>,
    empty: &std::sync::mpsc::Receiver<Batch>,
) -> Result<()> {
    use super::db::Column;
    use rusqlite::OpenFlags;
    let conn = rusqlite::Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI,
    )
    .with_context(|| format!("opening {} to read the ledger", path.display()))?;
    conn.busy_timeout(super::db::sqlite_busy_timeout())?;
    // stepped through the C API: rusqlite's checks per value (column count, type, a ValueRef)
    // were a tenth of this thread's time, and this thread bounds the export
    let mut stmt = super::db::CStatement::prepare(&conn, select)?;
    let width = stmt.width();
    anyhow::ensure!(width <= 32, "the export reads {width} columns, more than 32");
    let fresh = |empty: &std::sync::mpsc::Receiver<Batch>| {
        let mut b = empty.try_recv().unwrap_or_default();
        b.texts.clear();
        b.cells.clear();
        b.width = width;
        b
    };
    let mut batch = fresh(empty);
    while stmt.next_row()? {
        for i in 0..width as i32 {
            batch.cells.push(match stmt.column(i)? {
                Column::Null => Packed::Null,
                Column::Int(v) => Packed::Int(v),
                Column::Text(t) => {
                    let a = batch.texts.len();
                    batch.texts.extend_from_slice(t);
                    Packed::Text(a, batch.texts.len())
                }
                Column::Other(kind) => anyhow::bail!("column {i} of the ledger holds {kind}"),
            });
        }
        if batch.cells.len() >= BATCH_ROWS * width {
            if full.send(batch).is_err() {
                return Ok(()); // the writer stopped; its error is the one reported
            }
            batch = fresh(empty);
        }
    }
    if !batch.cells.is_empty() {
        let _ = full.send(batch);
    }
    Ok(())
}

/// How much of COPY's output the receiving task gathers before handing it to the formatter.
const COPY_BUFFER: usize = 256 * 1024;

/// On PostgreSQL the export is two tasks, as on SQLite two threads: a spawned task receives COPY's
/// output (one protocol message per row) into large buffers and commits the read transaction at
/// the end; the calling task splits them into rows and formats. On one task the client spent as
/// much CPU as the server (2.4 s per 1M lines); now the formatting task about 1.3 s, while the
/// receiving one runs beside it: a server on another host is no longer held back. Whichever side
/// fails stops the other, and the export fails: a COPY that broke off is an error even when every
/// row that arrived was written.
async fn pg_export_rows(
    mut tx: sqlx::Transaction<'static, sqlx::Postgres>,
    select: String,
    each: &mut impl FnMut(&[Cell]) -> Result<()>,
) -> Result<u64> {
    use futures_util::StreamExt;
    use tokio::sync::mpsc;
    let (full_tx, full_rx) = mpsc::channel::<Vec<u8>>(4);
    let (empty_tx, mut empty_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let reader = tokio::spawn(async move {
        {
            let mut stream = tx.copy_out_raw(&format!("COPY ({select}) TO STDOUT")).await?;
            let mut buf = Vec::with_capacity(COPY_BUFFER);
            while let Some(chunk) = stream.next().await {
                buf.extend_from_slice(&chunk?);
                if buf.len() >= COPY_BUFFER {
                    let mut next = empty_rx.try_recv().unwrap_or_else(|_| Vec::with_capacity(COPY_BUFFER));
                    next.clear();
                    if full_tx.send(std::mem::replace(&mut buf, next)).await.is_err() {
                        return Ok(()); // the formatter stopped; its error is the one reported
                    }
                }
            }
            if !buf.is_empty() && full_tx.send(buf).await.is_err() {
                return Ok(());
            }
        }
        tx.commit().await?;
        anyhow::Ok(())
    });
    let formatted = format_copy_buffers(full_rx, &empty_tx, each).await;
    let read = reader.await.map_err(|e| anyhow::anyhow!("the ledger's COPY reader failed: {e}"))?;
    let n = formatted?;
    read?;
    Ok(n)
}

/// Splits COPY's output, as the receiving task buffered it, into rows for `each`; rows cut across
/// two buffers are joined first. Spent buffers go back to the receiver to fill again.
async fn format_copy_buffers(
    mut full: tokio::sync::mpsc::Receiver<Vec<u8>>,
    empty: &tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
    each: &mut impl FnMut(&[Cell]) -> Result<()>,
) -> Result<u64> {
    let mut rows = CopyTextRows::default();
    let mut carry: Vec<u8> = Vec::new();
    let mut n = 0;
    while let Some(buf) = full.recv().await {
        let mut data = &buf[..];
        if !carry.is_empty() {
            let Some(end) = memchr::memchr(b'\n', data) else {
                carry.extend_from_slice(data);
                continue;
            };
            carry.extend_from_slice(&data[..end]);
            rows.parse(&carry, each)?;
            n += 1;
            carry.clear();
            data = &data[end + 1..];
        }
        let mut start = 0;
        for end in memchr::memchr_iter(b'\n', data) {
            rows.parse(&data[start..end], each)?;
            n += 1;
            start = end + 1;
        }
        carry.extend_from_slice(&data[start..]);
        let _ = empty.send(buf); // the receiver may have finished: then the buffer is dropped
    }
    if !carry.is_empty() {
        anyhow::bail!("the ledger's COPY output ended inside a row");
    }
    Ok(n)
}

/// Parses rows of PostgreSQL's COPY text format: tab-separated, `\N` for NULL, backslash
/// escapes. Cells without a backslash are borrowed; escaped ones are decoded into reused buffers.
#[derive(Default)]
struct CopyTextRows {
    decoded: Vec<String>,
}

impl CopyTextRows {
    fn parse(&mut self, line: &[u8], each: &mut impl FnMut(&[Cell]) -> Result<()>) -> Result<()> {
        let line = std::str::from_utf8(line).context("COPY output is not UTF-8")?;
        let mut fields = [""; 32];
        let mut width = 0;
        let mut start = 0;
        for end in memchr::memchr_iter(b'\t', line.as_bytes()).chain([line.len()]) {
            // a tab is ASCII, so both ends are character boundaries
            *fields.get_mut(width).context("a COPY row has too many fields")? = &line[start..end];
            width += 1;
            start = end + 1;
        }
        let escaped = memchr::memchr(b'\\', line.as_bytes()).is_some();
        if escaped {
            if self.decoded.len() < width {
                self.decoded.resize(width, String::new());
            }
            for (field, buf) in fields[..width].iter().zip(self.decoded.iter_mut()) {
                if *field != "\\N" && field.contains('\\') {
                    unescape_copy_text(field, buf)?;
                }
            }
        }
        let mut cells = [Cell::Null; 32];
        for (i, field) in fields[..width].iter().enumerate() {
            cells[i] = if !escaped || !field.contains('\\') {
                Cell::Text(field)
            } else if *field == "\\N" {
                Cell::Null
            } else {
                Cell::Text(&self.decoded[i])
            };
        }
        each(&cells[..width])
    }
}

/// Decodes one field of COPY's text format (the escapes PostgreSQL writes, and octal/hex bytes).
fn unescape_copy_text(field: &str, out: &mut String) -> Result<()> {
    let mut bytes = Vec::with_capacity(field.len());
    let mut it = field.bytes().peekable();
    while let Some(b) = it.next() {
        if b != b'\\' {
            bytes.push(b);
            continue;
        }
        let e = it.next().context("a COPY field ends with a backslash")?;
        bytes.push(match e {
            b'b' => 8,
            b'f' => 12,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'v' => 11,
            b'0'..=b'7' => {
                let mut v = u32::from(e - b'0');
                for _ in 0..2 {
                    match it.peek() {
                        Some(&d @ b'0'..=b'7') => {
                            v = v * 8 + u32::from(d - b'0');
                            it.next();
                        }
                        _ => break,
                    }
                }
                v as u8
            }
            b'x' => {
                let mut v = 0u32;
                for _ in 0..2 {
                    match it.peek().and_then(|&d| (d as char).to_digit(16)) {
                        Some(d) => {
                            v = v * 16 + d;
                            it.next();
                        }
                        None => break,
                    }
                }
                v as u8
            }
            other => other,
        });
    }
    *out = String::from_utf8(bytes).context("a COPY field decodes to invalid UTF-8")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of `n` rows (i, 'r<i>', NULL), the row at `bad` holding a blob instead of text.
    fn rows_file(dir: &std::path::Path, n: i64, bad: Option<i64>) -> std::path::PathBuf {
        let path = dir.join("rows.db");
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE t (i INTEGER, s TEXT, z TEXT); BEGIN").unwrap();
        for i in 0..n {
            if Some(i) == bad {
                conn.execute("INSERT INTO t VALUES (?1, X'01', NULL)", [i]).unwrap();
            } else {
                conn.execute("INSERT INTO t VALUES (?1, 'r' || ?1 || '口', NULL)", [i]).unwrap();
            }
        }
        conn.execute_batch("COMMIT").unwrap();
        path
    }

    /// The two-thread SQLite reader: every row once, in order, texts intact across batches; a
    /// reader failure after batches were written fails the export; a writer failure stops it.
    #[test]
    fn sqlite_export_reader_hands_over_every_row_or_fails() {
        let dir = tempfile::tempdir().unwrap();
        let n = 3 * BATCH_ROWS as i64 + 7;
        let path = rows_file(dir.path(), n, None);
        let mut seen = 0i64;
        let read = sqlite_export_rows(&path, "SELECT i, s, z FROM t ORDER BY i", &mut |c: &[Cell]| {
            assert_eq!(c, [Cell::Int(seen), Cell::Text(&format!("r{seen}口")), Cell::Null]);
            seen += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!((read, seen), (n as u64, n));

        let dir = tempfile::tempdir().unwrap();
        let path = rows_file(dir.path(), n, Some(2 * BATCH_ROWS as i64 + 3));
        let mut seen = 0;
        let err = sqlite_export_rows(&path, "SELECT i, s, z FROM t ORDER BY i", &mut |_: &[Cell]| {
            seen += 1;
            Ok(())
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("column 1 of the ledger holds Blob"), "{err:#}");
        assert!((BATCH_ROWS..=2 * BATCH_ROWS).contains(&seen), "{seen}");

        let mut seen = 0;
        let err = sqlite_export_rows(&path, "SELECT i, s, z FROM t ORDER BY i", &mut |_: &[Cell]| {
            seen += 1;
            anyhow::ensure!(seen < 100, "disk full");
            Ok(())
        })
        .unwrap_err();
        assert_eq!((format!("{err:#}"), seen), ("disk full".to_string(), 100));
    }

    /// Lines of every shape: NULL item and seconds, negative and long-scaled amounts, quotes and
    /// non-ASCII text, a NULL hour (prepaid), revisions.
    fn odd_lines(n: usize) -> Vec<LedgerLine> {
        use crate::billing::model::{BillingMode, TransactionType};
        use std::str::FromStr;
        let d = |s: &str| rust_decimal::Decimal::from_str(s).unwrap();
        (0..n)
            .map(|i| LedgerLine {
                transaction_id: format!("tx_{:027}", n - i),
                transaction_time: 1_704_888_000 + i as i64 % 3,
                account_id: format!("acct'{i}口"),
                resource_id: format!("r\t{i}"),
                product: "KooPhone".into(),
                plan_id: "vm-small".into(),
                billing_mode: if i % 2 == 0 { BillingMode::PayPerUse } else { BillingMode::Yearly },
                transaction_type: if i % 3 == 0 {
                    TransactionType::Usage
                } else {
                    TransactionType::Refund
                },
                billing_item: (i % 2 == 0).then(|| "instance".to_string()),
                period_start: 1_704_880_800,
                period_end: 1_704_884_400 + i as i64,
                usage_seconds: (i % 3 != 1).then_some(3599 - i as i64),
                quantity: d(["2", "0.000001", "1000000000", "0"][i % 4]),
                unit_price: d("0.36"),
                list_amount: d(["0.72000000", "-12.50", "0.00000001", "79228162514264.337593543950"][i % 4]),
                truncated_amount: d("0.00000000"),
                amount_due: d(["0.72", "-12.50", "0.00", "1"][i % 4]),
                paid_amount: d("0.72"),
                arrears_amount: d("-0.00"),
                balance_after: d("-1122.80"),
                currency: "USD".into(),
                hour_start: (i % 2 == 0).then_some(1_704_880_800),
                line_key: format!("[\"usage\",\"r{i}\",\"instance\",1704880800,\"2\"]"),
                revision: i as i64 - 2,
                run_job: "settle".into(),
                run_at: 1_704_888_000,
                explain: "{\"intervals\":[]}\n\ttab".into(),
            })
            .collect()
    }

    /// SQLite posts a batch of lines through the C API on the transaction's own connection, and a
    /// line or two through sqlx: either way every column of every line is stored exactly as the
    /// generic multi-row INSERT through sqlx stores it (values and storage types), the lines
    /// commit with the transaction, and a second posting of a line fails naming it and leaves
    /// nothing of its batch.
    #[tokio::test]
    async fn sqlite_direct_posting_stores_what_sqlx_stores() {
        for n in [super::super::db::DIRECT_FROM_ROWS + 9, 3] {
            let dir = tempfile::tempdir().unwrap();
            let db = Db::connect(&format!("sqlite://{}", dir.path().join("t.db").display()))
                .await
                .unwrap();
            crate::store::schema::migrate(&db).await.unwrap();
            let lines = odd_lines(n);
            let mut tx = db.begin().await.unwrap();
            tx.exec("CREATE TABLE generic AS SELECT * FROM ledger WHERE 0", vec![])
                .await
                .unwrap();
            assert_eq!(post_lines(&mut tx, &lines).await.unwrap(), n as u64);
            let rows = lines.iter().map(line_row).collect();
            tx.insert_rows("generic", line_columns(), rows, "").await.unwrap();
            tx.commit().await.unwrap();
            let dump = |table: &str| {
                let cols: Vec<String> = line_columns().iter().map(|c| format!("quote({c}) || ':' || typeof({c})")).collect();
                let sql = format!("SELECT {} FROM {table} ORDER BY transaction_id", cols.join(" || '|' || "));
                let conn = rusqlite::Connection::open(dir.path().join("t.db")).unwrap();
                let mut stmt = conn.prepare(&sql).unwrap();
                let rows: Vec<String> = stmt.query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect();
                rows
            };
            let (direct, generic) = (dump("ledger"), dump("generic"));
            assert_eq!(direct.len(), n);
            assert_eq!(direct, generic);
            assert!(direct.iter().any(|r| r.contains("'-12.50':text")), "{direct:?}");
            assert!(direct.iter().any(|r| r.contains("NULL:null")), "{direct:?}");
            // read back as lines: the same lines
            for l in &lines {
                assert_eq!(line(&db, &l.transaction_id).await.unwrap().as_ref(), Some(l));
            }
            // a batch holding one line already posted fails whole, naming it
            let mut again = odd_lines(n);
            again[0].transaction_id = "tx_new".into();
            let mut tx = db.begin().await.unwrap();
            let err = post_lines(&mut tx, &again).await.unwrap_err();
            assert!(format!("{err:#}").contains("UNIQUE"), "{err:#}");
            if n >= super::super::db::DIRECT_FROM_ROWS {
                assert!(format!("{err:#}").contains("posting line tx_"), "{err:#}");
            }
            tx.rollback().await.unwrap();
            assert_eq!(line(&db, "tx_new").await.unwrap(), None);
            assert_eq!(dump("ledger").len(), n);
        }
    }

    /// Texts are checked as UTF-8 a batch at a time: a character split across two cells (each
    /// invalid alone, valid together) still fails the export, as does one broken inside a cell;
    /// whole characters at cell edges pass.
    #[test]
    fn sqlite_export_refuses_texts_that_are_not_utf8() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE ok (a TEXT, b TEXT); INSERT INTO ok VALUES ('é', '口x'), ('', 'é');
             CREATE TABLE split (a TEXT, b TEXT); INSERT INTO split VALUES ('x', 'y'), (CAST(X'61C3' AS TEXT), CAST(X'A962' AS TEXT));
             CREATE TABLE broken (a TEXT); INSERT INTO broken VALUES (CAST(X'61FF62' AS TEXT));",
        )
        .unwrap();
        let mut seen = Vec::new();
        let n = sqlite_export_rows(&path, "SELECT a, b FROM ok ORDER BY rowid", &mut |c: &[Cell]| {
            seen.push(format!("{}|{}", c[0].text().unwrap(), c[1].text().unwrap()));
            Ok(())
        })
        .unwrap();
        assert_eq!((n, seen), (2, vec!["é|口x".to_string(), "|é".to_string()]));
        for select in ["SELECT a, b FROM split ORDER BY rowid", "SELECT a FROM broken"] {
            let err = sqlite_export_rows(&path, select, &mut |_: &[Cell]| Ok(())).unwrap_err();
            assert!(format!("{err:#}").contains("not UTF-8"), "{select}: {err:#}");
        }
    }

    #[test]
    fn copy_text_rows_are_decoded() {
        let mut rows = CopyTextRows::default();
        let mut got = Vec::new();
        rows.parse(b"tx_1\t1704880800\t\\N\tacme\\tco\\\\x\t\\303\\251t\t\\xc3\\xa9", &mut |cells| {
            got = cells.iter().map(|c| format!("{c:?}")).collect();
            Ok(())
        })
        .unwrap();
        assert_eq!(
            got,
            [
                "Text(\"tx_1\")",
                "Text(\"1704880800\")",
                "Null",
                "Text(\"acme\\tco\\\\x\")",
                "Text(\"ét\")",
                "Text(\"é\")"
            ]
        );
        assert_eq!(Cell::Text("-5").int().unwrap(), Some(-5));
        assert!(Cell::Text("x").int().is_err());
    }

    /// COPY's output in buffers cut anywhere: rows across two or three buffers are joined, spent
    /// buffers go back, and output that ends inside a row is an error.
    #[tokio::test]
    async fn copy_buffers_are_split_into_rows() {
        let parts: [&[u8]; 6] = [b"a\tb\nc", b"\td", b"\n", b"e\tf\ng\th\ni", b"\tj\n", b"k"];
        let (full_tx, full_rx) = tokio::sync::mpsc::channel(8);
        let (empty_tx, mut empty_rx) = tokio::sync::mpsc::unbounded_channel();
        for p in parts {
            full_tx.send(p.to_vec()).await.unwrap();
        }
        drop(full_tx);
        let mut got = Vec::new();
        let err = format_copy_buffers(full_rx, &empty_tx, &mut |cells| {
            got.push(cells.iter().map(|c| c.text().unwrap().to_string()).collect::<Vec<_>>().join(","));
            Ok(())
        })
        .await
        .unwrap_err();
        assert_eq!(got, ["a,b", "c,d", "e,f", "g,h", "i,j"]);
        assert_eq!(err.to_string(), "the ledger's COPY output ended inside a row");
        let mut returned = 0;
        while empty_rx.try_recv().is_ok() {
            returned += 1;
        }
        assert_eq!(returned, 5, "every buffer but the one that only continued a row");
    }

    /// A line written for COPY parses back, cell by cell, into the values of `line_row` (the
    /// columns' order and the generic INSERT's values): escapes, NULLs, integers and amounts.
    #[test]
    fn copy_rows_hold_the_values_of_line_row() {
        for l in odd_lines(8) {
            let mut buf = String::new();
            copy_line(&mut buf, &l);
            assert!(buf.ends_with('\n') && buf.matches('\n').count() == 1, "{buf:?}");
            let mut rows = CopyTextRows::default();
            let mut got: Vec<Option<String>> = Vec::new();
            rows.parse(buf.trim_end_matches('\n').as_bytes(), &mut |cells| {
                got = cells.iter().map(|c| c.text().map(str::to_string)).collect();
                Ok(())
            })
            .unwrap();
            let want: Vec<Option<String>> = line_row(&l)
                .into_iter()
                .map(|v| match v {
                    Val::Int(i) => i.map(|i| i.to_string()),
                    Val::Money(d) => d.map(|d| d.to_string()),
                    Val::Text(t) => t,
                })
                .collect();
            assert_eq!(got, want);
        }
    }

    #[test]
    fn export_select_quotes_the_account() {
        let f = ExportFilter {
            from: Some(1),
            to: None,
            account: Some("o'brien".into()),
        };
        let sql = export_select(&f);
        assert!(
            sql.contains("transaction_time >= 1 AND transaction_time < 9223372036854775807 AND account_id = 'o''brien'"),
            "{sql}"
        );
    }
}
