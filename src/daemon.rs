//! `billrun run`: catch up, then run each job when it falls due, until SIGTERM or SIGINT. A signal
//! lets the current run (one transaction) finish or roll back, then the process exits 0.

use crate::app::Billing;
use crate::clock;
use crate::jobs::{self, JobRun, Step};
use anyhow::Result;
use std::time::Duration;

/// One log line per run that did something; empty hourly runs log at debug.
pub fn log_run(b: &Billing, at: i64, run: &JobRun) {
    match run {
        JobRun::Settle(o) if o.skipped => tracing::info!(run = %b.fmt(at), "settle run already done by another runner"),
        JobRun::Settle(o) if o.runs > 1 => tracing::debug!(run = %b.fmt(at), runs = o.runs, "settle runs with nothing to settle"),
        JobRun::Settle(o) if o.lines == 0 => tracing::debug!(run = %b.fmt(at), hours = o.hours.len(), "settle run: nothing to post"),
        JobRun::Settle(o) => {
            tracing::info!(run = %b.fmt(at), hours = o.hours.len(), lines = o.lines, chunks = o.chunks, amount_due = %o.amount_due, "settle run")
        }
        JobRun::Daily(o) if o.renewals + o.renewal_failures + o.transitions + o.alerts == 0 => {
            tracing::debug!(run = %b.fmt(at), "daily run: nothing due")
        }
        JobRun::Daily(o) => tracing::info!(
            run = %b.fmt(at), renewals = o.renewals, failed_attempts = o.renewal_failures, transitions = o.transitions, alerts = o.alerts, skipped = o.skipped, "daily run"
        ),
    }
}

pub async fn run(b: &Billing, poll_seconds: u64, metrics_addr: Option<std::net::SocketAddr>) -> Result<()> {
    if let Some(addr) = metrics_addr {
        let handle = crate::observe::install_recorder()?;
        let (db, zone) = (b.db.clone(), b.zone);
        // bind before serving, so a taken port fails the start instead of a background task
        let server = crate::observe::serve(addr, db, zone, handle);
        tokio::spawn(async move {
            if let Err(e) = server.await {
                tracing::error!(error = %format!("{e:#}"), "metrics endpoint stopped");
            }
        });
    }
    tracing::info!(zone = %b.zone, owner = crate::store::runs::owner_id(), "billrun daemon started");
    while !crate::shutdown::requested() {
        let now = clock::wall_now();
        let wait = match jobs::step(&b.db, &b.zone, &b.settle, b.lease_seconds, now).await {
            Ok(Step::Ran(at, run)) => {
                log_run(b, at, &run);
                continue;
            }
            Ok(Step::Held { job, at, owner, .. }) => {
                tracing::debug!(job, run = %b.fmt(at), owner, "held by another runner");
                1
            }
            Ok(Step::Interrupted) => break,
            Ok(Step::Idle) => {
                if let Err(e) = b.record_caught_up_to(now).await {
                    tracing::warn!(error = %format!("{e:#}"), "could not record progress");
                }
                match crate::delivery::deliver_pending(&b.db, &b.zone, &b.sinks).await {
                    Ok(r) if r.delivered + r.failed > 0 => tracing::info!(delivered = r.delivered, failed = r.failed, "notifications"),
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %format!("{e:#}"), "notification delivery"),
                }
                let next = jobs::next_due(&b.db, &b.zone, &b.settle).await.ok().flatten().map(|(_, t)| t);
                next.map(|t| (t - clock::wall_now()).clamp(1, poll_seconds as i64) as u64)
                    .unwrap_or(poll_seconds)
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "run failed; it will be retried");
                poll_seconds.min(10)
            }
        };
        crate::shutdown::pause(Duration::from_secs(wait)).await;
    }
    tracing::info!("billrun daemon stopped");
    Ok(())
}
