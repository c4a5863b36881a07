//! The only place that reads the wall clock. Rules take their instant as an argument; the CLI and
//! the daemon ask here for "now" when the operator did not name one.

/// Current wall-clock time, whole seconds since the epoch.
pub fn wall_now() -> i64 {
    chrono::Utc::now().timestamp()
}
