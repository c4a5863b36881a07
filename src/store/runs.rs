//! Job runs and their claims. Each (job, scheduled instant) has one row. A runner claims it by
//! committing its owner id and a lease expiry (a guarded upsert: only a run not done and whose
//! lease has expired can be taken), renews the lease while it works, and its work transaction
//! checks (owner, attempt) before committing. So a run is done once; a runner that died is taken
//! over when its lease expires; a runner that was paused past its lease writes nothing.

use super::db::{Backend, Db, Kind, Tx};
use crate::clock;
use anyhow::{bail, Result};
use rust_decimal::Decimal;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// This process's identity in claims: host, pid and start time.
pub fn owner_id() -> &'static str {
    static OWNER: OnceLock<String> = OnceLock::new();
    OWNER.get_or_init(|| {
        let host = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "host".to_string());
        let nanos = clock::start_nonce();
        format!("{host}-{}-{nanos:x}", std::process::id())
    })
}

/// A run this process holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    pub job: String,
    pub at: i64,
    pub owner: String,
    pub attempt: i64,
}

impl Claim {
    /// The arguments $1..$4 of a statement that acts only while this claim holds:
    /// `job = $1 AND scheduled_at = $2 AND owner = $3 AND attempt = $4`.
    fn key(&self) -> Vec<super::db::Val> {
        vec![
            self.job.clone().into(),
            self.at.into(),
            self.owner.clone().into(),
            self.attempt.into(),
        ]
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimResult {
    Claimed(Claim),
    /// The run is done.
    Done,
    /// The run is planned and open to every runner: its parts are claimed one by one. Holds the
    /// stored plan.
    Open(String),
    /// Another runner holds it until `lease_until`.
    Held {
        owner: String,
        lease_until: i64,
    },
}

/// Tries to claim a run for `lease_seconds`, in its own short transaction.
pub async fn claim(db: &Db, job: &str, at: i64, lease_seconds: i64) -> Result<ClaimResult> {
    let owner = owner_id();
    let now = clock::wall_now();
    let mut tx = db.begin().await?;
    // the session of the runner this claim may take over (PostgreSQL), read under the row's lock
    // so that it is the one the upsert replaces
    let previous = match tx.backend() {
        Backend::Postgres => tx
            .rows(
                "SELECT holder_pid, holder_start FROM job_runs WHERE job = $1 AND scheduled_at = $2 FOR UPDATE",
                vec![job.into(), at.into()],
                &[Kind::Int, Kind::Int],
            )
            .await?
            .first()
            .and_then(|r| Some((r.opt_int(0)?, r.opt_int(1)?))),
        Backend::Sqlite => None,
    };
    let rows = tx
        .rows(
            "INSERT INTO job_runs (job, scheduled_at, outcome, owner, lease_until, started_at, attempt) VALUES ($1, $2, 'running', $3, $4, $5, 1) \
             ON CONFLICT (job, scheduled_at) DO UPDATE SET owner = excluded.owner, lease_until = excluded.lease_until, \
             started_at = excluded.started_at, attempt = job_runs.attempt + 1, holder_pid = NULL, holder_start = NULL \
             WHERE job_runs.outcome NOT IN ('ok', 'chunked') AND (job_runs.lease_until IS NULL OR job_runs.lease_until < excluded.started_at) \
             RETURNING attempt",
            vec![job.into(), at.into(), owner.into(), (now + lease_seconds).into(), now.into()],
            &[Kind::Int],
        )
        .await?;
    let result = match rows.first() {
        Some(r) => {
            if r.int(0) > 1 {
                tracing::warn!(job, run = at, attempt = r.int(0), "took over a run whose lease had expired");
                crate::metrics::claims_taken_over();
            }
            ClaimResult::Claimed(Claim {
                job: job.to_string(),
                at,
                owner: owner.to_string(),
                attempt: r.int(0),
            })
        }
        None => {
            let r = tx
                .rows(
                    "SELECT outcome, owner, lease_until, detail FROM job_runs WHERE job = $1 AND scheduled_at = $2",
                    vec![job.into(), at.into()],
                    &[Kind::Text, Kind::Text, Kind::Int, Kind::Text],
                )
                .await?;
            match r.first() {
                Some(r) if r.text(0) == "ok" => ClaimResult::Done,
                Some(r) if r.text(0) == "chunked" => ClaimResult::Open(r.opt_text(3).unwrap_or_default()),
                Some(r) => ClaimResult::Held {
                    owner: r.opt_text(1).unwrap_or_default(),
                    lease_until: r.opt_int(2).unwrap_or(0),
                },
                None => bail!("job run {job}@{at} vanished while being claimed"),
            }
        }
    };
    tx.commit().await?;
    if let (ClaimResult::Claimed(c), Some((pid, start))) = (&result, previous) {
        end_stale_session(db, c, pid, start).await;
    }
    Ok(result)
}

/// Ends the database session of the runner a run was just taken over from, if it is still there
/// (same pid, same start). That runner stopped renewing its lease, and its transaction can no
/// longer commit (fencing), but while it stays open its row locks stay held. The server ends an
/// idle transaction by itself after the lease (`idle_in_transaction_session_timeout`), yet not
/// one waiting for the rest of a COPY or of a statement from a paused client: only this does.
/// Best effort: without the right to end it (another role) the new holder waits as before.
async fn end_stale_session(db: &Db, c: &Claim, pid: i64, start: i64) {
    let ended = db
        .rows(
            "SELECT CASE WHEN pg_terminate_backend(pid) THEN 1 ELSE 0 END FROM pg_stat_activity \
             WHERE pid = $1 AND (EXTRACT(EPOCH FROM backend_start) * 1000000)::BIGINT = $2",
            vec![pid.into(), start.into()],
            &[Kind::Int],
        )
        .await;
    match ended {
        Ok(r) if r.first().is_some_and(|r| r.int(0) == 1) => {
            tracing::warn!(job = %c.job, run = c.at, pid, "ended the database session of the runner this run was taken over from")
        }
        Ok(_) => tracing::debug!(job = %c.job, run = c.at, pid, "the previous runner's database session was already gone"),
        Err(e) => {
            tracing::warn!(job = %c.job, run = c.at, pid, error = %format!("{e:#}"), "could not end the previous runner's database session")
        }
    }
}

/// Begins the transaction that does a claimed run's work. On PostgreSQL it first records this
/// transaction's session with the claim (committed at once, on another connection), so that a
/// runner taking the run over can end it.
pub(crate) async fn begin_work(db: &Db, c: &Claim) -> Result<Tx> {
    let mut tx = db.begin().await?;
    if tx.backend() == Backend::Postgres {
        let me = tx
            .rows(
                "SELECT pid::BIGINT, (EXTRACT(EPOCH FROM backend_start) * 1000000)::BIGINT FROM pg_stat_activity WHERE pid = pg_backend_pid()",
                vec![],
                &[Kind::Int, Kind::Int],
            )
            .await?;
        if let Some(r) = me.first() {
            db.exec(
                "UPDATE job_runs SET holder_pid = $5, holder_start = $6 \
                 WHERE job = $1 AND scheduled_at = $2 AND owner = $3 AND attempt = $4 AND outcome = 'running'",
                [c.key(), vec![r.int(0).into(), r.int(1).into()]].concat(),
            )
            .await?;
        }
    }
    Ok(tx)
}

/// Opens a claimed run to every runner with its plan, in the caller's transaction, only while
/// this runner still holds the claim.
pub(crate) async fn open(tx: &mut Tx, c: &Claim, plan: &str) -> Result<()> {
    let n = tx
        .exec(
            "UPDATE job_runs SET outcome = 'chunked', detail = $5, lease_until = NULL \
             WHERE job = $1 AND scheduled_at = $2 AND owner = $3 AND attempt = $4 AND outcome = 'running'",
            [c.key(), vec![plan.into()]].concat(),
        )
        .await?;
    if n == 0 {
        bail!(
            "run {}@{}: the lease was taken over by another runner before the run was planned",
            c.job,
            c.at
        );
    }
    Ok(())
}

/// SQL (a string literal, for `concat!`) for the instant of the last run of job `$1` recorded as
/// done, NULL if none: the first entry of the index of runs done (migration 12), read backwards.
macro_rules! last_done_run {
    () => {
        "(SELECT scheduled_at FROM job_runs WHERE job = $1 AND outcome = 'ok' ORDER BY scheduled_at DESC LIMIT 1)"
    };
}
pub(crate) use last_done_run;

/// Whether a run is recorded as done.
pub async fn is_done(db: &Db, job: &str, at: i64) -> Result<bool> {
    let r = db
        .rows(
            "SELECT outcome FROM job_runs WHERE job = $1 AND scheduled_at = $2",
            vec![job.into(), at.into()],
            &[Kind::Text],
        )
        .await?;
    Ok(r.first().is_some_and(|r| r.text(0) == "ok"))
}

/// Extends the lease; false if it was taken over.
pub async fn renew(db: &Db, c: &Claim, lease_seconds: i64) -> Result<bool> {
    let n = db
        .exec(
            "UPDATE job_runs SET lease_until = $5 WHERE job = $1 AND scheduled_at = $2 AND owner = $3 AND attempt = $4 AND outcome = 'running'",
            [c.key(), vec![(clock::wall_now() + lease_seconds).into()]].concat(),
        )
        .await?;
    Ok(n > 0)
}

/// Gives the run back (shutdown before it was done): another runner may take it at once.
pub async fn release(db: &Db, c: &Claim) -> Result<()> {
    db.exec(
        "UPDATE job_runs SET lease_until = 0 WHERE job = $1 AND scheduled_at = $2 AND owner = $3 AND attempt = $4 AND outcome = 'running'",
        c.key(),
    )
    .await?;
    Ok(())
}

/// Keeps a claim's lease alive while the run works (PostgreSQL: another connection renews it).
pub struct LeaseKeeper {
    task: tokio::task::JoinHandle<()>,
}

impl LeaseKeeper {
    pub fn start(db: &Db, c: &Claim, lease_seconds: i64) -> LeaseKeeper {
        let (db, c) = (db.clone(), c.clone());
        let every = Duration::from_millis((lease_seconds.max(3) * 1000 / 3) as u64);
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match renew(&db, &c, lease_seconds).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(job = %c.job, run = c.at, "lease lost: another runner took this run over");
                        return;
                    }
                    Err(e) => tracing::warn!(error = %format!("{e:#}"), "could not renew a lease"),
                }
            }
        });
        LeaseKeeper { task }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Records what the run did, in the run's own transaction: only if this runner still holds the
/// claim, else the whole transaction is refused (fencing).
pub(crate) async fn finish(tx: &mut Tx, c: &Claim, lines: usize, amount_due: Decimal, detail: serde_json::Value) -> Result<()> {
    let n = tx
        .exec(
            "UPDATE job_runs SET outcome = 'ok', finished_at = $5, lines = $6, amount_due = $7, detail = $8 \
             WHERE job = $1 AND scheduled_at = $2 AND owner = $3 AND attempt = $4 AND outcome = 'running'",
            [
                c.key(),
                vec![
                    clock::wall_now().into(),
                    (lines as i64).into(),
                    amount_due.into(),
                    detail.to_string().into(),
                ],
            ]
            .concat(),
        )
        .await?;
    if n == 0 {
        bail!(
            "run {}@{}: the lease was taken over by another runner; nothing of this attempt is kept",
            c.job,
            c.at
        );
    }
    Ok(())
}

/// The claim name of chunk `k` of a run.
pub fn chunk_job(job: &str, k: usize) -> String {
    format!("{job}#{k:05}")
}

/// How the chunks of an open run went in this process: those it did (in chunk order, with what
/// each did), the first in order that failed or that another runner holds, and whether a shutdown
/// stopped it between chunks.
pub(crate) struct ChunkEnds<T> {
    pub done: Vec<(usize, T)>,
    pub failed: Option<(usize, anyhow::Error)>,
    pub held: Option<(usize, String, String, i64)>,
    pub interrupted: bool,
}

/// What one chunk worker did before it ran out of chunks, met a failure or a shutdown.
struct WorkerEnd<T> {
    done: Vec<(usize, T)>,
    held: Option<(usize, String, String, i64)>,
    failed: Option<(usize, anyhow::Error)>,
    interrupted: bool,
}

/// Works through the chunks of the open run `job`@`at` with `workers` workers: each claims the next
/// chunk not yet taken (`chunk_job`, a lease of `lease_seconds` kept alive while it works on
/// PostgreSQL) and runs `one` on it, which commits the chunk only while the claim holds. A chunk
/// done or held elsewhere is passed over; on a failure the failed chunk's claim is given back at
/// once and the other workers stop after the chunk they are in.
pub(crate) async fn run_chunks<T>(
    db: &Db,
    job: &str,
    at: i64,
    chunks: usize,
    workers: usize,
    lease_seconds: i64,
    one: impl AsyncFn(usize, &Claim) -> Result<T>,
) -> ChunkEnds<T> {
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let worker = || async {
        let mut mine = WorkerEnd {
            done: Vec::new(),
            held: None,
            failed: None,
            interrupted: false,
        };
        while !stop.load(Ordering::Relaxed) {
            let k = next.fetch_add(1, Ordering::Relaxed);
            if k >= chunks {
                break;
            }
            if crate::shutdown::requested() {
                mine.interrupted = true;
                break;
            }
            let name = chunk_job(job, k);
            let claimed = match claim(db, &name, at, lease_seconds).await {
                Ok(c) => c,
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    mine.failed = Some((k, e));
                    break;
                }
            };
            match claimed {
                ClaimResult::Claimed(c) => {
                    let keeper = (db.backend() == Backend::Postgres).then(|| LeaseKeeper::start(db, &c, lease_seconds));
                    let result = one(k, &c).await;
                    drop(keeper);
                    match result {
                        Ok(done) => mine.done.push((k, done)),
                        Err(e) => {
                            // the others finish the chunk they are in, then stop
                            stop.store(true, Ordering::Relaxed);
                            if let Err(release_error) = release(db, &c).await {
                                tracing::warn!(error = %format!("{release_error:#}"), "could not release the claim of a failed chunk");
                            }
                            mine.failed = Some((k, e));
                            break;
                        }
                    }
                }
                ClaimResult::Done | ClaimResult::Open(_) => {}
                ClaimResult::Held { owner, lease_until } => {
                    mine.held.get_or_insert((k, name, owner, lease_until));
                }
            }
        }
        mine
    };
    let mut ends = futures_util::future::join_all((0..workers.max(1)).map(|_| worker())).await;
    // the first chunk in order that failed or was held, whichever worker met it
    let failed = ends.iter_mut().filter_map(|e| e.failed.take()).min_by_key(|f| f.0);
    let held = ends.iter_mut().filter_map(|e| e.held.take()).min_by_key(|h| h.0);
    let interrupted = ends.iter().any(|e| e.interrupted);
    // in chunk order, as one worker would have done them
    let mut done: Vec<_> = ends.into_iter().flat_map(|e| e.done).collect();
    done.sort_by_key(|(k, _)| *k);
    ChunkEnds {
        done,
        failed,
        held,
        interrupted,
    }
}
