//! The operator's HTTP endpoint (`--metrics-addr`): `/healthz` and Prometheus `/metrics`. Two
//! fixed GET routes, so a few lines over a TCP listener serve them; the figures come from the
//! `metrics` recorder and, at scrape time, from the database (lag, pending notifications).

use crate::billing::zone::BillingZone;
use crate::clock;
use crate::store::db::{Db, Kind};
use anyhow::{Context, Result};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `PORT` binds 127.0.0.1 (never all interfaces unless asked); `HOST:PORT` binds that.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    let full = if s.chars().all(|c| c.is_ascii_digit()) {
        format!("127.0.0.1:{s}")
    } else {
        s.to_string()
    };
    full.parse().map_err(|_| format!("--metrics-addr: `{s}` is not PORT or HOST:PORT"))
}

pub fn install_recorder() -> Result<PrometheusHandle> {
    PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")
}

/// Figures read from the database when scraped.
async fn refresh_gauges(db: &Db, zone: &BillingZone) -> Result<()> {
    let r = db
        .rows(
            "SELECT (SELECT COUNT(*) FROM notifications WHERE delivery = 'pending'), (SELECT watermark FROM job_state WHERE job = 'settle'), \
             (SELECT COUNT(*) FROM dirty_hours)",
            vec![],
            &[Kind::Int, Kind::Int, Kind::Int],
        )
        .await?;
    metrics::gauge!("billrun_notifications_pending").set(r[0].int(0) as f64);
    if let Some(w) = r[0].opt_int(1) {
        // the oldest hour not yet settled ended this long ago
        let oldest_unsettled_end = zone.next_hour(zone.next_hour(w));
        metrics::gauge!("billrun_settle_lag_seconds").set((clock::wall_now() - oldest_unsettled_end).max(0) as f64);
    }
    metrics::gauge!("billrun_hours_awaiting_resettlement").set(r[0].int(2) as f64);
    Ok(())
}

pub async fn serve(addr: SocketAddr, db: Db, zone: BillingZone, handle: PrometheusHandle) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("--metrics-addr {addr}"))?;
    tracing::info!(%addr, "serving /healthz and /metrics");
    loop {
        let (mut sock, _) = listener.accept().await?;
        let (db, handle) = (db.clone(), handle.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            let mut n = 0;
            while n < buf.len() {
                match sock.read(&mut buf[n..]).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => n += k,
                }
                if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let head = String::from_utf8_lossy(&buf[..n]);
            let path = head.split_whitespace().nth(1).unwrap_or("");
            let (status, ctype, body) = match path {
                "/healthz" => ("200 OK", "text/plain", "ok\n".to_string()),
                "/metrics" => {
                    if let Err(e) = refresh_gauges(&db, &zone).await {
                        tracing::warn!(error = %format!("{e:#}"), "metrics: database figures unavailable");
                    }
                    ("200 OK", "text/plain; version=0.0.4", handle.render())
                }
                _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}
