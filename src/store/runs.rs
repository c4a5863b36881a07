//! Job runs: each (job, scheduled instant) has one row, inserted as the first statement of the run's
//! transaction. The row is the claim: a second runner's insert waits for the first transaction and
//! then finds the row, so a run is done once; a crashed run rolls back with its row.

use super::db::Tx;
use crate::clock;
use anyhow::Result;
use rust_decimal::Decimal;

/// Claims the run; false if it is already done (or being done) by another runner.
pub(crate) async fn claim(tx: &mut Tx, job: &str, at: i64) -> Result<bool> {
    let rows = tx
        .exec(
            "INSERT INTO job_runs (job, scheduled_at, outcome, started_at) VALUES ($1, $2, 'running', $3) ON CONFLICT (job, scheduled_at) DO NOTHING",
            vec![job.into(), at.into(), clock::wall_now().into()],
        )
        .await?;
    Ok(rows > 0)
}

/// Records what the run did, in its own transaction, just before it commits.
pub(crate) async fn finish(tx: &mut Tx, job: &str, at: i64, lines: usize, amount_due: Decimal, detail: serde_json::Value) -> Result<()> {
    tx.exec(
        "UPDATE job_runs SET outcome = 'ok', finished_at = $3, lines = $4, amount_due = $5, detail = $6 WHERE job = $1 AND scheduled_at = $2",
        vec![job.into(), at.into(), clock::wall_now().into(), (lines as i64).into(), amount_due.into(), detail.to_string().into()],
    )
    .await?;
    Ok(())
}
