//! Notification delivery to a webhook that fails at first, and the metrics endpoint of a daemon.

mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A webhook receiver that answers 500 to the first `fail_first` requests, then 200; it keeps the
/// accepted bodies by event id and checks each signature.
async fn receiver(fail_first: usize) -> (String, Arc<Mutex<Vec<(String, String, bool)>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::new(Mutex::new(0usize));
    let acc = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (mut sock, _) = listener.accept().await.unwrap();
            let (acc, seen) = (acc.clone(), seen.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let (head_end, len) = loop {
                    let n = sock.read(&mut chunk).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..p]).to_lowercase();
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap()))
                            .unwrap_or(0);
                        break (p + 4, len);
                    }
                };
                while buf.len() < head_end + len {
                    let n = sock.read(&mut chunk).await.unwrap();
                    buf.extend_from_slice(&chunk[..n]);
                }
                let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                let header = |name: &str| {
                    head.lines().find_map(|l| {
                        l.to_lowercase()
                            .starts_with(name)
                            .then(|| l.split_once(':').unwrap().1.trim().to_string())
                    })
                };
                let body = &buf[head_end..head_end + len];
                let ok_signature = header("x-billrun-signature:") == Some(billrun::delivery::signature("s3cret", body));
                let n = {
                    let mut s = seen.lock().unwrap();
                    *s += 1;
                    *s
                };
                let status = if n <= fail_first { "500 Internal Server Error" } else { "200 OK" };
                if n > fail_first {
                    acc.lock().unwrap().push((
                        header("x-billrun-event-id:").unwrap_or_default(),
                        String::from_utf8_lossy(body).to_string(),
                        ok_signature,
                    ));
                }
                let _ = sock
                    .write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes())
                    .await;
            });
        }
    });
    (url, accepted)
}

const WORLD: &str = r#"{"accounts": [{"id": "acme", "balance": "250.00"}, {"id": "short", "balance": "2.00"}],
  "plans": [{"id": "pp", "product": "KooPhone", "hourly": {"instance": "0.36"}, "monthly": "99.00"}],
  "resources": [{"id": "s1", "account": "acme", "plan": "pp", "mode": "monthly", "purchased_at": "2024-01-05T10:00:00Z", "auto_renew": true},
                {"id": "p1", "account": "short", "plan": "pp", "mode": "pay_per_use", "created_at": "2024-01-05T00:00:00Z", "deleted_at": "2024-01-06T00:00:00Z"}]}"#;

// the receiver's tasks must run while this test blocks on child processes
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_notification_arrives_exactly_once_through_a_failing_webhook() {
    let (url, accepted) = receiver(3).await;
    for name in common::available() {
        accepted.lock().unwrap().clear();
        let be = common::fresh(name).await;
        let dir = tempfile::tempdir().unwrap();
        let doc = dir.path().join("w.json");
        std::fs::write(&doc, WORLD).unwrap();
        let cfg = dir.path().join("billrun.toml");
        std::fs::write(&cfg, format!("webhook_url = \"{url}\"\nwebhook_backoff_ms = 20\n")).unwrap();
        let billrun = || {
            let mut c = Command::new(env!("CARGO_BIN_EXE_billrun"));
            c.arg("--database-url")
                .arg(&be.url)
                .arg("--config")
                .arg(&cfg)
                .env("BILLRUN_WEBHOOK_SECRET", "s3cret")
                .env("BILLRUN_LOG", "error");
            c
        };
        assert!(billrun().arg("load").arg(&doc).status().unwrap().success());
        for _ in 0..30 {
            assert!(billrun()
                .args(["tick", "--now", "2024-02-20T00:00:00Z"])
                .stdout(Stdio::null())
                .status()
                .unwrap()
                .success());
            let out = billrun().args(["notifications", "--json"]).output().unwrap();
            let notes: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            if notes.as_array().unwrap().iter().all(|n| n["delivery"] != "pending") {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let notes: serde_json::Value =
            serde_json::from_slice(&billrun().args(["notifications", "--json"]).output().unwrap().stdout).unwrap();
        let notes = notes.as_array().unwrap();
        let delivered = notes.iter().filter(|n| n["delivery"] == "delivered").count();
        let superseded = notes.iter().filter(|n| n["delivery"] == "superseded").count();
        assert_eq!(delivered + superseded, notes.len(), "{name}: nothing left pending: {notes:?}");
        assert!(delivered >= 3, "{name}: the latest alert, the renewal, arrears: {delivered}");
        let got = accepted.lock().unwrap().clone();
        let mut by_id: HashMap<String, usize> = HashMap::new();
        for (id, body, signed) in &got {
            assert!(signed, "{name}: signature of {body}");
            *by_id.entry(id.clone()).or_default() += 1;
        }
        assert_eq!(got.len(), delivered, "{name}: one accepted request per delivered notification");
        assert!(by_id.values().all(|n| *n == 1), "{name}: no event twice: {by_id:?}");
        let kinds: Vec<String> = got
            .iter()
            .map(|(_, b, _)| {
                serde_json::from_str::<serde_json::Value>(b).unwrap()["kind"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert!(
            kinds.contains(&"arrears_began".to_string()) && kinds.contains(&"renewal_succeeded".to_string()),
            "{kinds:?}"
        );
    }
}

#[tokio::test]
async fn metrics_are_served_while_the_daemon_runs() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("m.db").display());
    let doc = dir.path().join("w.json");
    std::fs::write(&doc, WORLD).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_billrun"))
            .arg("--database-url")
            .arg(&url)
            .args(args)
            .env("BILLRUN_LOG", "error")
            .output()
            .unwrap()
    };
    assert!(run(&["load", doc.to_str().unwrap()]).status.success());
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_billrun"))
        .arg("--database-url")
        .arg(&url)
        .args(["--metrics-addr", &port.to_string(), "run", "--poll-seconds", "1"])
        .env("BILLRUN_LOG", "error")
        .spawn()
        .unwrap();
    let scrape = |path: &str| -> Option<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    };
    let mut body = String::new();
    for _ in 0..100 {
        std::thread::sleep(std::time::Duration::from_millis(200));
        if let Some(b) = scrape("/metrics") {
            if b.contains("billrun_runs_total{job=\"daily\",outcome=\"ok\"}") && b.contains("billrun_runs_total{job=\"settle\"") {
                body = b;
                break;
            }
        }
    }
    assert!(scrape("/healthz").unwrap().contains("200 OK"));
    assert!(body.contains("billrun_run_duration_seconds"), "{body}");
    assert!(body.contains("billrun_lines_posted_total"), "{body}");
    assert!(body.contains("billrun_notifications_pending"), "{body}");
    assert!(body.contains("billrun_settle_lag_seconds"), "{body}");
    assert!(Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status()
        .unwrap()
        .success());
    assert_eq!(daemon.wait().unwrap().code(), Some(0), "SIGTERM: exit 0");
}
