//! `billrun run`: catch up, then run each job when it falls due, until SIGTERM or SIGINT. A signal
//! lets the current run (one transaction) finish or roll back, then the process exits 0.

use crate::app::Billing;
use crate::clock;
use crate::jobs::{self, JobRun};
use anyhow::Result;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return ctrl_c.await.unwrap_or(()),
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await.unwrap_or(());
}

/// One log line per run that did something; empty hourly runs log at debug.
pub fn log_run(b: &Billing, at: i64, run: &JobRun) {
    match run {
        JobRun::Settle(o) if o.skipped => tracing::info!(run = %b.fmt(at), "settle run already done by another runner"),
        JobRun::Settle(o) if o.runs > 1 => tracing::debug!(run = %b.fmt(at), runs = o.runs, "settle runs with nothing to settle"),
        JobRun::Settle(o) if o.lines.is_empty() => tracing::debug!(run = %b.fmt(at), hours = o.hours.len(), "settle run: nothing to post"),
        JobRun::Settle(o) => {
            tracing::info!(run = %b.fmt(at), hours = o.hours.len(), lines = o.lines.len(), amount_due = %o.amount_due, "settle run")
        }
        JobRun::Daily(o) if o.renewals + o.renewal_failures + o.transitions + o.alerts == 0 => {
            tracing::debug!(run = %b.fmt(at), "daily run: nothing due")
        }
        JobRun::Daily(o) => tracing::info!(
            run = %b.fmt(at), renewals = o.renewals, failed_attempts = o.renewal_failures, transitions = o.transitions, alerts = o.alerts, skipped = o.skipped, "daily run"
        ),
    }
}

pub async fn run(b: &Billing, poll_seconds: u64) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let wake = Arc::new(Notify::new());
    {
        let (stop, wake) = (stop.clone(), wake.clone());
        tokio::spawn(async move {
            shutdown_signal().await;
            tracing::info!("shutdown requested: finishing the current run");
            stop.store(true, Ordering::SeqCst);
            wake.notify_one();
        });
    }
    tracing::info!(zone = %b.zone, "billrun daemon started");
    while !stop.load(Ordering::SeqCst) {
        let now = clock::wall_now();
        match jobs::run_next(&b.db, &b.zone, &b.settle, now).await {
            Ok(Some((at, run))) => {
                log_run(b, at, &run);
                continue;
            }
            Ok(None) => {}
            Err(e) => tracing::error!(error = %format!("{e:#}"), "run failed; retrying"),
        }
        let next = jobs::next_due(&b.db, &b.zone, &b.settle).await.ok().flatten().map(|(_, t)| t);
        let wait = next
            .map(|t| (t - clock::wall_now()).clamp(1, poll_seconds as i64) as u64)
            .unwrap_or(poll_seconds);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(wait)) => {}
            _ = wake.notified() => {}
        }
    }
    tracing::info!("billrun daemon stopped");
    Ok(())
}
