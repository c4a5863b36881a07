//! One small database layer over SQLite and PostgreSQL. Values cross it as `Val`: integers (instants
//! are epoch seconds), text, and money, which is NUMERIC on PostgreSQL and exact decimal text on
//! SQLite. SQL is written once with `$N` placeholders (both engines take them); what differs per
//! engine (DDL, claims, bulk paths) is chosen by `Backend`.

use anyhow::{anyhow, bail, Context, Result};
use futures_util::TryStreamExt;
use rust_decimal::Decimal;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, PgPool, Postgres, Row as _, SqlSafeStr, Sqlite, SqlitePool, Transaction};
use std::str::FromStr;
use std::time::Duration;

#[derive(Clone, Debug, PartialEq)]
pub enum Val {
    Int(Option<i64>),
    Text(Option<String>),
    Money(Option<Decimal>),
}

impl From<i64> for Val {
    fn from(v: i64) -> Self {
        Val::Int(Some(v))
    }
}
impl From<Option<i64>> for Val {
    fn from(v: Option<i64>) -> Self {
        Val::Int(v)
    }
}
impl From<&str> for Val {
    fn from(v: &str) -> Self {
        Val::Text(Some(v.to_string()))
    }
}
impl From<String> for Val {
    fn from(v: String) -> Self {
        Val::Text(Some(v))
    }
}
impl From<&String> for Val {
    fn from(v: &String) -> Self {
        Val::Text(Some(v.clone()))
    }
}
impl From<Option<String>> for Val {
    fn from(v: Option<String>) -> Self {
        Val::Text(v)
    }
}
impl From<Decimal> for Val {
    fn from(v: Decimal) -> Self {
        Val::Money(Some(v))
    }
}

/// The type a result column is read as.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    Int,
    Text,
    Money,
}

/// A result row, read by position.
#[derive(Clone, Debug)]
pub struct Row(pub Vec<Val>);

impl Row {
    pub fn int(&self, i: usize) -> i64 {
        self.opt_int(i).unwrap_or_else(|| panic!("column {i} is NULL"))
    }
    pub fn opt_int(&self, i: usize) -> Option<i64> {
        match &self.0[i] {
            Val::Int(v) => *v,
            other => panic!("column {i} is {other:?}, not an integer"),
        }
    }
    pub fn text(&self, i: usize) -> String {
        self.opt_text(i).unwrap_or_else(|| panic!("column {i} is NULL"))
    }
    pub fn opt_text(&self, i: usize) -> Option<String> {
        match &self.0[i] {
            Val::Text(v) => v.clone(),
            other => panic!("column {i} is {other:?}, not text"),
        }
    }
    pub fn money(&self, i: usize) -> Decimal {
        match &self.0[i] {
            Val::Money(Some(v)) => *v,
            other => panic!("column {i} is {other:?}, not money"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Clone, Debug)]
pub enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

pub enum Tx {
    Sqlite(Transaction<'static, Sqlite>),
    Postgres(Transaction<'static, Postgres>),
}

/// The SQLSTATE of a database error somewhere in the chain, if there is one.
pub fn sqlstate(e: &anyhow::Error) -> Option<String> {
    e.chain()
        .find_map(|c| c.downcast_ref::<sqlx::Error>())
        .and_then(|e| e.as_database_error())
        .and_then(|d| d.code())
        .map(|c| c.into_owned())
}

/// The URL with any password replaced, for logs and errors.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{}:***{}", &url[..scheme_end + 3], user, &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

type SqliteQuery = sqlx::query::Query<'static, Sqlite, sqlx::sqlite::SqliteArguments>;
type PgQuery = sqlx::query::Query<'static, Postgres, sqlx::postgres::PgArguments>;

fn bind_sqlite(mut q: SqliteQuery, args: Vec<Val>) -> SqliteQuery {
    for a in args {
        q = match a {
            Val::Int(v) => q.bind(v),
            Val::Text(v) => q.bind(v),
            Val::Money(v) => q.bind(v.map(|d| d.to_string())),
        };
    }
    q
}

fn bind_pg(mut q: PgQuery, args: Vec<Val>) -> PgQuery {
    for a in args {
        q = match a {
            Val::Int(v) => q.bind(v),
            Val::Text(v) => q.bind(v),
            Val::Money(v) => q.bind(v),
        };
    }
    q
}

fn read_sqlite(row: &SqliteRow, kinds: &[Kind]) -> Result<Row> {
    let mut out = Vec::with_capacity(kinds.len());
    for (i, k) in kinds.iter().enumerate() {
        out.push(match k {
            Kind::Int => Val::Int(row.try_get(i)?),
            Kind::Text => Val::Text(row.try_get(i)?),
            Kind::Money => {
                let s: Option<String> = row.try_get(i)?;
                Val::Money(match s {
                    None => None,
                    Some(s) => Some(
                        Decimal::from_str(&s)
                            .or_else(|_| Decimal::from_scientific(&s))
                            .with_context(|| format!("column {i}: `{s}` is not a decimal"))?,
                    ),
                })
            }
        });
    }
    Ok(Row(out))
}

/// From this many rows on, SQLite writes them through [`Tx::sqlite_direct`]: its statement is
/// prepared for the call, where sqlx keeps its own prepared, so a write of a row or two (a
/// purchase at load, a top-up: a million of them in a big load) stays with sqlx.
pub const DIRECT_FROM_ROWS: usize = 32;

/// One prepared SQLite statement driven through the C API, for the statements that run a million
/// times an hour (a ledger line's INSERT) or step a million rows (the export). rusqlite copies
/// every bound text (`SQLITE_TRANSIENT`: an allocation and a copy per value, 1.1 s of a 1M hour);
/// texts that live as long as the statement are bound here without a copy (`SQLITE_STATIC`), which
/// the lifetime `'a` makes sound: the statement, finalized when it drops, cannot outlive what it
/// points to. A row's columns are borrowed until the next step, which needs `&mut self`.
pub(crate) struct CStatement<'a> {
    db: *mut rusqlite::ffi::sqlite3,
    stmt: *mut rusqlite::ffi::sqlite3_stmt,
    /// Amounts' texts, one buffer a parameter, each bound in place (`SQLITE_STATIC`): a buffer is
    /// written again only to bind its parameter again, and SQLite reads a bound text only while
    /// the statement steps.
    amounts: Vec<String>,
    _bound: std::marker::PhantomData<&'a str>,
}

impl<'a> CStatement<'a> {
    pub(crate) fn prepare(conn: &'a rusqlite::Connection, sql: &str) -> Result<Self> {
        use rusqlite::ffi;
        // SAFETY: the handle is the open connection `conn` borrows for 'a
        let db = unsafe { conn.handle() };
        let mut stmt = std::ptr::null_mut();
        // SAFETY: `sql` is valid for its length; `stmt` receives the statement or NULL
        let rc = unsafe {
            ffi::sqlite3_prepare_v3(
                db,
                sql.as_ptr().cast(),
                i32::try_from(sql.len())?,
                ffi::SQLITE_PREPARE_PERSISTENT,
                &mut stmt,
                std::ptr::null_mut(),
            )
        };
        let s = CStatement {
            db,
            stmt,
            amounts: Vec::new(),
            _bound: std::marker::PhantomData,
        };
        s.check(rc).with_context(|| format!("preparing {sql}"))?;
        anyhow::ensure!(!stmt.is_null(), "preparing {sql}: no statement");
        Ok(s)
    }

    fn check(&self, rc: i32) -> Result<()> {
        if rc == rusqlite::ffi::SQLITE_OK {
            return Ok(());
        }
        // SAFETY: `db` is open; the message is copied before any other call on it
        let msg = unsafe { std::ffi::CStr::from_ptr(rusqlite::ffi::sqlite3_errmsg(self.db)) };
        bail!("SQLite error {rc}: {}", msg.to_string_lossy())
    }

    /// Parameter `i` (from 1) is `text`, not copied: it lives as long as the statement.
    pub(crate) fn bind_static(&mut self, i: i32, text: &'a str) -> Result<()> {
        // SAFETY: `text` outlives the statement ('a), so SQLite may keep the pointer
        unsafe { self.bind_text(i, text, rusqlite::ffi::SQLITE_STATIC()) }
    }

    /// Parameter `i` is an amount, stored as its text (`Decimal`'s Display, as sqlx binds money on
    /// SQLite), written into the statement's buffer for that parameter and bound without a copy
    /// (binding with a copy cost SQLite an allocation for each of a line's eight amounts).
    pub(crate) fn bind_decimal(&mut self, i: i32, d: Decimal) -> Result<()> {
        use std::fmt::Write as _;
        let slot = usize::try_from(i)?;
        if self.amounts.len() <= slot {
            self.amounts.resize_with(slot + 1, || String::with_capacity(40));
        }
        let text = &mut self.amounts[slot];
        // rewriting the buffer may move it: SQLite holds the old pointer only until the rebind
        // below, and reads bound texts only while stepping, which no one can do in between
        text.clear();
        let _ = write!(text, "{d}");
        let text: *const str = text.as_str();
        // SAFETY: the buffer stays unchanged until parameter `i` is bound again (only here) and
        // lives as long as the statement, which `Drop` finalizes before the buffers go
        unsafe { self.bind_text(i, &*text, rusqlite::ffi::SQLITE_STATIC()) }
    }

    /// # Safety
    /// With `SQLITE_STATIC`, `text` must stay valid and unchanged until the statement is finalized
    /// or the parameter bound again.
    unsafe fn bind_text(&mut self, i: i32, text: &str, how: rusqlite::ffi::sqlite3_destructor_type) -> Result<()> {
        // SAFETY: a live statement; the text's pointer and length are its own; the caller answers
        // for how long it lives
        let rc = unsafe {
            rusqlite::ffi::sqlite3_bind_text64(
                self.stmt,
                i,
                text.as_ptr().cast(),
                text.len() as u64,
                how,
                rusqlite::ffi::SQLITE_UTF8 as u8,
            )
        };
        self.check(rc)
    }

    pub(crate) fn bind_opt_static(&mut self, i: i32, text: Option<&'a str>) -> Result<()> {
        match text {
            Some(t) => self.bind_static(i, t),
            None => self.bind_null(i),
        }
    }

    pub(crate) fn bind_int(&mut self, i: i32, v: Option<i64>) -> Result<()> {
        match v {
            // SAFETY: a live statement; an integer is copied
            Some(v) => self.check(unsafe { rusqlite::ffi::sqlite3_bind_int64(self.stmt, i, v) }),
            None => self.bind_null(i),
        }
    }

    fn bind_null(&mut self, i: i32) -> Result<()> {
        // SAFETY: a live statement
        self.check(unsafe { rusqlite::ffi::sqlite3_bind_null(self.stmt, i) })
    }

    /// Runs the statement once (a statement that returns no rows) and makes it ready for the
    /// next bindings; returns the rows it changed.
    pub(crate) fn execute(&mut self) -> Result<u64> {
        use rusqlite::ffi;
        // SAFETY: a live statement with its parameters bound
        let rc = unsafe { ffi::sqlite3_step(self.stmt) };
        // the step's error is the one to report; reset returns it again
        let reset = unsafe { ffi::sqlite3_reset(self.stmt) };
        match rc {
            ffi::SQLITE_DONE => {
                self.check(reset)?;
                // SAFETY: `db` is open
                Ok(unsafe { ffi::sqlite3_changes64(self.db) } as u64)
            }
            ffi::SQLITE_ROW => bail!("the statement returned rows"),
            _ => {
                // an error code: check fails with SQLite's message for it
                self.check(rc)?;
                bail!("SQLite step returned {rc}")
            }
        }
    }
}

/// A column of the current row, as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Column<'r> {
    Null,
    Int(i64),
    Text(&'r [u8]),
    /// Another storage class (REAL, BLOB), by its name.
    Other(&'static str),
}

impl CStatement<'_> {
    /// Steps to the next row of a query: false when there are no more.
    pub(crate) fn next_row(&mut self) -> Result<bool> {
        use rusqlite::ffi;
        // SAFETY: a live statement
        match unsafe { ffi::sqlite3_step(self.stmt) } {
            ffi::SQLITE_ROW => Ok(true),
            ffi::SQLITE_DONE => Ok(false),
            rc => {
                self.check(rc)?;
                bail!("SQLite step returned {rc}")
            }
        }
    }

    /// The number of columns a row of this statement has.
    pub(crate) fn width(&self) -> usize {
        // SAFETY: a live statement
        usize::try_from(unsafe { rusqlite::ffi::sqlite3_column_count(self.stmt) }).unwrap_or(0)
    }

    /// Column `i` (from 0, below `width`) of the row `next_row` stepped to.
    pub(crate) fn column(&self, i: i32) -> Result<Column<'_>> {
        use rusqlite::ffi;
        // SAFETY: a live statement on a row; text is read before its length (SQLite's order), and
        // stays valid until the next step, reset or finalize, each of which needs `&mut self`.
        // The value is SQLite's "unprotected" kind, which is sound to read while no other thread
        // uses the connection: the export's is its thread's own (NO_MUTEX), a transaction's is
        // locked away from sqlx's worker while `sqlite_direct` runs
        unsafe {
            // the column's value looked up once, not once per call about it
            let v = ffi::sqlite3_column_value(self.stmt, i);
            Ok(match ffi::sqlite3_value_type(v) {
                ffi::SQLITE_NULL => Column::Null,
                ffi::SQLITE_INTEGER => Column::Int(ffi::sqlite3_value_int64(v)),
                ffi::SQLITE_TEXT => {
                    let p = ffi::sqlite3_value_text(v);
                    let n = usize::try_from(ffi::sqlite3_value_bytes(v)).unwrap_or(0);
                    if p.is_null() {
                        // no text for a TEXT value: SQLite ran out of memory converting it
                        self.check(ffi::sqlite3_errcode(self.db))?;
                        anyhow::ensure!(n == 0, "column {i}: SQLite gave no text");
                        Column::Text(&[])
                    } else {
                        Column::Text(std::slice::from_raw_parts(p, n))
                    }
                }
                ffi::SQLITE_FLOAT => Column::Other("Real"),
                _ => Column::Other("Blob"),
            })
        }
    }
}

impl Drop for CStatement<'_> {
    fn drop(&mut self) {
        // SAFETY: the statement is finalized once, here, before anything it points to goes
        unsafe {
            rusqlite::ffi::sqlite3_finalize(self.stmt);
        }
    }
}

/// Binds `args` as sqlx does: a parameter named `$N` or `?N` takes argument N, a bare `?` the
/// next one. A parameter without its argument is refused (sqlx would bind NULL).
fn bind_direct(stmt: &mut rusqlite::Statement<'_>, args: &[Val]) -> Result<()> {
    let mut next = 0;
    for i in 1..=stmt.parameter_count() {
        let n = match stmt.parameter_name(i) {
            Some(name) => name
                .strip_prefix(['$', '?'])
                .and_then(|d| d.parse::<usize>().ok())
                .with_context(|| format!("parameter {name}: only $N and ? are used"))?,
            None => {
                next += 1;
                next
            }
        };
        let v = n
            .checked_sub(1)
            .and_then(|k| args.get(k))
            .with_context(|| format!("parameter {n} of {} has no argument", args.len()))?;
        match v {
            Val::Int(v) => stmt.raw_bind_parameter(i, v)?,
            Val::Text(v) => stmt.raw_bind_parameter(i, v.as_deref())?,
            Val::Money(v) => stmt.raw_bind_parameter(i, v.map(|d| d.to_string()))?,
        }
    }
    Ok(())
}

/// A row stepped by rusqlite, read by kinds as [`read_sqlite`] reads sqlx's.
fn read_direct(row: &rusqlite::Row<'_>, kinds: &[Kind]) -> Result<Row> {
    use rusqlite::types::ValueRef as V;
    let mut out = Vec::with_capacity(kinds.len());
    for (i, k) in kinds.iter().enumerate() {
        let v = row.get_ref(i)?;
        out.push(match (k, v) {
            (Kind::Int, V::Null) => Val::Int(None),
            (Kind::Int, V::Integer(n)) => Val::Int(Some(n)),
            (Kind::Text, V::Null) => Val::Text(None),
            (Kind::Text, V::Text(t)) => Val::Text(Some(
                std::str::from_utf8(t)
                    .with_context(|| format!("column {i} is not UTF-8"))?
                    .to_owned(),
            )),
            (Kind::Money, V::Null) => Val::Money(None),
            (Kind::Money, V::Text(t)) => {
                let t = std::str::from_utf8(t).with_context(|| format!("column {i} is not UTF-8"))?;
                Val::Money(Some(
                    Decimal::from_str(t)
                        .or_else(|_| Decimal::from_scientific(t))
                        .with_context(|| format!("column {i}: `{t}` is not a decimal"))?,
                ))
            }
            (Kind::Money, V::Integer(n)) => Val::Money(Some(Decimal::from(n))),
            (k, v) => bail!("column {i}: expected {k:?}, the database holds {:?}", v.data_type()),
        });
    }
    Ok(Row(out))
}

fn read_pg(row: &PgRow, kinds: &[Kind]) -> Result<Row> {
    let mut out = Vec::with_capacity(kinds.len());
    for (i, k) in kinds.iter().enumerate() {
        out.push(match k {
            Kind::Int => Val::Int(row.try_get(i)?),
            Kind::Text => Val::Text(row.try_get(i)?),
            Kind::Money => Val::Money(row.try_get(i)?),
        });
    }
    Ok(Row(out))
}

/// How long a SQLite statement waits for another writer's lock before failing with "database is
/// locked": `BILLRUN_SQLITE_BUSY_TIMEOUT_MS`, default 60 s.
pub(crate) fn sqlite_busy_timeout() -> Duration {
    std::env::var("BILLRUN_SQLITE_BUSY_TIMEOUT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(Duration::from_secs(60))
}

impl Db {
    /// Opens `sqlite://PATH` (created if missing, WAL) or `postgres://...`.
    pub async fn connect(url: &str) -> Result<Db> {
        Self::connect_with_lease(url, crate::config::DEFAULT_LEASE_SECONDS).await
    }

    /// As `connect`; on PostgreSQL a session idle inside a transaction for longer than the lease
    /// is ended by the server, so a paused runner cannot hold row locks past its lease.
    pub async fn connect_with_lease(url: &str, lease_seconds: i64) -> Result<Db> {
        let shown = redact_url(url);
        if url.starts_with("sqlite:") {
            let opts = SqliteConnectOptions::from_str(url)
                .map_err(|e| anyhow!("database URL {shown}: {e}"))?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                // FULL: a commit is on disk (the WAL synced) before it returns, so an acknowledged
                // top-up or settled chunk survives a power loss; with NORMAL it could roll back.
                // About 0.16 ms a commit here: nothing for a chunk of 20,000 lines, 0.5 s over
                // the empty year's ~3,000 runs.
                .synchronous(SqliteSynchronous::Full)
                .busy_timeout(sqlite_busy_timeout())
                .foreign_keys(true)
                // 64 MiB page cache: a big hour's inserts stay in memory until commit
                .pragma("cache_size", "-65536")
                .pragma("wal_autocheckpoint", "65536")
                .disable_statement_logging();
            let pool = SqlitePoolOptions::new()
                .max_connections(4)
                // the pool hands connections out in turn, so every connection's page cache would
                // fill to 64 MiB over a long run (two full ones took the 1M hour's peak from 185 to
                // 246-255 MiB): a connection gives its cache back when it returns to the pool
                .after_release(|conn, _| Box::pin(async move { sqlx::query("PRAGMA shrink_memory").execute(conn).await.map(|_| true) }))
                .connect_with(opts)
                .await
                .map_err(|e| anyhow!("cannot open SQLite database {shown}: {e}"))?;
            Ok(Db::Sqlite(pool))
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let opts = PgConnectOptions::from_str(url)
                .map_err(|e| anyhow!("database URL {shown}: {}", strip_secret(&e.to_string(), url)))?
                .application_name("billrun")
                .options([("idle_in_transaction_session_timeout", format!("{}s", lease_seconds.max(1)))]);
            // one direct attempt first, so an unreachable server fails at once with its reason
            let probe = sqlx::postgres::PgConnection::connect_with(&opts)
                .await
                .map_err(|e| anyhow!("cannot connect to PostgreSQL {shown}: {}", strip_secret(&e.to_string(), url)))?;
            probe.close().await.ok();
            let opts = opts.disable_statement_logging();
            let pool = PgPoolOptions::new()
                .max_connections(8)
                .acquire_timeout(Duration::from_secs(30))
                .connect_with(opts)
                .await
                .map_err(|e| anyhow!("cannot connect to PostgreSQL {shown}: {}", strip_secret(&e.to_string(), url)))?;
            Ok(Db::Postgres(pool))
        } else {
            bail!("database URL {shown}: expected sqlite://PATH or postgres://...")
        }
    }

    pub fn backend(&self) -> Backend {
        match self {
            Db::Sqlite(_) => Backend::Sqlite,
            Db::Postgres(_) => Backend::Postgres,
        }
    }

    /// A write transaction. On SQLite it takes the write lock up front (BEGIN IMMEDIATE), so two
    /// writers queue instead of failing on a lock upgrade.
    pub async fn begin(&self) -> Result<Tx> {
        Ok(match self {
            Db::Sqlite(p) => Tx::Sqlite(p.begin_with("BEGIN IMMEDIATE").await?),
            Db::Postgres(p) => Tx::Postgres(p.begin().await?),
        })
    }

    /// A read transaction. On SQLite a deferred `BEGIN`: its snapshot is taken at its first read,
    /// and it never takes the write lock, so it reads beside a writer (WAL) instead of queueing.
    /// Whatever it writes would fail on a lock upgrade: use it for reads only.
    pub async fn begin_read(&self) -> Result<Tx> {
        Ok(match self {
            Db::Sqlite(p) => Tx::Sqlite(p.begin_with("BEGIN").await?),
            Db::Postgres(p) => Tx::Postgres(p.begin().await?),
        })
    }

    pub async fn exec(&self, sql: impl SqlSafeStr, args: Vec<Val>) -> Result<u64> {
        Ok(match self {
            Db::Sqlite(p) => bind_sqlite(sqlx::query(sql), args).execute(p).await?.rows_affected(),
            Db::Postgres(p) => bind_pg(sqlx::query(sql), args).execute(p).await?.rows_affected(),
        })
    }

    pub async fn rows(&self, sql: impl SqlSafeStr, args: Vec<Val>, kinds: &[Kind]) -> Result<Vec<Row>> {
        match self {
            Db::Sqlite(p) => bind_sqlite(sqlx::query(sql), args)
                .fetch_all(p)
                .await?
                .iter()
                .map(|r| read_sqlite(r, kinds))
                .collect(),
            Db::Postgres(p) => bind_pg(sqlx::query(sql), args)
                .fetch_all(p)
                .await?
                .iter()
                .map(|r| read_pg(r, kinds))
                .collect(),
        }
    }

    /// Streams the rows of a query to `each`, one at a time: memory stays flat for any result size.
    pub async fn stream(
        &self,
        sql: impl SqlSafeStr,
        args: Vec<Val>,
        kinds: &[Kind],
        mut each: impl FnMut(Row) -> Result<()>,
    ) -> Result<u64> {
        let mut n = 0;
        match self {
            Db::Sqlite(p) => {
                let mut s = bind_sqlite(sqlx::query(sql), args).fetch(p);
                while let Some(r) = s.try_next().await? {
                    each(read_sqlite(&r, kinds)?)?;
                    n += 1;
                }
            }
            Db::Postgres(p) => {
                let mut s = bind_pg(sqlx::query(sql), args).fetch(p);
                while let Some(r) = s.try_next().await? {
                    each(read_pg(&r, kinds)?)?;
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    pub async fn close(&self) {
        match self {
            Db::Sqlite(p) => p.close().await,
            Db::Postgres(p) => p.close().await,
        }
    }
}

fn strip_secret(msg: &str, url: &str) -> String {
    match url.find("://").zip(url.rfind('@')) {
        Some((s, a)) if a > s => match url[s + 3..a].split_once(':') {
            Some((_, pw)) if !pw.is_empty() => msg.replace(pw, "***"),
            _ => msg.to_string(),
        },
        _ => msg.to_string(),
    }
}

/// Lets SQLite's memory go back to one glibc malloc arena. SQLite calls the C `malloc` on sqlx's
/// worker threads (one a connection), and glibc gives each thread its own arena, which keeps what
/// SQLite freed (a chunk's page cache, its statements) for that thread: a 24-hour catch-up of 100k
/// resources peaked at 300-325 MiB, 197 MiB with one arena, in the same 86 s. SQLite takes its
/// own global mutex around every allocation (its memory statistics are on by default), so more
/// arenas never let its threads allocate at once; billrun's Rust code allocates through mimalloc.
/// Call before the runtime starts. Does nothing off glibc, nor when the operator has chosen
/// for themselves (`MALLOC_ARENA_MAX` set).
pub fn share_one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets a malloc tunable; it is called before any other thread exists
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

/// Most rows one multi-row statement carries: below SQLite's 32,766 and PostgreSQL's 65,535 binds.
pub fn rows_per_statement(columns: usize) -> usize {
    (30_000 / columns.max(1)).clamp(1, 1000)
}

impl Tx {
    pub fn backend(&self) -> Backend {
        match self {
            Tx::Sqlite(_) => Backend::Sqlite,
            Tx::Postgres(_) => Backend::Postgres,
        }
    }

    pub async fn exec(&mut self, sql: impl SqlSafeStr, args: Vec<Val>) -> Result<u64> {
        self.exec_kept(sql, args, true).await
    }

    /// As `exec`; `keep` says whether the prepared statement stays in the connection's cache.
    /// A statement whose text is built for one batch size (the last, shorter batch of a
    /// multi-row write) is run once and not kept: sqlx caches 100 statements a connection, and on
    /// SQLite a cached 27,000-value statement holds its program and its last bound values (about
    /// 2 MB), so a catch-up's many remainder sizes grew the process by over 100 MiB.
    async fn exec_kept(&mut self, sql: impl SqlSafeStr, args: Vec<Val>, keep: bool) -> Result<u64> {
        Ok(match self {
            Tx::Sqlite(t) => bind_sqlite(sqlx::query(sql).persistent(keep), args)
                .execute(&mut **t)
                .await?
                .rows_affected(),
            Tx::Postgres(t) => bind_pg(sqlx::query(sql).persistent(keep), args)
                .execute(&mut **t)
                .await?
                .rows_affected(),
        })
    }

    pub async fn rows(&mut self, sql: impl SqlSafeStr, args: Vec<Val>, kinds: &[Kind]) -> Result<Vec<Row>> {
        self.rows_kept(sql, args, kinds, true).await
    }

    /// As `rows`; `keep` as in `exec_kept`.
    async fn rows_kept(&mut self, sql: impl SqlSafeStr, args: Vec<Val>, kinds: &[Kind], keep: bool) -> Result<Vec<Row>> {
        match self {
            Tx::Sqlite(t) => bind_sqlite(sqlx::query(sql).persistent(keep), args)
                .fetch_all(&mut **t)
                .await?
                .iter()
                .map(|r| read_sqlite(r, kinds))
                .collect(),
            Tx::Postgres(t) => bind_pg(sqlx::query(sql).persistent(keep), args)
                .fetch_all(&mut **t)
                .await?
                .iter()
                .map(|r| read_pg(r, kinds))
                .collect(),
        }
    }

    /// As [`Tx::rows`], for reads of many rows. sqlx's SQLite cost is per value (each is copied,
    /// with an allocation, and handed across its worker thread: about 5 s of a 1M-line hour went
    /// on reading its resources), so on SQLite the statement is stepped through rusqlite on the
    /// transaction's own connection ([`Tx::sqlite_direct`]), each value read straight into its
    /// `Val`. It is prepared afresh on every call, so it is for the few big reads of a run, not for
    /// statements run thousands of times (sqlx keeps those prepared). PostgreSQL reads as `rows`.
    pub async fn rows_bulk(&mut self, sql: impl SqlSafeStr, args: Vec<Val>, kinds: &[Kind]) -> Result<Vec<Row>> {
        if self.backend() == Backend::Postgres {
            return self.rows(sql, args, kinds).await;
        }
        let sql = sql.into_sql_str();
        self.sqlite_direct(|conn| {
            let mut stmt = conn.prepare(sql.as_str())?;
            bind_direct(&mut stmt, &args)?;
            let mut rows = stmt.raw_query();
            let mut out = Vec::new();
            while let Some(r) = rows.next()? {
                out.push(read_direct(r, kinds)?);
            }
            Ok(out)
        })
        .await
    }

    /// Runs `f` with this SQLite transaction's own connection as a rusqlite `Connection`, for the
    /// hot paths whose per-value cost through sqlx bounded them (a big hour's resource reads and
    /// its ledger inserts). The connection is locked away from sqlx's worker thread while `f`
    /// runs, so its statements run inside the transaction exactly as sqlx's do: they commit or
    /// roll back with it. `f` must leave no statement behind (rusqlite finalizes those it
    /// prepared when they drop) and must not end the transaction. On a multi-threaded runtime the
    /// call moves this task's other work to another thread while it blocks.
    pub async fn sqlite_direct<R>(&mut self, f: impl FnOnce(&rusqlite::Connection) -> Result<R>) -> Result<R> {
        let Tx::Sqlite(t) = self else {
            bail!("a direct SQLite call on a PostgreSQL transaction");
        };
        let mut locked = t.lock_handle().await?;
        let handle = locked.as_raw_handle().as_ptr();
        let run = move || -> Result<R> {
            // SAFETY: `locked` guarantees that sqlx's worker makes no call on this handle while
            // it lives (the guard outlives `conn`); `from_handle` neither owns nor closes it, and
            // sqlx and rusqlite link the one libsqlite3-sys, so the handle types are the same.
            let conn = unsafe { rusqlite::Connection::from_handle(handle) }?;
            let out = f(&conn);
            drop(conn);
            out
        };
        let multi = tokio::runtime::Handle::try_current().is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let out = if multi { tokio::task::block_in_place(run) } else { run() };
        drop(locked);
        out
    }

    /// Runs several statements without arguments (migrations).
    pub async fn script(&mut self, sql: &'static str) -> Result<()> {
        match self {
            Tx::Sqlite(t) => {
                sqlx::raw_sql(sql).execute(&mut **t).await?;
            }
            Tx::Postgres(t) => {
                sqlx::raw_sql(sql).execute(&mut **t).await?;
            }
        }
        Ok(())
    }

    /// `INSERT INTO table (columns) VALUES (...), (...) [suffix]` in as few statements as the bind
    /// limits allow. Returns the rows affected.
    pub async fn insert_rows(&mut self, table: &str, columns: &[&str], rows: Vec<Vec<Val>>, suffix: &str) -> Result<u64> {
        let head = format!("INSERT INTO {table} ({}) VALUES ", columns.join(", "));
        self.values_statements(&head, columns.len(), rows, &format!(" {suffix}")).await
    }

    /// Runs `head (..), (..) tail` for each chunk of rows: a multi-row INSERT, or a
    /// `WITH v(cols) AS (VALUES ..) UPDATE .. FROM v` that sets many rows in one statement.
    ///
    /// The next statement is built (text, and on SQLite amounts as text) while the database runs
    /// the current one: sqlx executes on its own thread, so building no longer waits for it.
    pub async fn values_statements(&mut self, head: &str, columns: usize, rows: Vec<Vec<Val>>, tail: &str) -> Result<u64> {
        if let (Tx::Postgres(t), Some(lead)) = (&mut *self, head.strip_suffix("VALUES ")) {
            return unnest_statements(t, lead, columns, rows, tail).await;
        }
        let sqlite = self.backend() == Backend::Sqlite;
        let per = rows_per_statement(columns);
        let build = |chunk: Vec<Vec<Val>>| -> (String, Vec<Val>, bool) {
            // a full batch's text recurs and is worth keeping prepared; a shorter one is run once
            let keep = chunk.len() == per;
            let mut sql = String::with_capacity(head.len() + tail.len() + chunk.len() * columns * 7);
            sql.push_str(head);
            let mut args = Vec::with_capacity(chunk.len() * columns);
            for (r, row) in chunk.into_iter().enumerate() {
                debug_assert_eq!(row.len(), columns);
                sql.push_str(if r == 0 { "(" } else { ", (" });
                for c in 0..columns {
                    if c > 0 {
                        sql.push_str(", ");
                    }
                    // SQLite looks a named `$N` up in a list of all earlier ones (quadratic in a
                    // 27,000-value statement); a plain `?` is O(1), and numbering is positional
                    if sqlite {
                        sql.push('?');
                    } else {
                        sql.push('$');
                        sql.push_str(&(r * columns + c + 1).to_string());
                    }
                }
                sql.push(')');
                if sqlite {
                    // what bind_sqlite would do at bind time, done here where it overlaps
                    args.extend(row.into_iter().map(|v| match v {
                        Val::Money(d) => Val::Text(d.map(|d| d.to_string())),
                        v => v,
                    }));
                } else {
                    args.extend(row);
                }
            }
            sql.push_str(tail);
            (sql, args, keep)
        };
        let mut rows = rows.into_iter().peekable();
        let mut next = rows.peek().is_some().then(|| build(rows.by_ref().take(per).collect()));
        let mut affected = 0;
        while let Some((sql, args, keep)) = next.take() {
            let more: Vec<Vec<Val>> = rows.by_ref().take(per).collect();
            // only identifiers from this crate and numbered placeholders are in the text
            let (done, built) = tokio::join!(self.exec_kept(AssertSqlSafe(sql), args, keep), async {
                (!more.is_empty()).then(|| build(more))
            });
            affected += done?;
            next = built;
        }
        Ok(affected)
    }

    /// `head (k1, k2, ...) tail` for the keys in chunks, results concatenated: a lookup of many ids
    /// in a few statements instead of one per id.
    pub async fn rows_in(&mut self, head: &str, keys: &[String], tail: &str, kinds: &[Kind]) -> Result<Vec<Row>> {
        let mut out = Vec::new();
        const PER: usize = 500;
        for chunk in keys.chunks(PER) {
            let marks: Vec<String> = (1..=chunk.len())
                .map(|i| {
                    if self.backend() == Backend::Sqlite {
                        "?".to_string()
                    } else {
                        format!("${i}")
                    }
                })
                .collect();
            let sql = format!("{head} ({}) {tail}", marks.join(", "));
            let args = chunk.iter().map(|k| Val::from(k.as_str())).collect();
            // identifiers from this crate and numbered placeholders only
            out.extend(self.rows_kept(AssertSqlSafe(sql), args, kinds, chunk.len() == PER).await?);
        }
        Ok(out)
    }

    pub async fn commit(self) -> Result<()> {
        match self {
            Tx::Sqlite(t) => t.commit().await?,
            Tx::Postgres(t) => t.commit().await?,
        }
        Ok(())
    }

    pub async fn rollback(self) -> Result<()> {
        match self {
            Tx::Sqlite(t) => t.rollback().await?,
            Tx::Postgres(t) => t.rollback().await?,
        }
        Ok(())
    }
}

/// Rows a PostgreSQL `UNNEST` statement carries (one array a column, so any number fits).
const UNNEST_ROWS: usize = 5_000;

/// PostgreSQL's form of `values_statements`: `lead SELECT * FROM UNNEST($1::type[], ...) tail`,
/// one array a column (its type that of the column's values), so a statement has as many
/// parameters as columns, and one text whatever the number of rows. With a `VALUES` list of one
/// parameter a value the server spent about 10 µs a notification row parsing and binding 4,000
/// parameters a statement; the same rows from arrays cost what inserting them costs.
async fn unnest_statements(
    t: &mut Transaction<'static, Postgres>,
    lead: &str,
    columns: usize,
    rows: Vec<Vec<Val>>,
    tail: &str,
) -> Result<u64> {
    let Some(first) = rows.first() else { return Ok(0) };
    let kinds: Vec<Kind> = first
        .iter()
        .map(|v| match v {
            Val::Int(_) => Kind::Int,
            Val::Text(_) => Kind::Text,
            Val::Money(_) => Kind::Money,
        })
        .collect();
    if kinds.len() != columns {
        bail!("a row of {} values for {columns} columns", kinds.len());
    }
    let arrays: Vec<String> = kinds
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let ty = match k {
                Kind::Int => "int8",
                Kind::Text => "text",
                Kind::Money => "numeric",
            };
            format!("${}::{ty}[]", i + 1)
        })
        .collect();
    let sql = format!("{lead}SELECT * FROM UNNEST({}){tail}", arrays.join(", "));
    let mut affected = 0;
    let mut rows = rows.into_iter().peekable();
    while rows.peek().is_some() {
        let mut ints: Vec<Vec<Option<i64>>> = vec![Vec::new(); columns];
        let mut texts: Vec<Vec<Option<String>>> = vec![Vec::new(); columns];
        let mut money: Vec<Vec<Option<Decimal>>> = vec![Vec::new(); columns];
        for row in rows.by_ref().take(UNNEST_ROWS) {
            if row.len() != columns {
                bail!("a row of {} values for {columns} columns", row.len());
            }
            for (c, v) in row.into_iter().enumerate() {
                match (kinds[c], v) {
                    (Kind::Int, Val::Int(v)) => ints[c].push(v),
                    (Kind::Text, Val::Text(v)) => texts[c].push(v),
                    (Kind::Money, Val::Money(v)) => money[c].push(v),
                    (k, v) => bail!("column {c} holds {v:?} after values of kind {k:?}"),
                }
            }
        }
        // only identifiers from this crate and numbered placeholders are in the text
        let mut q = sqlx::query(AssertSqlSafe(sql.clone()));
        for (c, k) in kinds.iter().enumerate() {
            q = match k {
                Kind::Int => q.bind(std::mem::take(&mut ints[c])),
                Kind::Text => q.bind(std::mem::take(&mut texts[c])),
                Kind::Money => q.bind(std::mem::take(&mut money[c])),
            };
        }
        affected += q.execute(&mut **t).await?.rows_affected();
    }
    Ok(affected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_shown() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/billing"),
            "postgres://app:***@db:5432/billing"
        );
        assert_eq!(redact_url("postgres://app@db/billing"), "postgres://app@db/billing");
        assert_eq!(redact_url("sqlite://billrun.db"), "sqlite://billrun.db");
        assert_eq!(
            strip_secret("password s3cret rejected", "postgres://a:s3cret@h/d"),
            "password *** rejected"
        );
    }

    /// A new SQLite database in a directory that lives as long as the first value.
    async fn temp_sqlite() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::connect(&format!("sqlite://{}", dir.path().join("t.db").display()))
            .await
            .unwrap();
        (dir, db)
    }

    /// Every connection the SQLite pool hands out commits durably: WAL, synced at each commit.
    #[tokio::test]
    async fn sqlite_connections_commit_durably() {
        let (_dir, db) = temp_sqlite().await;
        let mut held = Vec::new();
        for _ in 0..4 {
            let mut tx = db.begin_read().await.unwrap();
            let mode = tx.rows("PRAGMA journal_mode", vec![], &[Kind::Text]).await.unwrap()[0].text(0);
            let sync = tx.rows("PRAGMA synchronous", vec![], &[Kind::Int]).await.unwrap()[0].int(0);
            assert_eq!((mode.as_str(), sync), ("wal", 2), "connection {}: 2 is FULL", held.len() + 1);
            held.push(tx);
        }
    }

    /// The bundled SQLite is built without a page cache shared by every connection of the process
    /// (`.cargo/config.toml`): a settle chunk's reading and posting connections would take its
    /// mutex for every page.
    #[tokio::test]
    async fn sqlite_page_caches_are_per_connection() {
        let (_dir, db) = temp_sqlite().await;
        let options: Vec<String> = db
            .rows("PRAGMA compile_options", vec![], &[Kind::Text])
            .await
            .unwrap()
            .iter()
            .map(|r| r.text(0))
            .collect();
        assert!(options.iter().any(|o| o == "THREADSAFE=1"), "{options:?}");
        assert!(!options.iter().any(|o| o == "ENABLE_MEMORY_MANAGEMENT"), "{options:?}");
    }

    /// Reads inside a SQLite transaction: `$N` placeholders bind argument N (in any order, used
    /// twice), bare `?` the next one; every kind reads back exactly; a wrong kind names the column.
    #[tokio::test]
    async fn sqlite_reads_in_a_transaction() {
        let (_dir, db) = temp_sqlite().await;
        let mut tx = db.begin().await.unwrap();
        tx.exec("CREATE TABLE t (id TEXT, n INTEGER, amount TEXT)", vec![]).await.unwrap();
        tx.exec(
            "INSERT INTO t VALUES ($1, $2, $3), ('b', NULL, NULL), ('c', 7, '-0.00000001')",
            vec![
                "a'\\N口".into(),
                42.into(),
                Val::Money(Some(Decimal::from_str("1234567.89").unwrap())),
            ],
        )
        .await
        .unwrap();
        // $2 before $1, $1 used twice
        let rows = tx
            .rows(
                "SELECT id, n, amount FROM t WHERE n >= $2 OR id = $1 OR (n IS NULL AND $1 <> '') ORDER BY id",
                vec!["b".into(), 10.into()],
                &[Kind::Text, Kind::Int, Kind::Money],
            )
            .await
            .unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(
            (rows[0].text(0), rows[0].int(1), rows[0].money(2)),
            ("a'\\N口".to_string(), 42, Decimal::from_str("1234567.89").unwrap())
        );
        assert_eq!(
            (rows[1].text(0), rows[1].opt_int(1), rows[1].0[2].clone()),
            ("b".to_string(), None, Val::Money(None))
        );
        // bare `?` placeholders take the arguments in order; a NULL argument binds NULL
        let rows = tx
            .rows(
                "SELECT id, amount FROM t WHERE id IN (?, ?) OR n = ?",
                vec!["c".into(), "zz".into(), Val::Int(None)],
                &[Kind::Text, Kind::Money],
            )
            .await
            .unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].money(1), Decimal::from_str("-0.00000001").unwrap());
        let err = tx
            .rows("SELECT id, amount FROM t", vec![], &[Kind::Int, Kind::Money])
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("column 0"), "{err:#}");
        tx.exec("UPDATE t SET n = n + 1 WHERE id = 'c'", vec![]).await.unwrap();
        tx.commit().await.unwrap();
        let n = db.rows("SELECT n FROM t WHERE id = 'c'", vec![], &[Kind::Int]).await.unwrap();
        assert_eq!(n[0].int(0), 8);
    }

    /// Multi-row writes on SQLite: full statements and the short last one, every kind and NULL,
    /// the rows affected (an insert that skips conflicts, an update from VALUES).
    /// sqlx and the direct path take turns on one connection many thousands of times, in
    /// transactions one after another on the pool, as settlement's chunks do (a hang here was why
    /// session 5 gave the direct path up): every call returns, and every row written either way is
    /// there. `BILLRUN_DIRECT_STRESS` sets the rounds (run by hand with a million).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlx_and_the_direct_path_take_turns_without_hanging() {
        let rounds: usize = std::env::var("BILLRUN_DIRECT_STRESS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20_000);
        let (_dir, db) = temp_sqlite().await;
        db.exec("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)", vec![]).await.unwrap();
        let run = async {
            let mut k = 0i64;
            while (k as usize) < rounds {
                let mut tx = db.begin().await.unwrap();
                for _ in 0..1000 {
                    tx.exec("INSERT INTO t VALUES ($1, 'sqlx')", vec![k.into()]).await.unwrap();
                    let n = tx
                        .sqlite_direct(|conn| {
                            conn.execute("INSERT INTO t VALUES (?1, 'direct')", [k + 1])?;
                            Ok(conn.query_row("SELECT max(k) FROM t", [], |r| r.get::<_, i64>(0))?)
                        })
                        .await
                        .unwrap();
                    assert_eq!(n, k + 1);
                    let rows = tx
                        .rows_bulk("SELECT v FROM t WHERE k = $1", vec![k.into()], &[Kind::Text])
                        .await
                        .unwrap();
                    assert_eq!(rows[0].text(0), "sqlx");
                    k += 2;
                }
                tx.commit().await.unwrap();
            }
            k
        };
        let k = tokio::time::timeout(Duration::from_secs(600), run)
            .await
            .expect("a call never returned");
        let n = db.rows("SELECT count(*) FROM t", vec![], &[Kind::Int]).await.unwrap();
        assert_eq!(n[0].int(0), k);
    }

    /// A bulk read (rusqlite on the transaction's connection) returns exactly what the plain read
    /// through sqlx returns: texts that look like JSON or numbers stay texts, NULLs stay NULL,
    /// integers and amounts exact; it sees the transaction's own uncommitted rows; parameters bind
    /// as sqlx binds them; a wrong kind or a missing argument is an error naming it.
    #[tokio::test]
    async fn sqlite_bulk_rows_equal_plain_rows() {
        let (_dir, db) = temp_sqlite().await;
        let mut tx = db.begin().await.unwrap();
        tx.exec("CREATE TABLE t (id TEXT, n INTEGER, amount TEXT, doc TEXT)", vec![])
            .await
            .unwrap();
        let texts = ["007", "{\"a\": [1, 2]}", "say \"hi\"\\n", "口\u{1F600}", "", "null", "1e5"];
        for (i, t) in texts.iter().enumerate() {
            tx.exec(
                "INSERT INTO t VALUES ($1, $2, $3, $4)",
                vec![
                    (*t).into(),
                    Val::Int((i % 3 != 1).then_some(i64::MAX - i as i64)),
                    Val::Money((i % 2 == 0).then(|| Decimal::from_str("-12345678901.00000001").unwrap())),
                    Val::Text((i % 4 != 3).then(|| t.to_string())),
                ],
            )
            .await
            .unwrap();
        }
        let kinds = [Kind::Text, Kind::Int, Kind::Money, Kind::Text];
        let rest = "FROM t WHERE n IS NULL OR n > $1 ORDER BY id";
        let plain = tx
            .rows(AssertSqlSafe(format!("SELECT id, n, amount, doc {rest}")), vec![0.into()], &kinds)
            .await
            .unwrap();
        let packed = tx
            .rows_bulk(AssertSqlSafe(format!("SELECT id, n, amount, doc {rest}")), vec![0.into()], &kinds)
            .await
            .unwrap();
        assert_eq!(plain.len(), texts.len());
        assert_eq!(
            packed.iter().map(|r| &r.0).collect::<Vec<_>>(),
            plain.iter().map(|r| &r.0).collect::<Vec<_>>()
        );
        let err = tx.rows_bulk("SELECT id FROM t", vec![], &[Kind::Int]).await.unwrap_err();
        assert!(format!("{err:#}").contains("column 0"), "{err:#}");
        // $2 before $1, $1 twice; then bare `?` in order
        let sql = "SELECT id, n FROM t WHERE (n > $2 AND id <> $1) OR id = $1 ORDER BY id";
        let args = || vec!["007".into(), Val::Int(Some(i64::MAX - 3))];
        let kinds = [Kind::Text, Kind::Int];
        let bulk = tx.rows_bulk(sql, args(), &kinds).await.unwrap();
        let plain = tx.rows(sql, args(), &kinds).await.unwrap();
        assert_eq!(
            bulk.iter().map(|r| &r.0).collect::<Vec<_>>(),
            plain.iter().map(|r| &r.0).collect::<Vec<_>>()
        );
        assert_eq!(bulk.iter().map(|r| r.text(0)).collect::<Vec<_>>(), ["007", "say \"hi\"\\n"]);
        let q = "SELECT id FROM t WHERE id IN (?, ?) ORDER BY id";
        let bulk = tx.rows_bulk(q, vec!["1e5".into(), "".into()], &[Kind::Text]).await.unwrap();
        assert_eq!(bulk.iter().map(|r| r.text(0)).collect::<Vec<_>>(), ["", "1e5"]);
        let err = tx.rows_bulk(sql, vec!["007".into()], &kinds).await.unwrap_err();
        assert!(format!("{err:#}").contains("parameter 2 of 1 has no argument"), "{err:#}");
        // nothing was committed: another connection sees no table
        tx.rollback().await.unwrap();
        assert!(db.rows("SELECT id FROM t", vec![], &[Kind::Text]).await.is_err());
    }
}
