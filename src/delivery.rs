//! Delivering the notification outbox: to a webhook (HTTP POST of JSON, signed with HMAC-SHA256 of
//! the body in `X-Billrun-Signature: sha256=<hex>`, with the event id in `X-Billrun-Event-Id` so a
//! receiver can drop a repeat) and/or appended to a JSON-lines file. A notification is claimed
//! before it is sent (no two replicas send it at once), marked delivered only after every sink
//! took it, and retried with exponential backoff otherwise: never lost; sent again only if a
//! process dies between sending and marking, and then with the same event id.

use crate::billing::zone::BillingZone;
use crate::store::db::{Db, Kind, Row};
use anyhow::{Context, Result};
use hmac::{KeyInit, Mac};
use serde_json::json;
use sha2::Sha256;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Debug, Default)]
pub struct Sinks {
    pub webhook_url: Option<String>,
    pub webhook_secret: Option<String>,
    pub file: Option<PathBuf>,
    /// First retry after this many milliseconds, doubling each attempt (at most an hour).
    pub backoff_ms: i64,
}

impl Sinks {
    pub fn any(&self) -> bool {
        self.webhook_url.is_some() || self.file.is_some()
    }
}

/// A notification as scripts and receivers see it (`notifications --json`, webhook bodies), from a
/// row holding kind, account_id, resource_id, at, days_before, expires_on, reason from column `first`.
pub fn notification_json(zone: &BillingZone, r: &Row, first: usize) -> serde_json::Value {
    json!({
        "kind": r.text(first), "account_id": r.text(first + 1), "resource_id": r.opt_text(first + 2),
        "at": zone.format(r.int(first + 3)), "days_before": r.opt_int(first + 4), "expires_on": r.opt_text(first + 5),
        "reason": r.opt_text(first + 6),
    })
}

/// `sha256=<hex>` of the body under the secret.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac = <hmac::Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(body);
    let bytes = mac.finalize().into_bytes();
    format!("sha256={}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeliveryReport {
    pub delivered: usize,
    pub failed: usize,
}

fn now_ms() -> i64 {
    crate::clock::wall_now_ms()
}

/// Sends every pending notification that is due, oldest first.
pub async fn deliver_pending(db: &Db, zone: &BillingZone, sinks: &Sinks) -> Result<DeliveryReport> {
    let mut report = DeliveryReport::default();
    if !sinks.any() {
        return Ok(report);
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .context("HTTP client")?;
    loop {
        let now = now_ms();
        let rows = db
            .rows(
                "SELECT id, event_key, kind, account_id, resource_id, at, days_before, expires_on, reason, attempts FROM notifications \
                 WHERE delivery = 'pending' AND (next_attempt_ms IS NULL OR next_attempt_ms <= $1) ORDER BY at, id LIMIT 200",
                vec![now.into()],
                &[
                    Kind::Int,
                    Kind::Text,
                    Kind::Text,
                    Kind::Text,
                    Kind::Text,
                    Kind::Int,
                    Kind::Int,
                    Kind::Text,
                    Kind::Text,
                    Kind::Int,
                ],
            )
            .await?;
        if rows.is_empty() {
            return Ok(report);
        }
        for r in rows {
            let id = r.int(0);
            // claim it for a minute: another replica skips it meanwhile
            let claimed = db
                .exec(
                    "UPDATE notifications SET next_attempt_ms = $2 WHERE id = $1 AND delivery = 'pending' AND (next_attempt_ms IS NULL OR next_attempt_ms <= $3)",
                    vec![id.into(), (now + 60_000).into(), now.into()],
                )
                .await?;
            if claimed == 0 {
                continue;
            }
            let event_id = crate::billing::settle::transaction_id(&r.text(1), 0).replacen("tx_", "ev_", 1);
            let mut payload = notification_json(zone, &r, 2);
            payload["event_id"] = json!(event_id);
            let body = serde_json::to_vec(&payload)?;
            match send(&client, sinks, &event_id, &body).await {
                Ok(()) => {
                    db.exec(
                        "UPDATE notifications SET delivery = 'delivered', delivered_at = $2, attempts = attempts + 1, last_error = NULL WHERE id = $1",
                        vec![id.into(), (now / 1000).into()],
                    )
                    .await?;
                    report.delivered += 1;
                }
                Err(e) => {
                    let attempts = r.int(9) + 1;
                    let wait = (sinks.backoff_ms.max(1) << (attempts - 1).min(20)).min(3_600_000);
                    tracing::warn!(event_id, attempts, retry_in_ms = wait, error = %format!("{e:#}"), "notification delivery failed");
                    db.exec(
                        "UPDATE notifications SET attempts = $2, next_attempt_ms = $3, last_error = $4 WHERE id = $1",
                        vec![id.into(), attempts.into(), (now_ms() + wait).into(), format!("{e:#}").into()],
                    )
                    .await?;
                    report.failed += 1;
                }
            }
        }
        if report.failed > 0 {
            // the rest waits for its backoff; do not spin on a failing sink
            return Ok(report);
        }
    }
}

async fn send(client: &reqwest::Client, sinks: &Sinks, event_id: &str, body: &[u8]) -> Result<()> {
    if let Some(url) = &sinks.webhook_url {
        let mut req = client
            .post(url)
            .header("Content-Type", "application/json")
            .header("X-Billrun-Event-Id", event_id)
            .body(body.to_vec());
        if let Some(secret) = &sinks.webhook_secret {
            req = req.header("X-Billrun-Signature", signature(secret, body));
        }
        let resp = req.send().await.map_err(|e| anyhow::anyhow!("webhook: {}", e.without_url()))?;
        if !resp.status().is_success() {
            anyhow::bail!("webhook answered {}", resp.status());
        }
    }
    if let Some(path) = &sinks.file {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("notifications file {}", path.display()))?;
        f.write_all(body)?;
        f.write_all(b"\n")?;
        f.sync_data()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_hex() {
        // RFC 4231 test case 2
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
