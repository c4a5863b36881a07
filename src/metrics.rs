//! Operational figures, recorded through the `metrics` facade (a no-op until an exporter is
//! installed, so the library and tests pay nothing for them).

use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;

pub fn claims_taken_over() {
    metrics::counter!("billrun_claims_taken_over_total").increment(1);
}

/// A run ended: its outcome and how long it took.
pub fn run_finished(job: &'static str, outcome: &'static str, duration: std::time::Duration) {
    metrics::counter!("billrun_runs_total", "job" => job, "outcome" => outcome).increment(1);
    metrics::histogram!("billrun_run_duration_seconds", "job" => job).record(duration.as_secs_f64());
}

/// What a run posted: lines and the amount due, in cents.
pub fn posted(job: &'static str, lines: usize, amount_due: Decimal) {
    metrics::counter!("billrun_lines_posted_total", "job" => job).increment(lines as u64);
    metrics::counter!("billrun_amount_due_cents_total", "job" => job)
        .increment((amount_due * Decimal::from(100)).trunc().to_u64().unwrap_or(0));
}
