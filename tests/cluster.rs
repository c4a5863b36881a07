//! Several billrun processes against one PostgreSQL database: every run is done exactly once and
//! the ledger equals a single process's, transaction ids included.

mod common;

use std::process::{Command, Stdio};

fn world(accounts: usize, resources: usize) -> String {
    let mut accs = Vec::new();
    for a in 0..accounts {
        accs.push(format!(r#"{{"id": "acct{a:04}", "balance": "{}.00"}}"#, 30 + (a * 37) % 200));
    }
    let mut res = Vec::new();
    for r in 0..resources {
        let a = r % accounts;
        let created = 1_700_000_000 + (r as i64 * 7919) % 86_400;
        let created = chrono::DateTime::from_timestamp(created, 0).unwrap().to_rfc3339();
        if r % 10 == 0 {
            res.push(format!(
                r#"{{"id": "sub{r:05}", "account": "acct{a:04}", "plan": "phone-pro", "mode": "monthly", "purchased_at": "{created}", "auto_renew": true}}"#
            ));
        } else {
            res.push(format!(r#"{{"id": "res{r:05}", "account": "acct{a:04}", "plan": "phone-pro", "mode": "pay_per_use", "quantity": {}, "created_at": "{created}"}}"#, 1 + r % 3));
        }
    }
    format!(
        r#"{{"accounts": [{}], "plans": [{{"id": "phone-pro", "product": "KooPhone", "hourly": {{"instance": "0.36"}}, "monthly": "0.99"}}], "resources": [{}]}}"#,
        accs.join(","),
        res.join(",")
    )
}

/// `world(accounts, resources)` in a file of its own (gone with the directory).
fn world_doc(accounts: usize, resources: usize) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let doc = dir.path().join("world.json");
    std::fs::write(&doc, world(accounts, resources)).unwrap();
    (dir, doc)
}

fn billrun(url: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_billrun"));
    // short leases: a killed runner's run is taken over after 3 s
    c.arg("--database-url")
        .arg(url)
        .env("BILLRUN_LOG", "warn")
        .env("BILLRUN_LEASE_SECONDS", "3");
    c
}

#[tokio::test]
async fn three_processes_equal_one() {
    if common::pg_url().is_none() {
        return;
    }
    let (_dir, doc) = world_doc(40, 100);
    let now = "2023-12-20T00:00:00Z"; // 35 days: hourly settlement, renewals, arrears, freezes
    let single = common::fresh("postgres").await;
    let cluster = common::fresh("postgres").await;
    for be in [&single, &cluster] {
        assert!(billrun(&be.url).arg("load").arg(&doc).status().unwrap().success());
    }
    assert!(billrun(&single.url).args(["tick", "--now", now]).status().unwrap().success());
    // the replicas settle in chunks of 25 resources (4 a run) and do the daily runs in parts of 7
    // accounts, the single process each run in one
    let replicas: Vec<_> = (0..3)
        .map(|_| {
            billrun(&cluster.url)
                .args(["tick", "--now", now, "--chunk-resources", "25"])
                .env("BILLRUN_DAILY_BATCH_ACCOUNTS", "7")
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut skipped_somewhere = false;
    for r in replicas {
        let out = r.wait_with_output().unwrap();
        assert!(out.status.success(), "a replica failed: {}", String::from_utf8_lossy(&out.stdout));
        skipped_somewhere |= String::from_utf8_lossy(&out.stdout).contains("already done by another runner");
    }
    let export = |url: &str| String::from_utf8(billrun(url).arg("export").output().unwrap().stdout).unwrap();
    let (one, three) = (export(&single.url), export(&cluster.url));
    assert!(one.lines().count() > 10_000, "a busy world: {} lines", one.lines().count());
    assert_eq!(three, one, "the cluster's ledger equals the single process's");
    let notes = |url: &str| String::from_utf8(billrun(url).args(["notifications", "--json"]).output().unwrap().stdout).unwrap();
    assert_eq!(notes(&cluster.url), notes(&single.url));
    assert!(skipped_somewhere, "the replicas did share the work");
    // and shared single runs: chunks of one run settled by different replicas
    let db = billrun::store::db::Db::connect(&cluster.url).await.unwrap();
    let shared = db
        .rows(
            "SELECT COUNT(*) FROM (SELECT scheduled_at FROM job_runs WHERE job LIKE 'settle#%' GROUP BY scheduled_at HAVING COUNT(DISTINCT owner) > 1) x",
            vec![],
            &[billrun::store::db::Kind::Int],
        )
        .await
        .unwrap()[0]
        .int(0);
    let parts = db
        .rows(
            "SELECT COUNT(*), COUNT(DISTINCT scheduled_at) FROM job_runs WHERE job LIKE 'daily#%' AND outcome = 'ok'",
            vec![],
            &[billrun::store::db::Kind::Int, billrun::store::db::Kind::Int],
        )
        .await
        .unwrap();
    db.close().await;
    assert!(shared > 0, "some runs had their chunks settled by several replicas");
    let (parts, days) = (parts[0].int(0), parts[0].int(1));
    // the accounts with subscriptions, and more as accounts fall into arrears: up to 6 parts a run
    assert!(
        days >= 20 && parts >= 2 * days && parts <= 6 * days,
        "{days} daily runs in {parts} parts"
    );
    eprintln!("{shared} settle runs were split between replicas; {days} daily runs in {parts} parts");
}

/// The reference: a fresh database that loads `doc` and ticks to `now` undisturbed. Returns it, its
/// CSV and how long the tick took.
async fn undisturbed(name: &str, doc: &std::path::Path, now: &str) -> (common::Backend, String, std::time::Duration) {
    let calm = common::fresh(name).await;
    assert!(billrun(&calm.url).arg("load").arg(doc).status().unwrap().success());
    let started = std::time::Instant::now();
    assert!(billrun(&calm.url).args(["tick", "--now", now]).status().unwrap().success());
    let duration = started.elapsed();
    let expected = String::from_utf8(billrun(&calm.url).arg("export").output().unwrap().stdout).unwrap();
    (calm, expected, duration)
}

fn settle_runs(url: &str) -> i64 {
    let out = billrun(url).args(["status", "--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["job"] == "settle")
        .map(|j| j["runs"].as_i64().unwrap())
        .unwrap_or(0)
}

/// kill -9 at several moments of a catch-up, then run again: the ledger equals an undisturbed
/// run's, transaction ids included. More trials with BILLRUN_KILL_TRIALS.
#[tokio::test]
async fn kill_9_mid_run_then_resume_equals_undisturbed() {
    let (_dir, doc) = world_doc(100, 1000);
    let now = "2023-11-16T06:00:00Z";
    let trials: u32 = std::env::var("BILLRUN_KILL_TRIALS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    for name in common::available() {
        let (calm, expected, duration) = undisturbed(name, &doc, now).await;
        let total_runs = settle_runs(&calm.url);
        let mut interrupted = 0;
        for trial in 0..trials {
            let be = common::fresh(name).await;
            assert!(billrun(&be.url).arg("load").arg(&doc).status().unwrap().success());
            // in chunks of 100 resources and daily parts of 3 accounts (the undisturbed run: one
            // chunk, one transaction): a kill lands between chunks or parts of a run as well as
            // between runs
            let mut child = billrun(&be.url)
                .args(["tick", "--now", now, "--chunk-resources", "100"])
                .env("BILLRUN_DAILY_BATCH_ACCOUNTS", "3")
                .stdout(Stdio::null())
                .spawn()
                .unwrap();
            std::thread::sleep(duration.mul_f64((trial as f64 + 1.0) / (trials as f64 + 1.0)));
            let _ = child.kill(); // SIGKILL: no chance to clean up
            let _ = child.wait();
            let done = settle_runs(&be.url);
            interrupted += (done < total_runs) as u32;
            assert!(
                billrun(&be.url)
                    .args(["tick", "--now", now])
                    .env("BILLRUN_DAILY_BATCH_ACCOUNTS", "3")
                    .status()
                    .unwrap()
                    .success(),
                "{name} trial {trial}: resume"
            );
            let got = String::from_utf8(billrun(&be.url).arg("export").output().unwrap().stdout).unwrap();
            assert_eq!(got, expected, "{name} trial {trial}: killed after {done} of {total_runs} runs");
        }
        assert!(interrupted > 0, "{name}: no trial hit the middle of the catch-up");
        eprintln!("{name}: {trials} kill -9 trials, {interrupted} interrupted mid-catch-up, all recovered to the same ledger");
    }
}

/// Rows of job_runs in the given outcome.
async fn runs_in(url: &str, outcome: &str) -> i64 {
    count(url, format!("SELECT COUNT(*) FROM job_runs WHERE outcome = '{outcome}'")).await
}

/// The number a `SELECT COUNT(*)` returns on a connection of its own (0 if it fails).
async fn count(url: &str, sql: String) -> i64 {
    let db = billrun::store::db::Db::connect(url).await.unwrap();
    let n = db
        .rows(sqlx::AssertSqlSafe(sql), vec![], &[billrun::store::db::Kind::Int])
        .await
        .map(|r| r[0].int(0))
        .unwrap_or(0);
    db.close().await;
    n
}

fn still_running(child: &std::process::Child) -> bool {
    // signal 0 checks that the process exists; a zombie (exited, not yet waited for) does too,
    // so look at its state
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.id())).unwrap_or_default();
    !stat.is_empty() && !stat.contains(") Z ")
}

fn signal(child: &std::process::Child, sig: &str) {
    assert!(Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success());
}

/// SIGTERM in the middle of a catch-up: exit 0 after a whole run, nothing half-written; the next
/// tick completes it to the undisturbed ledger.
#[tokio::test]
async fn sigterm_finishes_the_run_and_exits_0() {
    let (_dir, doc) = world_doc(100, 1000);
    let now = "2023-11-16T06:00:00Z";
    for name in common::available() {
        let (_calm, expected, duration) = undisturbed(name, &doc, now).await;
        let be = common::fresh(name).await;
        assert!(billrun(&be.url).arg("load").arg(&doc).status().unwrap().success());
        let child = billrun(&be.url)
            .args(["tick", "--now", now])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        // signal once the catch-up is under way (a few runs done), not during start-up
        let deadline = std::time::Instant::now() + duration * 20;
        while runs_in(&be.url, "ok").await < 3 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        signal(&child, "-TERM");
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{name}: SIGTERM exits 0");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("stopped by a signal"),
            "{name}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let partial = String::from_utf8(billrun(&be.url).arg("export").output().unwrap().stdout).unwrap();
        assert!(partial.len() < expected.len() && expected.starts_with(&partial[..partial.len().min(1000)]));
        assert!(billrun(&be.url).args(["tick", "--now", now]).status().unwrap().success());
        let got = String::from_utf8(billrun(&be.url).arg("export").output().unwrap().stdout).unwrap();
        assert_eq!(got, expected, "{name}: the next start completes the run");
    }
}

/// A replica paused (SIGSTOP) past its lease is taken over; once resumed it writes nothing.
#[tokio::test]
async fn a_paused_replica_is_taken_over_and_writes_nothing() {
    if common::pg_url().is_none() {
        return;
    }
    paused_replica_writes_nothing(Pause::HoldingARun).await;
}

/// The same with the replica paused in the middle of a COPY that posts ledger lines: the server
/// waits for the rest of the data while the transaction holds the accounts' row locks, and no
/// server timeout ends that wait (the idle-in-transaction timeout does not apply to an active
/// statement, and a statement timeout is not acted on while the server reads from the client).
/// What ends it is the replica taking the run over, which ends the paused one's session; without
/// that the other replica waited on those locks for good.
#[tokio::test]
async fn a_replica_paused_inside_a_copy_is_taken_over_and_writes_nothing() {
    if common::pg_url().is_none() {
        return;
    }
    paused_replica_writes_nothing(Pause::InsideACopy).await;
}

#[derive(Clone, Copy, PartialEq)]
enum Pause {
    HoldingARun,
    InsideACopy,
}

/// Sessions of this database stopped inside `COPY ledger ... FROM STDIN`, waiting for the client.
async fn sessions_waiting_inside_a_copy(url: &str) -> i64 {
    count(
        url,
        "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() AND state = 'active' \
         AND query LIKE 'COPY ledger%' AND wait_event = 'ClientRead'"
            .to_string(),
    )
    .await
}

/// Polls until the replica is caught in the moment `pause` names, stops it (SIGSTOP) and checks
/// it still is; false if it finished first.
async fn stopped_while(url: &str, replica: &std::process::Child, pause: Pause) -> bool {
    let caught = || async {
        match pause {
            Pause::HoldingARun => runs_in(url, "running").await > 0,
            Pause::InsideACopy => sessions_waiting_inside_a_copy(url).await > 0,
        }
    };
    while still_running(replica) {
        if caught().await {
            signal(replica, "-STOP");
            // a COPY whose data the client had all sent would end by itself meanwhile
            if pause == Pause::InsideACopy {
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            if caught().await {
                return true;
            }
            signal(replica, "-CONT");
        }
        if pause == Pause::HoldingARun {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
    false
}

async fn paused_replica_writes_nothing(pause: Pause) {
    let (_dir, doc) = world_doc(200, 4000);
    let now = "2023-11-15T08:00:00Z";
    let (_calm, expected, duration) = undisturbed("postgres", &doc, now).await;

    // stop it while it holds a claim (or is inside a COPY); a replica that finished before it was
    // caught is tried again on a fresh database
    let mut catch_ups = 0;
    let (be, paused) = loop {
        catch_ups += 1;
        assert!(catch_ups <= 8, "the replica was never caught in {} catch-ups", catch_ups - 1);
        let be = common::fresh("postgres").await;
        assert!(billrun(&be.url).arg("load").arg(&doc).status().unwrap().success());
        let paused = billrun(&be.url)
            .args(["tick", "--now", now])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if stopped_while(&be.url, &paused, pause).await {
            break (be, paused);
        }
        let _ = paused.wait_with_output();
    };
    // another replica waits out the 3 s lease, takes the run over and finishes the catch-up
    // (bounded: if it waited on the paused replica's locks for good, the test fails, not hangs)
    let other = billrun(&be.url)
        .args(["tick", "--now", now])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let limit = std::time::Duration::from_secs(60) + duration * 5;
    let give_up = std::time::Instant::now() + limit;
    while still_running(&other) {
        if std::time::Instant::now() > give_up {
            signal(&other, "-KILL");
            signal(&paused, "-KILL");
            panic!("the replica taking over was still waiting after {limit:?}: the paused replica's locks were never released");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let other = other.wait_with_output().unwrap();
    assert!(other.status.success(), "{}", String::from_utf8_lossy(&other.stderr));
    let after_takeover = String::from_utf8(billrun(&be.url).arg("export").output().unwrap().stdout).unwrap();
    assert_eq!(after_takeover, expected);
    signal(&paused, "-CONT");
    let out = paused.wait_with_output().unwrap();
    // the paused replica's transaction was ended by the server or refused at commit: it failed or
    // found the work done, and wrote nothing either way
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() || stderr.contains("error"), "{stderr}");
    let finally = String::from_utf8(billrun(&be.url).arg("export").output().unwrap().stdout).unwrap();
    assert_eq!(finally, expected, "nothing written by the paused replica");
    let db = billrun::store::db::Db::connect(&be.url).await.unwrap();
    let attempts = db
        .rows("SELECT MAX(attempt) FROM job_runs", vec![], &[billrun::store::db::Kind::Int])
        .await
        .unwrap()[0]
        .int(0);
    db.close().await;
    assert!(attempts >= 2, "a run was taken over from the paused replica");
    eprintln!(
        "paused replica (caught in catch-up {catch_ups}): exit {:?}; {}",
        out.status.code(),
        stderr.lines().last().unwrap_or("")
    );
    let status: serde_json::Value = serde_json::from_slice(&billrun(&be.url).args(["status", "--json"]).output().unwrap().stdout).unwrap();
    assert!(status["jobs"].as_array().unwrap().iter().all(|j| j["failures"] == 0), "{status}");
}

/// Top-ups made by an operator while a catch-up settles the same accounts: every balance equals its
/// opening balance plus its top-ups minus the amounts due of its lines (no lost update).
#[tokio::test]
async fn topups_during_a_run_are_never_lost() {
    let (_dir, doc) = world_doc(40, 100);
    for name in common::available() {
        let be = common::fresh(name).await;
        assert!(billrun(&be.url).arg("load").arg(&doc).status().unwrap().success());
        let mut tick = billrun(&be.url)
            .args(["tick", "--now", "2023-11-28T00:00:00Z", "--chunk-resources", "25"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        // four operators, twelve top-ups each, while the run moves the same balances
        let url = be.url.clone();
        std::thread::scope(|scope| {
            for op in 0..4 {
                let url = &url;
                scope.spawn(move || {
                    for i in 0..12 {
                        let account = format!("acct{:04}", (op * 12 + i) % 8);
                        let out = billrun(url)
                            .args(["topup", &account, "1.25", "--at", "2023-11-20T00:00:00Z"])
                            .output()
                            .unwrap();
                        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                    }
                });
            }
        });
        let topups: std::collections::HashMap<String, rust_decimal::Decimal> = (0..8)
            .map(|a| (format!("acct{a:04}"), rust_decimal::Decimal::new(125 * 6, 2)))
            .collect();
        let tick_was_running = tick.try_wait().unwrap().is_none();
        assert!(tick.wait().unwrap().success(), "{name}");
        let csv = billrun(&be.url).arg("export").output().unwrap().stdout;
        let mut due: std::collections::HashMap<String, rust_decimal::Decimal> = Default::default();
        let mut reader = csv::Reader::from_reader(csv.as_slice());
        let headers = reader.headers().unwrap().clone();
        let col = |n: &str| headers.iter().position(|h| h == n).unwrap();
        let (acc, amount) = (col("account_id"), col("amount_due"));
        for r in reader.records() {
            let r = r.unwrap();
            *due.entry(r[acc].to_string()).or_default() += r[amount].parse::<rust_decimal::Decimal>().unwrap();
        }
        let status: serde_json::Value =
            serde_json::from_slice(&billrun(&be.url).args(["status", "--json"]).output().unwrap().stdout).unwrap();
        let jobs: Vec<&str> = status["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["job"].as_str().unwrap())
            .collect();
        assert_eq!(jobs, ["daily", "settle"], "{name}: chunks are parts of runs, not jobs");
        for a in status["accounts"].as_array().unwrap() {
            let id = a["id"].as_str().unwrap();
            let n: usize = id[4..].parse().unwrap();
            let opening = rust_decimal::Decimal::from(30 + (n * 37) % 200);
            let expected = opening + topups.get(id).copied().unwrap_or_default() - due.get(id).copied().unwrap_or_default();
            let balance: rust_decimal::Decimal = a["balance"].as_str().unwrap().parse().unwrap();
            assert_eq!(balance, expected, "{name}: account {id}");
        }
        eprintln!("{name}: 48 top-ups during a catch-up (still running after them: {tick_was_running}); every balance adds up");
    }
}

/// A daemon started after 30 hours down (its world began 31 hours ago on the wall clock) settles
/// the missed hours in order, with the daily run in between, and ends with the ledger and outbox
/// of a process that ran at every scheduled instant.
#[tokio::test]
async fn a_daemon_back_from_30_hours_down_catches_up_in_order() {
    let wall = chrono::Utc::now().timestamp();
    let h0 = wall - wall.rem_euclid(3600) - 31 * 3600;
    let iso = |t: i64| chrono::DateTime::from_timestamp(t, 0).unwrap().to_rfc3339();
    let mut res = Vec::new();
    for r in 0..20 {
        res.push(format!(
            r#"{{"id": "vm{r:02}", "account": "a{}", "plan": "p", "mode": "pay_per_use", "quantity": {}, "created_at": "{}"}}"#,
            r % 4,
            1 + r % 3,
            iso(h0 + 600 + r * 97)
        ));
    }
    // a monthly subscription expiring in a few days: the daily run renews it and alerts
    res.push(format!(
        r#"{{"id": "sub", "account": "a0", "plan": "p", "mode": "monthly", "purchased_at": "{}", "auto_renew": true}}"#,
        iso(h0 - 27 * 86_400)
    ));
    let doc_text = format!(
        r#"{{"accounts": [{}], "plans": [{{"id": "p", "product": "KooPhone", "hourly": {{"instance": "0.36"}}, "monthly": "9.90"}}], "resources": [{}]}}"#,
        (0..4)
            .map(|a| format!(r#"{{"id": "a{a}", "balance": "80.00"}}"#))
            .collect::<Vec<_>>()
            .join(","),
        res.join(",")
    );
    let dir = tempfile::tempdir().unwrap();
    let doc = dir.path().join("world.json");
    std::fs::write(&doc, doc_text).unwrap();
    for name in common::available() {
        let down = common::fresh(name).await;
        assert!(billrun(&down.url).arg("load").arg(&doc).status().unwrap().success());
        let daemon = billrun(&down.url)
            .args(["run", "--poll-seconds", "1"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // caught up: the settle run of the current hour is recorded
        let caught_up = chrono::Utc::now().timestamp();
        let target = caught_up - caught_up.rem_euclid(3600);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        let db = billrun::store::db::Db::connect(&down.url).await.unwrap();
        let runs = |job: &'static str| {
            let db = db.clone();
            async move {
                db.rows(
                    "SELECT scheduled_at FROM job_runs WHERE job = $1 AND outcome = 'ok' ORDER BY scheduled_at",
                    vec![job.into()],
                    &[billrun::store::db::Kind::Int],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| r.int(0))
                .collect::<Vec<i64>>()
            }
        };
        while runs("settle").await.last().copied().unwrap_or(0) < target && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        signal(&daemon, "-TERM");
        let out = daemon.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let (settles, dailies) = (runs("settle").await, runs("daily").await);
        db.close().await;
        assert!(settles.len() >= 29, "{name}: {} settle runs", settles.len());
        assert!(settles.windows(2).all(|w| w[1] - w[0] == 3600), "{name}: every hour, in order");
        assert!(!dailies.is_empty(), "{name}: the daily run in between");
        // the reference never stopped: a tick at every scheduled instant, settle and daily
        let always = common::fresh(name).await;
        assert!(billrun(&always.url).arg("load").arg(&doc).status().unwrap().success());
        let mut instants: Vec<i64> = settles.iter().chain(&dailies).copied().collect();
        instants.sort();
        for t in instants {
            assert!(billrun(&always.url)
                .args(["tick", "--now", &iso(t)])
                .stdout(Stdio::null())
                .status()
                .unwrap()
                .success());
        }
        let export = |url: &str| String::from_utf8(billrun(url).arg("export").output().unwrap().stdout).unwrap();
        let notes = |url: &str| String::from_utf8(billrun(url).args(["notifications", "--json"]).output().unwrap().stdout).unwrap();
        let csv = export(&down.url);
        assert!(
            csv.lines().count() > 400,
            "{name}: a busy day and a half: {} lines",
            csv.lines().count()
        );
        assert_eq!(csv, export(&always.url), "{name}: the same ledger as a process that never stopped");
        let strip = |s: String| s.replace("\"delivered\"", "\"pending\"");
        assert_eq!(strip(notes(&down.url)), strip(notes(&always.url)), "{name}: the same notifications");
        eprintln!(
            "{name}: back after 30 h down: {} settle runs (hourly, in order) and {} daily runs; ledger equals the never-stopped one",
            settles.len(),
            dailies.len()
        );
    }
}

/// A load stuck while it holds the settlement plan lock (here: a session holding it the way a load
/// does): planning waits for it rather than fail, but says so every 10 s, naming the session; once
/// it is gone the run goes on and bills as if nothing happened.
#[tokio::test]
async fn planning_waits_for_a_stuck_load_and_says_so() {
    if common::pg_url().is_none() {
        return;
    }
    let (_dir, doc) = world_doc(20, 100);
    let now = "2023-11-15T08:00:00Z";
    let (_calm, expected, _) = undisturbed("postgres", &doc, now).await;
    let be = common::fresh("postgres").await;
    assert!(billrun(&be.url).arg("load").arg(&doc).status().unwrap().success());
    let holder = billrun::store::db::Db::connect(&be.url).await.unwrap();
    let mut tx = holder.begin().await.unwrap();
    use billrun::store::db::Kind;
    let pid = tx.rows("SELECT pg_backend_pid()::BIGINT", vec![], &[Kind::Int]).await.unwrap()[0].int(0);
    tx.rows(
        "SELECT value FROM meta WHERE key = 'settle_plan_lock' FOR SHARE",
        vec![],
        &[Kind::Text],
    )
    .await
    .unwrap();
    // the lease is 3 s: the planner keeps its claim while it waits
    let tick = billrun(&be.url)
        .args(["tick", "--now", now])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(12)).await;
    assert!(still_running(&tick), "the run waited for the lock");
    assert_eq!(runs_in(&be.url, "ok").await, 0, "nothing was settled meanwhile");
    tx.rollback().await.unwrap();
    holder.close().await;
    let out = tick.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let warning = stderr
        .lines()
        .find(|l| l.contains("waits for the settlement plan lock"))
        .unwrap_or_else(|| panic!("no warning while waiting: {stderr}"));
    assert!(warning.contains(&format!("pid {pid} (billrun, idle in transaction")), "{warning}");
    let export = String::from_utf8(billrun(&be.url).arg("export").output().unwrap().stdout).unwrap();
    assert_eq!(export, expected);
}

/// On PostgreSQL one runner settles a run's chunks side by side (two workers by default): while
/// the first chunk waits on a locked account, the other chunks of the run are settled, and the
/// ledger and balances end as one chunk at a time leaves them, ids included.
#[tokio::test]
async fn one_runner_settles_chunks_side_by_side_and_posts_what_one_at_a_time_does() {
    use billrun::store::db::Kind;
    if common::pg_url().is_none() {
        return;
    }
    let doc = world(40, 100);
    let now = common::t("2023-11-16T06:00:00Z");
    let one = common::fresh("postgres").await;
    let mut serial = one.open("UTC").await;
    serial.settle.chunk_resources = Some(5);
    serial.settle.chunk_workers = 1;
    serial.load_json("world.json", &doc).await.unwrap();
    serial.tick(now, |_, _| {}).await.unwrap();

    let two = common::fresh("postgres").await;
    let mut side = two.open("UTC").await;
    side.settle.chunk_resources = Some(5);
    assert_eq!(side.settle.chunk_workers, 2, "the default");
    side.load_json("world.json", &doc).await.unwrap();
    // the first chunk holds the pay-per-use account first in (bucket, account) order; accounts
    // 0, 10, 20 and 30 hold subscriptions only
    let first = (0..40)
        .filter(|a| a % 10 != 0)
        .map(|a| format!("acct{a:04}"))
        .min_by_key(|a| (billrun::billing::settle::chunk_bucket(a), a.clone()))
        .unwrap();
    let mut lock = side.db.begin().await.unwrap();
    lock.exec("SELECT id FROM accounts WHERE id = $1 FOR UPDATE", vec![first.as_str().into()])
        .await
        .unwrap();
    let done_chunks = "SELECT COUNT(*) FROM job_runs WHERE job LIKE 'settle#%' AND outcome = 'ok'";
    let watch = async {
        // with one chunk at a time nothing is done until the lock goes: give up after 30 s
        let mut seen = 0;
        for _ in 0..300 {
            seen = side.db.rows(done_chunks, vec![], &[Kind::Int]).await.unwrap()[0].int(0);
            if seen >= 3 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        lock.rollback().await.unwrap();
        seen
    };
    let (ticked, seen) = tokio::join!(side.tick(now, |_, _| {}), watch);
    ticked.unwrap();
    assert!(seen >= 3, "other chunks were settled while the first waited: {seen}");

    assert_eq!(common::csv(&side).await, common::csv(&serial).await, "same lines, same ids");
    let balances = "SELECT id, balance, COALESCE(in_arrears_since, -1) FROM accounts ORDER BY id";
    let kinds = [Kind::Text, Kind::Money, Kind::Int];
    let (a, b) = (
        serial.db.rows(balances, vec![], &kinds).await.unwrap(),
        side.db.rows(balances, vec![], &kinds).await.unwrap(),
    );
    assert_eq!(a.len(), 40);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!((x.text(0), x.money(1), x.int(2)), (y.text(0), y.money(1), y.int(2)));
    }
    let lines = "SELECT COUNT(*) FROM ledger";
    let n = serial.db.rows(lines, vec![], &[Kind::Int]).await.unwrap()[0].int(0);
    assert!(n > 1500, "lines: {n}");
    serial.db.close().await;
    side.db.close().await;
}

/// A tick's stderr without the terminal colours tracing writes.
fn plain_log(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|&c| c == 'm');
        } else {
            out.push(c);
        }
    }
    out
}

/// What a settled database holds, as an operator and accounting see it: the bills CSV, the
/// outbox, the states, and the ledger in posting order.
async fn holdings(url: &str) -> Vec<String> {
    let text = |args: &[&str]| String::from_utf8(billrun(url).args(args).output().unwrap().stdout).unwrap();
    let db = billrun::store::db::Db::connect(url).await.unwrap();
    let order = db
        .rows(
            "SELECT transaction_id, balance_after FROM ledger ORDER BY seq",
            vec![],
            &[billrun::store::db::Kind::Text, billrun::store::db::Kind::Text],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| format!("{} {}\n", r.text(0), r.text(1)))
        .collect::<String>();
    db.close().await;
    vec![
        text(&["export"]),
        text(&["notifications", "--json"]),
        text(&["status", "--json"]),
        order,
    ]
}

/// On SQLite the chunks of a run (of several chunks, or of one) are computed in parts (ranges of buckets)
/// on a read transaction of another connection while their own transaction posts the part before:
/// the ledger (ids, amounts, balances, posting order), outbox and states equal those of chunks
/// computed whole (`--chunk-parts 1`), in a busy world (arrears beginning, renewals) and in the
/// demo's (usage segments, packages, counted units, freezes and releases).
#[tokio::test]
async fn chunks_computed_in_parts_post_what_whole_ones_do() {
    let (_dir, doc) = world_doc(40, 100);
    let demo = std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/demo.json"));
    // (world, now, chunk size, parts compared, fewest chunks settled)
    for (doc, now, chunk, variants, least) in [
        (doc.clone(), "2023-11-18T00:00:00Z", "30", &[1, 8, 64][..], 100),
        // runs of one chunk are parted too (SQLite's default since session 18): one a run
        (doc, "2023-11-18T00:00:00Z", "100000", &[1, 8][..], 50),
        (demo, "2023-05-20T00:00:00Z", "2", &[1, 8], 100),
    ] {
        let mut seen: Vec<Vec<String>> = Vec::new();
        for &parts in variants {
            let be = common::fresh("sqlite").await;
            assert!(billrun(&be.url).arg("load").arg(&doc).status().unwrap().success());
            let out = billrun(&be.url)
                .args([
                    "tick",
                    "--now",
                    now,
                    "--chunk-resources",
                    chunk,
                    "--chunk-parts",
                    &parts.to_string(),
                ])
                .env("BILLRUN_LOG", "billrun::store::settle=debug")
                .output()
                .unwrap();
            let log = plain_log(&out.stderr);
            assert!(out.status.success(), "{}: {log}", doc.display());
            let chunks = log.matches("settled a chunk").count();
            let parted = log.matches(&format!("overlapped=true parts={parts} ")).count();
            if parts == 1 {
                assert!(
                    chunks > least && !log.contains("overlapped=true"),
                    "{}: {chunks} chunks",
                    doc.display()
                );
            } else {
                // every chunk of a run of several, cut into as many parts as it has buckets for
                // (these accounts' buckets lie close together: the middle chunks have few)
                let several = log.matches("overlapped=true").count();
                assert!(
                    several > least && 2 * parted >= several,
                    "{}: {parted} of {several} chunks in {parts} parts",
                    doc.display()
                );
            }
            seen.push(holdings(&be.url).await);
        }
        assert!(
            seen[0][0].lines().count() > 100,
            "{}: {} bill lines",
            doc.display(),
            seen[0][0].lines().count()
        );
        for (i, what) in ["export", "notifications", "status", "posting order"].iter().enumerate() {
            for (v, got) in variants.iter().zip(&seen).skip(1) {
                assert_eq!(got[i], seen[0][i], "{}: {what}, {v} parts", doc.display());
            }
        }
    }
}

/// A part that fails to post fails its chunk whole: on SQLite the computing side stops, the
/// chunk's transaction rolls back (no line of its earlier parts, no balance moved), the tick exits
/// 1, and once the obstacle is gone the next tick posts what an undisturbed run does.
#[tokio::test]
async fn a_part_that_fails_to_post_leaves_its_chunk_unposted() {
    use billrun::billing::settle::chunk_bucket;
    use billrun::store::db::{Db, Kind};
    // accounts whose ids spread them over the buckets (the world's own ids lie close together)
    let spread = |a: usize| format!("k{:06x}", (a as u64 * 2_654_435_761) % 16_777_216);
    let mut text = world(40, 100);
    for a in 0..40 {
        text = text.replace(&format!("\"acct{a:04}\""), &format!("\"{}\"", spread(a)));
    }
    let dir = tempfile::tempdir().unwrap();
    let doc = dir.path().join("world.json");
    std::fs::write(&doc, &text).unwrap();
    let now = "2023-11-15T06:00:00Z";
    let (_calm, expected, _) = undisturbed("sqlite", &doc, now).await;
    // --chunk-resources 89: chunk 0 holds every account below the 89th pay-per-use resource's in
    // (bucket, account) order, cut into 8 parts of its buckets
    let mut keys: Vec<(u16, String)> = (0..100)
        .filter(|r| r % 10 != 0)
        .map(|r| (chunk_bucket(&spread(r % 40)), spread(r % 40)))
        .collect();
    keys.sort();
    let key89 = keys[88].clone();
    let rows = common::rows(&expected);
    let first_time = rows.iter().find(|r| r["transaction_type"] == "usage").unwrap()["transaction_time"].clone();
    let chunk0: Vec<&std::collections::HashMap<String, String>> = rows
        .iter()
        .filter(|r| r["transaction_time"] == first_time && r["transaction_type"] == "usage")
        .filter(|r| (chunk_bucket(&r["account_id"]), r["account_id"].clone()) < key89)
        .collect();
    let part = |account: &str| (8 * u32::from(chunk_bucket(account)) / u32::from(key89.0).max(1)).min(7);
    let mut parts: Vec<u32> = chunk0.iter().map(|r| part(&r["account_id"])).collect();
    parts.dedup();
    assert!(
        parts.len() >= 2,
        "chunk 0's lines of the first hour lie in several parts: {parts:?}"
    );
    // its last line in id order: in its last part, posted after the parts before it
    let planted = chunk0.iter().map(|r| r["transaction_id"].clone()).max().unwrap();
    let be = common::fresh("sqlite").await;
    assert!(billrun(&be.url).arg("load").arg(&doc).status().unwrap().success());
    let db = Db::connect(&be.url).await.unwrap();
    let books = async || -> Vec<String> {
        let rows = db
            .rows("SELECT id, balance FROM accounts ORDER BY id", vec![], &[Kind::Text, Kind::Text])
            .await
            .unwrap();
        rows.iter().map(|r| format!("{} {}", r.text(0), r.text(1))).collect()
    };
    let before = books().await;
    let purchases = db.rows("SELECT COUNT(*) FROM ledger", vec![], &[Kind::Int]).await.unwrap()[0].int(0);
    db.exec(
        sqlx::AssertSqlSafe(format!(
            "INSERT INTO ledger (transaction_id, transaction_time, account_id, resource_id, product, plan_id, billing_mode, \
             transaction_type, period_start, period_end, quantity, unit_price, list_amount, truncated_amount, amount_due, paid_amount, \
             arrears_amount, balance_after, currency, line_key, revision, run_job, run_at, explain) VALUES ('{planted}', 0, 'x', 'x', \
             'x', 'x', 'pay_per_use', 'usage', 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 'USD', 'planted', 0, 'test', 0, '{{}}')"
        )),
        vec![],
    )
    .await
    .unwrap();
    let out = billrun(&be.url)
        .args(["tick", "--now", now, "--chunk-resources", "89"])
        .env("BILLRUN_LOG", "billrun::store::settle=debug")
        .output()
        .unwrap();
    let log = plain_log(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(
        log.contains("chunks=2") && log.contains("chunk 1 of 2") && log.contains("UNIQUE"),
        "{log}"
    );
    let lines = db.rows("SELECT COUNT(*) FROM ledger", vec![], &[Kind::Int]).await.unwrap()[0].int(0);
    assert_eq!(
        lines,
        purchases + 1,
        "the purchases and the planted line: nothing of the failed chunk's earlier parts"
    );
    assert_eq!(books().await, before, "no balance moved");
    db.exec("DELETE FROM ledger WHERE line_key = 'planted'", vec![]).await.unwrap();
    db.close().await;
    assert!(billrun(&be.url)
        .args(["tick", "--now", now, "--chunk-resources", "89"])
        .status()
        .unwrap()
        .success());
    let got = String::from_utf8(billrun(&be.url).arg("export").output().unwrap().stdout).unwrap();
    assert_eq!(got, expected);
}
