//! The only place that reads the wall clock. Rules take their instant as an argument; the CLI and
//! the daemon ask here for "now" when the operator did not name one.

/// Current wall-clock time, whole seconds since the epoch.
pub fn wall_now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Current wall-clock time in milliseconds (delivery backoff).
pub fn wall_now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Sub-second part of the start time: tells apart two processes with the same host and pid.
pub fn start_nonce() -> u32 {
    chrono::Utc::now().timestamp_subsec_nanos()
}
