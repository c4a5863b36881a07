//! Settlement runs, split into chunks of accounts. A run is planned once (its hours, the hours
//! awaiting re-settlement with their generation, and chunk boundaries) and the plan is
//! committed with the run's row; each chunk then settles its accounts' usage for every hour of the
//! run in its own transaction, claimed with a lease like a run, so several replicas settle one big
//! hour in parallel and a crash loses one chunk's work at most. The last step (exactly once, by
//! whichever runner sees every chunk done) clears the re-settled hours, advances the watermark and
//! records the run as done. Per account, lines and balances do not depend on the chunking.

use super::db::{Backend, Db, Kind, Tx};
use super::ledger;
use super::packages;
use super::runs::{self, Claim, ClaimResult, LeaseKeeper};
use super::world::{all_plans, lock_books, record_arrears_events, resource_of, save_accounts, SETTLE_JOB};
use crate::billing::lifecycle::{arrears_transitions, unbillable_windows, ArrearsPeriod};
use crate::billing::model::{LedgerLine, MeteredResource, Plan, UsageSegment};
use crate::billing::packages::{count_drafts, is_count_key, CycleQuota, PostedCount};
use crate::billing::settle::{chunk_bucket, desired_usage, post_drafts, reconcile, AccountBook, ArrearsEvent, PostedUsage, Unbillable};
use crate::billing::zone::BillingZone;
use crate::clock;
use crate::store::subscriptions::arrears_periods;
use anyhow::{anyhow, bail, Context, Result};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// Lines kept in an outcome for display (a settle --hour, the demo); the rest are only counted.
pub const SHOWN_LINES: usize = 200;

/// The default chunk on PostgreSQL: about this many pay-per-use resources per transaction (and
/// per claim the replicas share out; two chunks are settled at once).
pub const DEFAULT_CHUNK_RESOURCES: usize = 20_000;

/// The default chunk on SQLite. One writer settles one chunk at a time there, computing each part
/// while the part before is posted; between two chunks that overlap stops (the first part is
/// computed with nothing to post, the last posted and committed with nothing to compute), so the
/// fewer the chunks the longer both cores work. Measured on copies of one loaded 1M world
/// (session 18, five alternating pairs): chunks of 20,000 in 8 parts 8.6-11.4 s, of 100,000 in 40
/// parts 7.45-9.53 s. A chunk's lines are not kept once posted (`Tally`), so its memory is its
/// accounts' books and the parts on their way.
pub const SQLITE_CHUNK_RESOURCES: usize = 100_000;

/// Unless set, a SQLite chunk is computed in parts of about this many resources (20,000: 8
/// parts, session 16's default; 100,000: 40).
pub const RESOURCES_PER_PART: usize = 2_500;

/// Chunks a runner settles at once on PostgreSQL: two keep both of a small server's cores busy
/// (one chunk's client work beside another's writes); more only queue on two cores.
pub const DEFAULT_CHUNK_WORKERS: usize = 2;

/// The most parts a chunk is computed in.
pub const MAX_CHUNK_PARTS: usize = 64;

/// The job_state row holding the last hour any settle run has planned (loads mark hours up to it
/// for re-settlement, since a run in progress may not see their data).
pub const HORIZON: &str = "settle:horizon";

/// Which run this is: a scheduled run of the settle job, or an operator's `settle --hour`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SettleRun {
    pub job: String,
    /// The run's instant: the transaction time of every line it posts.
    pub at: i64,
    /// Hours this run settles (besides dirty hours, for scheduled runs).
    pub hours: Vec<i64>,
    /// Scheduled runs also re-settle every hour marked dirty and advance the watermark.
    pub scheduled: bool,
    pub dry_run: bool,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct SettleOutcome {
    /// Another runner had already done this run (this process posted nothing for it).
    pub skipped: bool,
    /// Runs recorded: 1, or more when a span of runs with nothing to settle was recorded at once.
    pub runs: usize,
    pub hours: Vec<i64>,
    /// Chunks this process settled, of `chunks_total`.
    pub chunks: usize,
    pub chunks_total: usize,
    /// Lines this process posted (or would post, dry run) and their amount due.
    pub lines: usize,
    pub amount_due: Decimal,
    /// The first SHOWN_LINES of them.
    pub shown: Vec<LedgerLine>,
    pub arrears_began: Vec<String>,
}

impl SettleOutcome {
    /// Adds what another worker of the same run settled.
    fn merge(&mut self, o: SettleOutcome) {
        self.chunks += o.chunks;
        self.lines += o.lines;
        self.amount_due += o.amount_due;
        let room = SHOWN_LINES.saturating_sub(self.shown.len());
        self.shown.extend(o.shown.into_iter().take(room));
        self.arrears_began.extend(o.arrears_began);
    }

    /// One chunk's outcome.
    fn of_chunk(c: ChunkOutcome) -> SettleOutcome {
        SettleOutcome {
            chunks: 1,
            lines: c.posted.lines,
            amount_due: c.posted.amount_due,
            shown: c.posted.shown,
            arrears_began: c.arrears_began,
            ..Default::default()
        }
    }
}

/// What a chunk posted, tallied part by part as it is posted: counted, summed, and the first
/// SHOWN_LINES kept (copied into a buffer of their own). A chunk's lines themselves are not kept:
/// they were, until its end, and a run kept every chunk's outcome until its own end (session 13:
/// a 1M hour on SQLite peaked at 560-600 MiB instead of 125 when each outcome held on to its
/// chunk's buffer), and bigger chunks (SQLite's default since session 18) would hold 100,000.
#[derive(Clone, Debug, Default)]
struct Tally {
    lines: usize,
    amount_due: Decimal,
    shown: Vec<LedgerLine>,
}

impl Tally {
    fn add(&mut self, lines: &[LedgerLine]) {
        self.lines += lines.len();
        self.amount_due += lines.iter().map(|l| l.amount_due).sum::<Decimal>();
        let room = SHOWN_LINES.saturating_sub(self.shown.len()).min(lines.len());
        if room > 0 {
            self.shown.reserve_exact(room);
            self.shown.extend(lines[..room].iter().cloned());
        }
    }
}

/// What a run settles, fixed when the run is first claimed and stored with its row, so every
/// runner (and every attempt) settles the same chunks.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettlePlan {
    /// Every hour settled: the run's own hours and the dirty ones, in order.
    pub hours: Vec<i64>,
    /// The run's own hours (the watermark advances to the last).
    pub run_hours: Vec<i64>,
    /// Hours awaiting re-settlement when the run was planned, with their generation: cleared at
    /// the end only if no load marked them again meanwhile.
    pub dirty: Vec<(i64, i64)>,
    /// Chunk boundaries in (bucket, account id) order (see [`ChunkRange::Keys`]): chunk 0 is below
    /// keys[0], chunk k is [keys[k-1], keys[k]), the last is from the last key up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<Vec<ChunkKey>>,
    /// A plan stored by a build before migration 10: account-id boundaries, laid out as `keys`.
    /// Such a run is finished the way it was planned. (New plans have no `bounds`, so an older
    /// build refuses to continue one instead of reading its keys as account ids.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bounds: Option<Vec<String>>,
    /// The pay-per-use resources the chunks were cut from (plans from before session 18: None),
    /// which sizes the parts a chunk is computed in on SQLite.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<usize>,
}

/// A chunk boundary: an account's [`chunk_bucket`](crate::billing::settle::chunk_bucket) and id.
pub type ChunkKey = (i64, String);

/// The accounts of one chunk, half-open; `None` is unbounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkRange<'a> {
    /// By (bucket, account id): the order metered ids are in, so a chunk's lines are inserted
    /// together into the ledger's indexes.
    Keys(Option<&'a ChunkKey>, Option<&'a ChunkKey>),
    /// By account id: plans made before migration 10.
    Accounts(Option<&'a str>, Option<&'a str>),
}

impl ChunkRange<'_> {
    /// The range as its chunk's row records it when the chunk is done.
    fn to_json(self) -> serde_json::Value {
        match self {
            ChunkRange::Keys(lo, hi) => serde_json::json!({ "keys": [lo, hi] }),
            ChunkRange::Accounts(lo, hi) => serde_json::json!({ "accounts": [lo, hi] }),
        }
    }
}

impl SettlePlan {
    pub fn chunks(&self) -> usize {
        match (&self.keys, &self.bounds) {
            (Some(keys), _) => keys.len() + 1,
            (None, Some(bounds)) => bounds.len() + 1,
            (None, None) => 1,
        }
    }

    fn range(&self, k: usize) -> ChunkRange<'_> {
        match (&self.keys, &self.bounds) {
            (None, Some(bounds)) => ChunkRange::Accounts(k.checked_sub(1).map(|i| bounds[i].as_str()), bounds.get(k).map(String::as_str)),
            (keys, _) => {
                let keys = keys.as_deref().unwrap_or_default();
                ChunkRange::Keys(k.checked_sub(1).map(|i| &keys[i]), keys.get(k))
            }
        }
    }
}

/// The SQL of [`chunk_bucket`](crate::billing::settle::chunk_bucket) over column `col`. Migration
/// 10's indexes are on exactly this expression (with `account_id`), which is what lets a chunk's
/// reads search them; a test pins both to the Rust function on both backends.
pub fn bucket_sql(backend: Backend, col: &str) -> String {
    match backend {
        Backend::Sqlite => format!(
            "((COALESCE(unicode(substr({col}, -1, 1)), 0) + 31 * COALESCE(unicode(substr({col}, -2, 1)), 0) \
             + 961 * COALESCE(unicode(substr({col}, -3, 1)), 0) + 29791 * COALESCE(unicode(substr({col}, -4, 1)), 0)) % 65536)"
        ),
        // substr before the first character is '' and ascii('') is 0
        Backend::Postgres => format!(
            "((ascii(substr({col}, length({col}), 1))::bigint + 31 * ascii(substr({col}, length({col}) - 1, 1))::bigint \
             + 961 * ascii(substr({col}, length({col}) - 2, 1))::bigint + 29791 * ascii(substr({col}, length({col}) - 3, 1))::bigint) % 65536)"
        ),
    }
}

pub use super::runs::chunk_job;

/// How far a run got in this process.
#[derive(Clone, Debug, PartialEq)]
pub enum Progress {
    /// The run is done (by this process, others, or both).
    Done(SettleOutcome),
    /// A part of it is held by another runner until its lease expires.
    Held { job: String, owner: String, lease_until: i64 },
    /// Shutdown was requested between chunks; what was done is committed.
    Interrupted(SettleOutcome),
}

/// What the run needs besides its identity.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Pay-per-use resources a chunk (None: the backend's default).
    pub chunk_resources: Option<usize>,
    pub lease_seconds: i64,
    /// Chunks settled at once on PostgreSQL (SQLite: one at a time).
    pub workers: usize,
    /// Parts a chunk is computed in on SQLite while the part before is posted (1: none; None: one
    /// for every RESOURCES_PER_PART resources of a chunk).
    pub parts: Option<usize>,
}

impl Limits {
    /// The chunk size a run planned on `backend` uses.
    pub fn chunk_resources(&self, backend: Backend) -> usize {
        self.chunk_resources.unwrap_or(match backend {
            Backend::Sqlite => SQLITE_CHUNK_RESOURCES,
            Backend::Postgres => DEFAULT_CHUNK_RESOURCES,
        })
    }

    /// The parts each chunk of `plan` is computed in on SQLite: as set, or one for every
    /// RESOURCES_PER_PART resources of an average chunk. A run of fewer resources than that (most
    /// hours of a small provider) is computed whole, without a second connection and a task of
    /// its own. A plan stored by a build before session 18 does not say how many resources it
    /// holds: it is parted as that build parted it (a chunk of a multi-chunk run in 8).
    fn parts(&self, plan: &SettlePlan) -> usize {
        let chunks = plan.chunks();
        let set = match (self.parts, plan.resources) {
            // an older build computed a run of one chunk whole, and parted others in 8 by default
            (_, None) if chunks == 1 => 1,
            (None, None) => 8,
            (Some(p), _) => p,
            (None, Some(n)) => n.div_ceil(chunks).div_ceil(RESOURCES_PER_PART),
        };
        set.clamp(1, MAX_CHUNK_PARTS)
    }
}

/// Runs a settle run to its end: claims it (planning it if first), settles every chunk it can
/// claim, and records the run as done once every chunk is.
pub async fn run(db: &Db, zone: &BillingZone, run: &SettleRun, limits: Limits) -> Result<Progress> {
    if run.dry_run {
        return dry_run(db, zone, run, limits).await;
    }
    let plan = match runs::claim(db, &run.job, run.at, limits.lease_seconds).await? {
        ClaimResult::Claimed(c) => {
            // planning may wait for a load: keep the claim meanwhile
            let keeper = (db.backend() == Backend::Postgres).then(|| LeaseKeeper::start(db, &c, limits.lease_seconds));
            let planned = prepare(db, zone, run, &c, limits.chunk_resources(db.backend())).await;
            drop(keeper);
            match planned {
                Ok(plan) => plan,
                Err(e) => {
                    // give the run back at once rather than make the others wait out the lease
                    if let Err(release_error) = runs::release(db, &c).await {
                        tracing::warn!(error = %format!("{release_error:#}"), "could not release the claim of a run that failed to plan");
                    }
                    return Err(e.context("planning the run"));
                }
            }
        }
        ClaimResult::Open(detail) => serde_json::from_str(&detail).with_context(|| format!("the stored plan of {}@{}", run.job, run.at))?,
        ClaimResult::Done => {
            return Ok(Progress::Done(SettleOutcome {
                skipped: true,
                ..Default::default()
            }))
        }
        ClaimResult::Held { owner, lease_until } => {
            return Ok(Progress::Held {
                job: run.job.clone(),
                owner,
                lease_until,
            })
        }
    };
    let mut out = SettleOutcome {
        runs: 1,
        hours: plan.hours.clone(),
        chunks_total: plan.chunks(),
        ..Default::default()
    };
    // PostgreSQL runs several chunks at once, each in its own transaction on its own connection,
    // as replicas do (chunks hold disjoint accounts, so they never wait on each other); SQLite
    // has one writer, and its chunks' `BEGIN IMMEDIATE` would only queue
    let workers = match db.backend() {
        Backend::Postgres => limits.workers.max(1),
        Backend::Sqlite => 1,
    };
    let parts = limits.parts(&plan);
    // a chunk released by a failed runner can be claimed again at once: look a few times
    for _ in 0..3 {
        let ends = runs::run_chunks(db, &run.job, run.at, plan.chunks(), workers, limits.lease_seconds, async |k, c| {
            settle_chunk(db, zone, run, &plan, k, Some(c), parts)
                .await
                .map(SettleOutcome::of_chunk)
        })
        .await;
        for (_, one) in ends.done {
            out.merge(one);
        }
        if let Some((k, e)) = ends.failed {
            return Err(e.context(format!("chunk {} of {}", k + 1, plan.chunks())));
        }
        if ends.interrupted {
            return Ok(Progress::Interrupted(out));
        }
        if let Some((_, job, owner, lease_until)) = ends.held {
            return Ok(Progress::Held { job, owner, lease_until });
        }
        if finalize(db, zone, run, &plan).await? {
            return Ok(Progress::Done(out));
        }
        if runs::is_done(db, &run.job, run.at).await? {
            out.skipped = out.chunks == 0;
            return Ok(Progress::Done(out));
        }
    }
    bail!("{}@{}: chunks kept becoming free again; giving the run up for now", run.job, run.at)
}

/// A dry run: the same plan and chunks, each in a transaction that is rolled back.
async fn dry_run(db: &Db, zone: &BillingZone, run: &SettleRun, limits: Limits) -> Result<Progress> {
    let mut tx = db.begin().await?;
    let plan = plan_of(&mut tx, run, limits.chunk_resources(db.backend())).await?;
    tx.rollback().await?;
    let mut out = SettleOutcome {
        runs: 1,
        hours: plan.hours.clone(),
        chunks_total: plan.chunks(),
        ..Default::default()
    };
    for k in 0..plan.chunks() {
        out.merge(SettleOutcome::of_chunk(settle_chunk(db, zone, run, &plan, k, None, 1).await?));
    }
    Ok(Progress::Done(out))
}

/// Reads what a run settles.
async fn plan_of(tx: &mut Tx, run: &SettleRun, chunk_resources: usize) -> Result<SettlePlan> {
    let dirty: Vec<(i64, i64)> = tx
        .rows(
            "SELECT hour_start, gen FROM dirty_hours ORDER BY hour_start",
            vec![],
            &[Kind::Int, Kind::Int],
        )
        .await?
        .iter()
        .map(|r| (r.int(0), r.int(1)))
        .filter(|(h, _)| run.scheduled || run.hours.contains(h))
        .collect();
    let mut hours: Vec<i64> = run.hours.iter().copied().chain(dirty.iter().map(|d| d.0)).collect();
    hours.sort_unstable();
    hours.dedup();
    // every chunk_resources-th pay-per-use resource in (bucket, account) order starts a chunk
    let bucket = bucket_sql(tx.backend(), "account_id");
    let every = chunk_resources.max(1);
    let (mut keys, resources): (Vec<ChunkKey>, Option<usize>) = match tx.backend() {
        // SQLite walks the chunk index in its order and numbers the rows here: its window
        // function took 2 s over 1M resources, the walk 0.3 s
        Backend::Sqlite => {
            let sql = format!(
                "SELECT {bucket}, account_id FROM resources WHERE mode = 'pay_per_use' OR ppu_from IS NOT NULL ORDER BY {bucket}, account_id"
            );
            tx.sqlite_direct(|conn| {
                let mut stmt = conn.prepare(&sql)?;
                let mut rows = stmt.raw_query();
                let (mut keys, mut n) = (Vec::new(), 0usize);
                while let Some(r) = rows.next()? {
                    n += 1;
                    if n.is_multiple_of(every) {
                        keys.push((r.get(0)?, r.get(1)?));
                    }
                }
                Ok((keys, Some(n)))
            })
            .await?
        }
        // (the parts a chunk is computed in are SQLite's only)
        Backend::Postgres => (
            tx.rows(
                sqlx::AssertSqlSafe(format!(
                    "SELECT b, account_id FROM (SELECT {bucket} AS b, account_id, ROW_NUMBER() OVER (ORDER BY {bucket}, account_id) AS rn \
                     FROM resources WHERE mode = 'pay_per_use' OR ppu_from IS NOT NULL) x WHERE rn % $1 = 0 ORDER BY b, account_id"
                )),
                vec![(every as i64).into()],
                &[Kind::Int, Kind::Text],
            )
            .await?
            .iter()
            .map(|r| (r.int(0), r.text(1)))
            .collect(),
            None,
        ),
    };
    keys.dedup();
    Ok(SettlePlan {
        hours,
        run_hours: run.hours.clone(),
        dirty,
        keys: Some(keys),
        bounds: None,
        resources,
    })
}

/// Plans a run this process has just claimed and records the plan with the run's row (only while
/// the claim holds). Loads wait for this transaction, so every load either commits before the run
/// reads anything or sees the new horizon and marks its hours for re-settlement.
async fn prepare(db: &Db, zone: &BillingZone, run: &SettleRun, claim: &Claim, chunk_resources: usize) -> Result<SettlePlan> {
    let mut tx = runs::begin_work(db, claim).await?;
    lock_horizon(&mut tx, true).await?;
    let plan = plan_of(&mut tx, run, chunk_resources).await?;
    if let (true, Some(&last)) = (run.scheduled, run.hours.iter().max()) {
        advance(&mut tx, HORIZON, last).await?;
    }
    runs::open(&mut tx, claim, &serde_json::to_string(&plan)?).await?;
    tx.commit().await?;
    tracing::debug!(job = %run.job, run = %zone.format(run.at), hours = plan.hours.len(), chunks = plan.chunks(), "planned a settle run");
    Ok(plan)
}

/// Serialises planning with loads on PostgreSQL (SQLite writers are serialised already): planning
/// takes the lock exclusively, loads share it.
///
/// Planning waits for loads as long as they take, but not silently: every
/// `PLAN_LOCK_WARN_SECONDS` it logs a warning naming the sessions with a transaction open since
/// before its own began (a load stopped in the middle of a statement holds the lock until its
/// process goes on or dies, and no server timeout ends that).
pub(crate) async fn lock_horizon(tx: &mut Tx, exclusive: bool) -> Result<()> {
    if tx.backend() != Backend::Postgres {
        return Ok(());
    }
    if !exclusive {
        tx.rows(
            "SELECT value FROM meta WHERE key = 'settle_plan_lock' FOR SHARE",
            vec![],
            &[Kind::Text],
        )
        .await?;
        return Ok(());
    }
    // uncontended (nearly always): taken in one statement; SKIP LOCKED returns no row instead of
    // waiting or failing when a load holds the lock
    let taken = tx
        .rows(
            "SELECT value FROM meta WHERE key = 'settle_plan_lock' FOR UPDATE SKIP LOCKED",
            vec![],
            &[Kind::Text],
        )
        .await?;
    if !taken.is_empty() {
        return Ok(());
    }
    let previous = tx.rows("SELECT current_setting('lock_timeout')", vec![], &[Kind::Text]).await?[0].text(0);
    tx.exec(
        sqlx::AssertSqlSafe(format!("SET LOCAL lock_timeout = '{PLAN_LOCK_WARN_SECONDS}s'")),
        vec![],
    )
    .await?;
    let started = std::time::Instant::now();
    loop {
        tx.exec("SAVEPOINT plan_lock", vec![]).await?;
        match tx
            .rows(
                "SELECT value FROM meta WHERE key = 'settle_plan_lock' FOR UPDATE",
                vec![],
                &[Kind::Text],
            )
            .await
        {
            Ok(_) => break,
            Err(e) if super::db::sqlstate(&e).as_deref() == Some(LOCK_NOT_AVAILABLE) => {
                tx.exec("ROLLBACK TO SAVEPOINT plan_lock", vec![]).await?;
                let waited = started.elapsed().as_secs() as i64;
                let holders = tx
                    .rows(
                        "SELECT COALESCE(string_agg(format('pid %s (%s, %s%s, transaction open %s s)', pid, application_name, state, \
                         ', waiting on ' || wait_event, EXTRACT(EPOCH FROM now() - xact_start)::BIGINT), '; ' ORDER BY xact_start), '') \
                         FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() AND xact_start <= now()",
                        vec![],
                        &[Kind::Text],
                    )
                    .await?[0]
                    .text(0);
                tracing::warn!(
                    waited_seconds = waited,
                    holders = %holders,
                    "planning a settle run waits for the settlement plan lock, held by a load (or another session) that has not finished"
                );
            }
            Err(e) => return Err(e),
        }
    }
    tx.exec("RELEASE SAVEPOINT plan_lock", vec![]).await?;
    tx.exec("SELECT set_config('lock_timeout', $1, true)", vec![previous.into()])
        .await?;
    Ok(())
}

/// How long planning waits for the plan lock between two warnings.
const PLAN_LOCK_WARN_SECONDS: i64 = 10;
/// PostgreSQL's SQLSTATE for a lock wait that reached `lock_timeout`.
const LOCK_NOT_AVAILABLE: &str = "55P03";

/// Moves a job_state value forward (never back).
async fn advance(tx: &mut Tx, job: &str, to: i64) -> Result<()> {
    tx.exec(
        "INSERT INTO job_state (job, watermark) VALUES ($1, $2) ON CONFLICT (job) DO UPDATE SET watermark = excluded.watermark WHERE job_state.watermark < excluded.watermark",
        vec![job.into(), to.into()],
    )
    .await?;
    Ok(())
}

/// What one chunk posted.
#[derive(Clone, Debug, Default)]
struct ChunkOutcome {
    posted: Tally,
    arrears_began: Vec<String>,
}

/// The condition that the account in column `col` is in a chunk's range (`AND ...`, parameters from
/// `$first`), with its arguments.
pub fn range_sql(backend: Backend, col: &str, range: ChunkRange<'_>, first: usize) -> (String, Vec<super::db::Val>) {
    let mut sql = String::new();
    let mut args = Vec::new();
    let mut n = first;
    match range {
        ChunkRange::Keys(lo, hi) => {
            let b = bucket_sql(backend, col);
            // the bucket alone as well: SQLite searches an index on (bucket, account) for a range
            // of its first column, but scans all of it for a row-value range
            if let Some((bucket, account)) = lo {
                sql.push_str(&format!(" AND {b} >= ${n} AND ({b}, {col}) >= (${n}, ${})", n + 1));
                args.extend([(*bucket).into(), account.as_str().into()]);
                n += 2;
            }
            if let Some((bucket, account)) = hi {
                sql.push_str(&format!(" AND {b} <= ${n} AND ({b}, {col}) < (${n}, ${})", n + 1));
                args.extend([(*bucket).into(), account.as_str().into()]);
            }
        }
        ChunkRange::Accounts(lo, hi) => {
            if let Some(lo) = lo {
                sql.push_str(&format!(" AND {col} >= ${n}"));
                args.push(lo.into());
                n += 1;
            }
            if let Some(hi) = hi {
                sql.push_str(&format!(" AND {col} < ${n}"));
                args.push(hi.into());
            }
        }
    }
    (sql, args)
}

/// What a chunk's computation carries from hour to hour, and the chunk's writes save at its end.
struct ChunkBooks {
    books: HashMap<String, AccountBook>,
    events: Vec<ArrearsEvent>,
    quotas: HashMap<(String, String), Vec<CycleQuota>>,
    /// Each package cycle's units drawn before the chunk: only cycles that moved are saved.
    drawn_before: HashMap<(String, i64), Decimal>,
}

/// How a chunk's computation went: its parts an hour, and how long it took, reading from the
/// database and in all.
#[derive(Clone, Copy, Default)]
struct Computed {
    parts: usize,
    read: std::time::Duration,
    total: std::time::Duration,
}

/// Settles chunk `k` of a run for every hour of the plan in one transaction, which commits only
/// while `claim` holds (None: a dry run, rolled back).
///
/// On SQLite the chunk's client work runs beside its posting: the lines are computed part by part
/// (`parts` ranges of buckets an hour) by a task reading through a read transaction on
/// another connection, while this transaction posts the part before. That read transaction takes
/// its snapshot after this one has taken the write lock (`BEGIN IMMEDIATE`) and before it commits,
/// so no other writer can have committed in between and it sees exactly what this transaction saw
/// before its first write; and nothing a chunk reads is written by the chunk itself until its
/// lines are computed (books, package cycles and events are carried in memory). The lines,
/// balances and order of posting are the same as computing the whole chunk first: per account
/// nothing depends on how the accounts are parted, as nothing depends on the chunking.
async fn settle_chunk(
    db: &Db,
    zone: &BillingZone,
    run: &SettleRun,
    plan: &SettlePlan,
    k: usize,
    claim: Option<&Claim>,
    parts: usize,
) -> Result<ChunkOutcome> {
    let range = plan.range(k);
    let mut tally = Tally::default();
    let Some(claim) = claim.filter(|_| !run.dry_run) else {
        let mut tx = db.begin().await?;
        let mut lines: Vec<LedgerLine> = Vec::new();
        let (cb, _) = compute_chunk(&mut tx, zone, run, plan, range, 1, Parts::Collect(&mut lines)).await?;
        tx.rollback().await?;
        tally.add(&lines);
        return Ok(ChunkOutcome::new(tally, &cb.events));
    };
    let mut tx = runs::begin_work(db, claim).await?;
    let started = std::time::Instant::now();
    let mut post = std::time::Duration::ZERO;
    let overlapped = tx.backend() == Backend::Sqlite && parts > 1 && matches!(range, ChunkRange::Keys(..));
    let (cb, computed) = if overlapped {
        let (send, mut recv) = tokio::sync::mpsc::channel::<Vec<LedgerLine>>(2);
        let (db2, zone2, run2, plan2) = (db.clone(), *zone, run.clone(), plan.clone());
        let computing = tokio::spawn(async move {
            let mut rtx = db2.begin_read().await?;
            let out = compute_chunk(&mut rtx, &zone2, &run2, &plan2, plan2.range(k), parts, Parts::Send(send)).await?;
            rtx.rollback().await?;
            anyhow::Ok(out)
        });
        let posting = async {
            while let Some(part) = recv.recv().await {
                let t = std::time::Instant::now();
                ledger::post_lines(&mut tx, &part).await?;
                post += t.elapsed();
                tally.add(&part);
            }
            anyhow::Ok(())
        }
        .await;
        // a failed posting ends the computation at its next part
        drop(recv);
        let computing = computing.await;
        posting?;
        computing.map_err(|e| anyhow!("the chunk's computation did not finish: {e}"))??
    } else {
        let mut lines: Vec<LedgerLine> = Vec::new();
        let out = compute_chunk(&mut tx, zone, run, plan, range, 1, Parts::Collect(&mut lines)).await?;
        let t = std::time::Instant::now();
        ledger::post_lines(&mut tx, &lines).await?;
        post = t.elapsed();
        tally.add(&lines);
        out
    };
    let posted = started.elapsed();
    let changed: Vec<_> = cb.books.values().filter(|b| b.changed).map(|b| &b.account).collect();
    save_accounts(&mut tx, changed).await?;
    packages::save_cycles(
        &mut tx,
        cb.quotas
            .values()
            .flatten()
            .filter(|c| cb.drawn_before.get(&(c.package_id.clone(), c.cycle)) != Some(&c.used)),
    )
    .await?;
    record_arrears_events(&mut tx, &cb.events).await?;
    runs::finish(&mut tx, claim, tally.lines, tally.amount_due, range.to_json()).await?;
    let saved = started.elapsed();
    tx.commit().await?;
    let ms = |d: std::time::Duration| d.as_millis() as u64;
    tracing::debug!(
        job = %run.job,
        chunk = k + 1,
        of = plan.chunks(),
        lines = tally.lines,
        overlapped,
        parts = computed.parts,
        read_ms = ms(computed.read),
        compute_ms = ms(computed.total.saturating_sub(computed.read)),
        post_ms = ms(post),
        // overlapped: the wall time until the last part was posted; otherwise the three above
        until_posted_ms = ms(posted),
        save_ms = ms(saved - posted),
        commit_ms = ms(started.elapsed() - saved),
        "settled a chunk"
    );
    Ok(ChunkOutcome::new(tally, &cb.events))
}

impl ChunkOutcome {
    fn new(posted: Tally, events: &[ArrearsEvent]) -> ChunkOutcome {
        ChunkOutcome {
            arrears_began: events
                .iter()
                .filter_map(|e| match e {
                    ArrearsEvent::Began { account_id, .. } => Some(account_id.clone()),
                    ArrearsEvent::Cleared { .. } => None,
                })
                .collect(),
            posted,
        }
    }
}

/// Computes the lines of the chunk `range` for every hour of the plan from what `tx` reads, in up
/// to `parts` ranges of buckets an hour, and hands each part's lines to `sink` in (hour, bucket)
/// order, which is the order of their ids: posting the parts one after another inserts the lines
/// as one sorted posting of them all does.
async fn compute_chunk(
    tx: &mut Tx,
    zone: &BillingZone,
    run: &SettleRun,
    plan: &SettlePlan,
    range: ChunkRange<'_>,
    parts: usize,
    mut sink: Parts<'_>,
) -> Result<(ChunkBooks, Computed)> {
    let started = std::time::Instant::now();
    let mut read = std::time::Duration::ZERO;
    let plans = all_plans(tx).await?;
    let periods = arrears_periods(tx).await?;
    // the chunk's accounts, read (and on PostgreSQL locked, in id order) in one statement; later
    // hours of the run continue from their balance
    let (cond, extra) = range_sql(tx.backend(), "account_id", range, 1);
    let books = lock_books(
        tx,
        &format!("SELECT account_id FROM resources WHERE (mode = 'pay_per_use' OR ppu_from IS NOT NULL){cond}"),
        extra,
    )
    .await?;
    // the prepaid package cycles these accounts' units may draw from, over the run's hours
    let quotas = match (plan.hours.iter().min(), plan.hours.iter().max()) {
        (Some(&first), Some(&last)) => packages::chunk_cycles(tx, &plans, range, first, zone.next_hour(last)).await?,
        _ => HashMap::new(),
    };
    let drawn_before = quotas
        .values()
        .flatten()
        .map(|c| ((c.package_id.clone(), c.cycle), c.used))
        .collect();
    let segment_span = super::world::segment_span(tx).await?;
    read += started.elapsed();
    let mut cb = ChunkBooks {
        books,
        events: Vec::new(),
        quotas,
        drawn_before,
    };
    let bounds = part_bounds(range, parts);
    let parted = parts_of(range, &bounds);
    for &hour in &plan.hours {
        for &part in &parted {
            let ctx = HourContext {
                zone,
                hour,
                range: part,
                plans: &plans,
                run,
                periods: &periods,
                segment_span,
            };
            let lines = settle_hour(tx, &ctx, &mut cb.books, &mut cb.events, &mut cb.quotas, &mut read).await?;
            if !lines.is_empty() {
                sink.take(lines).await?;
            }
        }
    }
    Ok((
        cb,
        Computed {
            parts: parted.len(),
            read,
            total: started.elapsed(),
        },
    ))
}

/// Where a chunk's computed lines go, a part at a time.
enum Parts<'a> {
    /// Into one list, posted once the whole chunk is computed.
    Collect(&'a mut Vec<LedgerLine>),
    /// To the transaction posting them, part by part.
    Send(tokio::sync::mpsc::Sender<Vec<LedgerLine>>),
}

impl Parts<'_> {
    async fn take(&mut self, lines: Vec<LedgerLine>) -> Result<()> {
        match self {
            Parts::Collect(all) => all.extend(lines),
            Parts::Send(to) => to.send(lines).await.map_err(|_| anyhow!("the chunk's posting stopped"))?,
        }
        Ok(())
    }
}

/// Keys that cut a chunk's range of (bucket, account) keys into up to `parts` ranges of whole
/// buckets: `(bucket, "")` sorts before every account of its bucket. None for a range of account
/// ids (a plan from before migration 10), or when `parts` is 1.
fn part_bounds(range: ChunkRange<'_>, parts: usize) -> Vec<ChunkKey> {
    let ChunkRange::Keys(lo, hi) = range else {
        return Vec::new();
    };
    let first = lo.map_or(0, |k| k.0);
    let last = hi.map_or(i64::from(u16::MAX), |k| k.0);
    let parts = parts.max(1) as i64;
    let mut out: Vec<ChunkKey> = Vec::new();
    for i in 1..parts {
        let b = first + (last - first) * i / parts;
        if b > first && out.last().is_none_or(|p| p.0 < b) {
            out.push((b, String::new()));
        }
    }
    out
}

/// The ranges `bounds` cut `range` into, in order; `range` itself when there are none.
fn parts_of<'a>(range: ChunkRange<'a>, bounds: &'a [ChunkKey]) -> Vec<ChunkRange<'a>> {
    let ChunkRange::Keys(lo, hi) = range else {
        return vec![range];
    };
    let mut edges = vec![lo];
    edges.extend(bounds.iter().map(Some));
    edges.push(hi);
    edges.windows(2).map(|w| ChunkRange::Keys(w[0], w[1])).collect()
}

/// Records the run as done once all its chunks are: exactly once (the guarded update decides),
/// with the re-settled hours cleared (unless marked again since), the watermark advanced and
/// pay-per-use arrears transitions recorded. False if a chunk is not done or another runner did it.
async fn finalize(db: &Db, zone: &BillingZone, run: &SettleRun, plan: &SettlePlan) -> Result<bool> {
    let mut tx = db.begin().await?;
    let names: Vec<String> = (0..plan.chunks()).map(|k| chunk_job(&run.job, k)).collect();
    let done = tx
        .rows_in(
            "SELECT lines, amount_due FROM job_runs WHERE job IN",
            &names,
            &format!("AND scheduled_at = {} AND outcome = 'ok'", run.at),
            &[Kind::Int, Kind::Money],
        )
        .await?;
    if done.len() != plan.chunks() {
        tx.rollback().await?;
        return Ok(false);
    }
    let lines: i64 = done.iter().map(|r| r.int(0)).sum();
    let amount: Decimal = done.iter().map(|r| r.money(1)).sum();
    let n = tx
        .exec(
            "UPDATE job_runs SET outcome = 'ok', finished_at = $3, lines = $4, amount_due = $5, detail = $6 \
             WHERE job = $1 AND scheduled_at = $2 AND outcome = 'chunked'",
            vec![
                run.job.clone().into(),
                run.at.into(),
                clock::wall_now().into(),
                lines.into(),
                amount.into(),
                serde_json::json!({"hours": plan.hours, "chunks": plan.chunks()}).to_string().into(),
            ],
        )
        .await?;
    if n == 0 {
        tx.rollback().await?;
        return Ok(false);
    }
    for (h, gen) in &plan.dirty {
        tx.exec(
            "DELETE FROM dirty_hours WHERE hour_start = $1 AND gen = $2",
            vec![(*h).into(), (*gen).into()],
        )
        .await?;
    }
    if run.scheduled {
        crate::store::subscriptions::ppu_arrears_transitions(&mut tx, zone, run.at).await?;
        if let Some(&last) = plan.run_hours.iter().max() {
            advance(&mut tx, SETTLE_JOB, last).await?;
        }
    }
    tx.commit().await?;
    Ok(true)
}

/// What settling one hour of a chunk reads but does not change.
struct HourContext<'a> {
    zone: &'a BillingZone,
    hour: i64,
    range: ChunkRange<'a>,
    plans: &'a HashMap<String, Plan>,
    run: &'a SettleRun,
    periods: &'a HashMap<String, Vec<ArrearsPeriod>>,
    /// The longest usage segment loaded: an hour's segments start at most this long before it.
    segment_span: i64,
}

async fn settle_hour(
    tx: &mut Tx,
    ctx: &HourContext<'_>,
    books: &mut HashMap<String, AccountBook>,
    events: &mut Vec<ArrearsEvent>,
    quotas: &mut HashMap<(String, String), Vec<CycleQuota>>,
    read: &mut std::time::Duration,
) -> Result<Vec<LedgerLine>> {
    let HourContext {
        zone,
        hour,
        range,
        plans,
        run,
        periods,
        segment_span,
    } = *ctx;
    let end = zone.next_hour(hour);
    let reading = std::time::Instant::now();
    // pay-per-use from creation (or from a change to pay-per-use) until deletion or release
    let (cond, extra) = range_sql(tx.backend(), "account_id", range, 3);
    let bucket = bucket_sql(tx.backend(), "account_id");
    let rows = tx
        .rows_bulk(
            sqlx::AssertSqlSafe(format!(
                "SELECT id, account_id, plan_id, quantity, created_at, deleted_at, ppu_from, released_at, {bucket} FROM resources \
                 WHERE (mode = 'pay_per_use' OR ppu_from IS NOT NULL) AND created_at < $2 AND (ppu_from IS NULL OR ppu_from < $2) \
                 AND (deleted_at IS NULL OR deleted_at > $1) AND (released_at IS NULL OR released_at > $1){cond}"
            )),
            [vec![hour.into(), end.into()], extra].concat(),
            &[
                Kind::Text,
                Kind::Text,
                Kind::Text,
                Kind::Int,
                Kind::Int,
                Kind::Int,
                Kind::Int,
                Kind::Int,
                Kind::Int,
            ],
        )
        .await?;
    // The lines posted here carry their account's bucket as computed in Rust, and later chunk
    // reads find them by the bucket the database computes (hour_lines_sql): the two must agree,
    // or a rerun would not see a line and could post it again under another key. A test pins the
    // two functions to each other; this refuses the chunk, loudly, should they ever differ.
    for r in &rows {
        if let super::db::Val::Text(Some(account)) = &r.0[1] {
            let ours = chunk_bucket(account);
            if r.int(8) != i64::from(ours) {
                bail!(
                    "account {account:?}: the database computes chunk bucket {} but billrun {ours}; refusing to settle",
                    r.int(8)
                );
            }
        }
    }
    let resources: HashMap<String, MeteredResource> = rows
        .iter()
        .map(|r| {
            let mut m = resource_of(r);
            if let Some(from) = r.opt_int(6) {
                m.created_at = m.created_at.max(from);
            }
            if let Some(released) = r.opt_int(7) {
                m.deleted_at = Some(m.deleted_at.map_or(released, |d| d.min(released)));
            }
            (m.id.clone(), m)
        })
        .collect();
    drop(rows);
    let (cond, extra) = range_sql(tx.backend(), "r.account_id", range, 4);
    let segments: Vec<UsageSegment> = tx
        .rows_bulk(
            sqlx::AssertSqlSafe(format!(
                "SELECT s.resource_id, s.item, s.quantity, s.from_at, s.to_at FROM usage_segments s JOIN resources r ON r.id = s.resource_id \
                 WHERE s.superseded = 0 AND s.from_at < $2 AND s.from_at >= $3 AND s.to_at > $1{cond}"
            )),
            [vec![hour.into(), end.into(), (hour - segment_span).into()], extra].concat(),
            &[Kind::Text, Kind::Text, Kind::Money, Kind::Int, Kind::Int],
        )
        .await?
        .iter()
        .map(|r| UsageSegment {
            resource_id: r.text(0),
            item: r.text(1),
            quantity: r.money(2),
            from: r.int(3),
            to: r.int(4),
        })
        .collect();
    let posted_lines = ledger::hour_lines(tx, hour, range).await?;
    *read += reading.elapsed();
    // an account in arrears past its grace days has its pay-per-use resources frozen, then released
    let mut unbillable = Unbillable::new();
    for (account_id, list) in periods {
        let Some(book) = books.get(account_id) else { continue };
        let windows = unbillable_windows(&arrears_transitions(
            zone,
            list,
            book.account.grace_days,
            book.account.retention_days,
        ));
        if windows.is_empty() {
            continue;
        }
        for r in resources.values().filter(|r| &r.account_id == account_id) {
            unbillable.insert(r.id.clone(), windows.clone());
        }
    }
    let desired =
        desired_usage(zone, hour, plans, &resources, &segments, &unbillable).map_err(|e| anyhow!("hour {}: {e}", zone.format(hour)))?;

    let mut posted: HashMap<String, PostedUsage> = HashMap::new();
    let mut posted_counts: HashMap<String, PostedCount> = HashMap::new();
    let mut counted: BTreeMap<(String, String), Vec<(i64, Decimal)>> = BTreeMap::new();
    for l in posted_lines {
        if is_count_key(&l.line_key) {
            let item = l.billing_item.as_deref().unwrap_or_default();
            let base = item.split('@').next().unwrap_or(item).to_string();
            counted.entry((l.resource_id.clone(), base)).or_default();
            let p = posted_counts.entry(l.line_key.clone()).or_default();
            p.quantity += l.quantity;
            p.list_amount += l.list_amount;
            p.amount_due += l.amount_due;
            p.lines += 1;
            p.period_start = l.period_start;
            p.period_end = l.period_end;
            continue;
        }
        let p = PostedUsage {
            resource_id: l.resource_id.clone(),
            item: l.billing_item.clone().unwrap_or_default(),
            hour_start: hour,
            quantity: l.quantity,
            unit_price: l.unit_price,
            period_start: l.period_start,
            period_end: l.period_end,
            seconds: l.usage_seconds.unwrap_or(0),
            list_amount: l.list_amount,
            amount_due: l.amount_due,
            lines: 1,
        };
        match posted.get_mut(&l.line_key) {
            Some(acc) => acc.add(&p),
            None => {
                posted.insert(l.line_key, p);
            }
        }
    }
    let mut drafts = reconcile(&desired, &posted);
    // count-metered units: drawn from the valid package cycles first, the rest billed
    let reading = std::time::Instant::now();
    let counts = packages::hour_counts(tx, hour, end, range).await?;
    *read += reading.elapsed();
    for (resource_id, item, at, units) in counts {
        let billable = resources
            .get(&resource_id)
            .is_some_and(|r| r.created_at <= at && r.deleted_at.is_none_or(|d| at < d))
            && !unbillable
                .get(&resource_id)
                .is_some_and(|w| w.iter().any(|&(s, e)| s <= at && e.is_none_or(|e| at < e)));
        if billable {
            counted.entry((resource_id, item)).or_default().push((at, units));
        }
    }
    for ((resource_id, item), counts) in counted {
        let Some(price) = resources
            .get(&resource_id)
            .and_then(|r| plans.get(&r.plan_id))
            .and_then(|p| p.per_unit.get(&item))
        else {
            continue;
        };
        let cycles = quotas
            .get_mut(&(resource_id.clone(), item.clone()))
            .map(Vec::as_mut_slice)
            .unwrap_or_default();
        drafts.extend(
            count_drafts(&resource_id, &item, hour, end, *price, &counts, cycles, &posted_counts)
                .map_err(|e| anyhow!("hour {}: {e}", zone.format(hour)))?,
        );
    }
    if drafts.is_empty() {
        return Ok(vec![]);
    }
    let context = |id: &str| resources.get(id).and_then(|r| plans.get(&r.plan_id).map(|p| (r, p)));
    post_drafts(drafts, context, books, run.at, &run.job, events).map_err(|e| anyhow!("hour {}: {e}", zone.format(hour)))
}

/// The statement that finds whether anything is to be settled in the hours `first..=last` (ending
/// at `end`), with its arguments: one row if anything is, none if not (a BIGINT: PostgreSQL's plain
/// `1` is an `int4`, which [`Kind::Int`] does not read). `span` is the longest usage segment. Each branch stops at its first row: a busy span (any catch-up of two runs or more at
/// provider scale) is known at once, where counting read every running pay-per-use resource and,
/// for lack of an index on `hour_start`, the whole ledger. Posted lines are looked up as
/// [`hour_lines_sql`](super::ledger::hour_lines_sql) does: current metered ids lead with their
/// hour, so the span's lines are one range of the unique id index (the row keeps the exact hour
/// condition, as hours of a half-hour zone share their id prefix with a neighbour); older ids are
/// in the partial index `ledger_hour_legacy`.
pub fn span_busy_sql(first: i64, last: i64, end: i64, span: i64) -> (String, Vec<super::db::Val>) {
    use crate::billing::settle::{metered_id_range, METERED_ID_LEN};
    let (lo, _) = metered_id_range(first, None, None);
    let (_, hi) = metered_id_range(last, None, None);
    let sql = format!(
        "SELECT CAST(1 AS BIGINT) WHERE EXISTS (SELECT 1 FROM resources WHERE (mode = 'pay_per_use' OR ppu_from IS NOT NULL) AND created_at < $2 \
         AND (ppu_from IS NULL OR ppu_from < $2) AND (deleted_at IS NULL OR deleted_at > $1) AND (released_at IS NULL OR released_at > $1)) \
         OR EXISTS (SELECT 1 FROM usage_segments WHERE superseded = 0 AND from_at < $2 AND from_at >= $3 AND to_at > $1) \
         OR EXISTS (SELECT 1 FROM usage_counts WHERE superseded = 0 AND at >= $1 AND at < $2) \
         OR EXISTS (SELECT 1 FROM dirty_hours) \
         OR EXISTS (SELECT 1 FROM ledger WHERE transaction_id >= $4 AND transaction_id < $5 \
           AND length(transaction_id) = {METERED_ID_LEN} AND hour_start >= $1 AND hour_start < $2) \
         OR EXISTS (SELECT 1 FROM ledger WHERE hour_start >= $1 AND hour_start < $2 AND length(transaction_id) <> {METERED_ID_LEN})"
    );
    (sql, vec![first.into(), end.into(), (first - span).into(), lo.into(), hi.into()])
}

/// Records a span of consecutive scheduled runs that have nothing to settle in one transaction:
/// no pay-per-use resource or usage overlaps their hours, nothing is posted there and no hour
/// awaits re-settlement. Each run still gets its own row. Returns false (and changes nothing) if
/// the span is not empty after all or another runner got to one of the runs first.
pub async fn record_empty_runs(db: &Db, zone: &BillingZone, runs: &[(i64, Vec<i64>)]) -> Result<bool> {
    let hours: Vec<i64> = runs.iter().flat_map(|(_, h)| h.iter().copied()).collect();
    let (Some(&first), Some(&last)) = (hours.iter().min(), hours.iter().max()) else {
        return Ok(false);
    };
    let end = zone.next_hour(last);
    let mut tx = db.begin().await?;
    lock_horizon(&mut tx, true).await?;
    let span = super::world::segment_span(&mut tx).await?;
    let (sql, args) = span_busy_sql(first, last, end, span);
    let busy = !tx.rows(sqlx::AssertSqlSafe(sql), args, &[Kind::Int]).await?.is_empty();
    if busy {
        tx.rollback().await?;
        return Ok(false);
    }
    let now = clock::wall_now();
    let rows = runs
        .iter()
        .map(|(at, h)| {
            vec![
                SETTLE_JOB.into(),
                (*at).into(),
                "ok".into(),
                now.into(),
                now.into(),
                serde_json::json!({"hours": h, "empty": true}).to_string().into(),
            ]
        })
        .collect();
    let inserted = tx
        .insert_rows(
            "job_runs",
            &["job", "scheduled_at", "outcome", "started_at", "finished_at", "detail"],
            rows,
            "ON CONFLICT (job, scheduled_at) DO NOTHING",
        )
        .await?;
    if inserted != runs.len() as u64 {
        tx.rollback().await?;
        return Ok(false);
    }
    advance(&mut tx, SETTLE_JOB, last).await?;
    advance(&mut tx, HORIZON, last).await?;
    let last_run = runs.last().map(|(at, _)| *at).unwrap_or(end);
    crate::store::subscriptions::ppu_arrears_transitions(&mut tx, zone, last_run).await?;
    tx.commit().await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::model::{BillingMode, LedgerLine, TransactionType};

    fn line(i: usize) -> LedgerLine {
        LedgerLine {
            transaction_id: format!("T{i:08}"),
            transaction_time: 0,
            account_id: "acct".into(),
            resource_id: format!("r{i}"),
            product: "ecs".into(),
            plan_id: "p".into(),
            billing_mode: BillingMode::PayPerUse,
            transaction_type: TransactionType::Usage,
            billing_item: None,
            period_start: 0,
            period_end: 3600,
            usage_seconds: Some(3600),
            quantity: Decimal::ONE,
            unit_price: Decimal::new(12, 2),
            list_amount: Decimal::new(12, 2),
            truncated_amount: Decimal::new(12, 2),
            amount_due: Decimal::new(12, 2),
            paid_amount: Decimal::new(12, 2),
            arrears_amount: Decimal::ZERO,
            balance_after: Decimal::ZERO,
            currency: "CNY".into(),
            hour_start: Some(0),
            line_key: format!("k{i}"),
            revision: 0,
            run_job: "settle".into(),
            run_at: 3600,
            explain: "{}".into(),
        }
    }

    /// A run keeps every chunk's outcome until it ends, so an outcome must not hold on to the
    /// chunk's lines: only SHOWN_LINES of them, in a buffer of that size, however the chunk's
    /// parts were cut.
    #[test]
    fn a_chunk_outcome_keeps_only_the_lines_it_shows() {
        let n = 5_000;
        let all: Vec<LedgerLine> = (0..n).map(line).collect();
        let mut posted = Tally::default();
        for part in [&all[..150], &all[150..151], &all[151..2_000], &all[2_000..]] {
            posted.add(part);
        }
        let one = SettleOutcome::of_chunk(ChunkOutcome {
            posted,
            arrears_began: vec![],
        });
        assert_eq!(one.lines, n);
        assert_eq!(one.amount_due, Decimal::new(12, 2) * Decimal::from(n));
        assert_eq!(one.shown.len(), SHOWN_LINES);
        assert_eq!(one.shown[SHOWN_LINES - 1].transaction_id, format!("T{:08}", SHOWN_LINES - 1));
        assert!(one.shown.capacity() <= SHOWN_LINES, "kept room for {} lines", one.shown.capacity());
    }

    /// Unless set, a chunk on SQLite is computed in a part for every RESOURCES_PER_PART resources
    /// of an average chunk of its run, at most MAX_CHUNK_PARTS; a run of RESOURCES_PER_PART or
    /// fewer is computed whole; a plan stored before session 18 (no count) is parted as that
    /// build parted it; a set number is used as it is.
    #[test]
    fn parts_follow_the_size_of_a_chunk() {
        let plan = |chunks: usize, resources: Option<usize>| SettlePlan {
            keys: Some((1..chunks).map(|b| (b as i64, String::new())).collect()),
            resources,
            ..Default::default()
        };
        let limits = |parts: Option<usize>| Limits {
            chunk_resources: None,
            lease_seconds: 60,
            workers: 2,
            parts,
        };
        assert_eq!(limits(None).chunk_resources(Backend::Sqlite), 100_000);
        assert_eq!(limits(None).chunk_resources(Backend::Postgres), 20_000);
        for (chunks, resources, parts) in [
            (10, Some(1_000_000), 40),
            (1, Some(100_000), 40),
            (51, Some(1_000_000), 8),
            (1, Some(2_500), 1),
            (1, Some(2_501), 2),
            (1, Some(0), 1),
            (1, Some(10_000_000), 64),
            (4, None, 8),
            (1, None, 1),
        ] {
            assert_eq!(
                limits(None).parts(&plan(chunks, resources)),
                parts,
                "{chunks} chunks of {resources:?}"
            );
        }
        assert_eq!(limits(Some(3)).parts(&plan(1, Some(100))), 3);
        assert_eq!(limits(Some(3)).parts(&plan(4, None)), 3);
        assert_eq!(limits(Some(3)).parts(&plan(1, None)), 1);
        // an older build's stored plan reads, and an older build reads this one (unknown fields
        // are ignored)
        let old: SettlePlan = serde_json::from_str(r#"{"hours":[3600],"run_hours":[3600],"dirty":[],"keys":[]}"#).unwrap();
        assert_eq!(old.resources, None);
        let new = serde_json::to_value(plan(1, Some(7))).unwrap();
        assert_eq!(new["resources"], 7);
    }

    /// A chunk's parts hold each of its (bucket, account) keys exactly once, in order, and no key
    /// outside it, cut at whole buckets: whatever the chunk's bounds and the number of parts.
    #[test]
    fn a_chunks_parts_cover_it_once_in_order() {
        let key = |b: i64, a: &str| (b, a.to_string());
        let inside = |r: ChunkRange<'_>, k: &ChunkKey| match r {
            ChunkRange::Keys(lo, hi) => lo.is_none_or(|l| k >= l) && hi.is_none_or(|h| k < h),
            ChunkRange::Accounts(..) => unreachable!(),
        };
        let (lo1, hi1, lo2, hi2) = (key(7, "acct0042"), key(9000, "b"), key(300, "m"), key(300, "q"));
        let ranges = [
            ChunkRange::Keys(None, None),
            ChunkRange::Keys(Some(&lo1), None),
            ChunkRange::Keys(None, Some(&hi1)),
            ChunkRange::Keys(Some(&lo1), Some(&hi1)),
            ChunkRange::Keys(Some(&lo2), Some(&hi2)),
        ];
        let mut probes = Vec::new();
        for b in (0..=65_535)
            .step_by(97)
            .chain([0, 1, 7, 8, 299, 300, 301, 8_999, 9_000, 9_001, 65_534, 65_535])
        {
            for a in ["", "a", "acct0042", "b", "m", "n", "q", "zz"] {
                probes.push(key(b, a));
            }
        }
        for range in ranges {
            for parts in [1, 2, 3, 8, 64] {
                let bounds = part_bounds(range, parts);
                // whole buckets: a line's id leads with its bucket, so the parts' lines are in id
                // order one part after another only if no bucket is split between two parts
                assert!(bounds.iter().all(|b| b.1.is_empty()), "{range:?}: {bounds:?}");
                let parted = parts_of(range, &bounds);
                assert!(
                    !parted.is_empty() && parted.len() <= parts,
                    "{range:?} in {parts}: {} parts",
                    parted.len()
                );
                for w in parted.windows(2) {
                    let (ChunkRange::Keys(_, hi), ChunkRange::Keys(lo, _)) = (w[0], w[1]) else {
                        unreachable!()
                    };
                    assert_eq!(hi, lo, "{range:?}: parts follow one another");
                }
                for k in &probes {
                    let n = parted.iter().filter(|p| inside(**p, k)).count();
                    assert_eq!(n, inside(range, k) as usize, "{range:?} in {parts} parts: key {k:?}");
                }
            }
            if let ChunkRange::Keys(Some(lo), Some(hi)) = range {
                if lo.0 == hi.0 {
                    assert_eq!(parts_of(range, &part_bounds(range, 8)).len(), 1, "one bucket is one part");
                }
            }
        }
        assert_eq!(
            parts_of(ChunkRange::Keys(None, None), &part_bounds(ChunkRange::Keys(None, None), 8)).len(),
            8
        );
        // more parts than buckets: a bucket a part at most (the last holds the last two)
        let all = part_bounds(ChunkRange::Keys(None, None), 100_000);
        assert_eq!(all.len(), 65_534);
        assert!(all.windows(2).all(|w| w[0].0 + 1 == w[1].0) && all[0].0 == 1);
        let old = ChunkRange::Accounts(Some("a"), Some("m"));
        assert_eq!(
            parts_of(old, &part_bounds(old, 8)),
            vec![old],
            "a plan of account ids is computed whole"
        );
    }
}
