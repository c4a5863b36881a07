//! Jobs: each run is planned by pure functions of the stored state and an instant, then executed
//! by `run_once`-style functions; the daemon and `tick` only loop over them.
pub mod settle;
