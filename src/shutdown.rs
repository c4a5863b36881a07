//! SIGTERM/SIGINT: the current run (one transaction) finishes or rolls back, no new run starts,
//! held claims are released, and the process exits 0.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use tokio::sync::Notify;

static REQUESTED: AtomicBool = AtomicBool::new(false);

fn notify() -> &'static Notify {
    static N: OnceLock<Notify> = OnceLock::new();
    N.get_or_init(Notify::new)
}

pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

pub fn request() {
    REQUESTED.store(true, Ordering::SeqCst);
    notify().notify_waiters();
}

/// Resolves when shutdown is requested.
pub async fn wait() {
    let n = notify().notified();
    if requested() {
        return;
    }
    n.await
}

/// Sleeps for `d`, or less if shutdown is requested meanwhile.
pub async fn pause(d: std::time::Duration) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = wait() => {}
    }
}

/// Installs the signal handlers (call once, inside the runtime).
pub fn install() {
    tokio::spawn(async {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            } else {
                let _ = ctrl_c.await;
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown requested: finishing the current run, starting no other");
        request();
    });
}
