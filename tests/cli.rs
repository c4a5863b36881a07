//! The binary as operators and scripts use it: exit codes, messages, files, JSON shapes.

mod common;

use std::process::{Command, Output};

fn billrun(url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_billrun"))
        .arg("--database-url")
        .arg(url)
        .args(args)
        .env_remove("BILLRUN_TIMEZONE")
        .env_remove("BILLRUN_CONFIG")
        .output()
        .expect("billrun runs")
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn fails(o: &Output, code: i32, mention: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    assert!(err.contains(mention), "stderr should mention {mention:?}: {err}");
}

#[tokio::test]
async fn operator_session_end_to_end() {
    common::on_each_backend(async |be| {
        let dir = tempfile::tempdir().unwrap();
        let url = be.url.as_str();
        let good = dir.path().join("good.json");
        std::fs::write(
            &good,
            r#"{"accounts": [{"id": "=acme", "balance": "1.00"}],
                "plans": [{"id": "phone-pro", "product": "KooPhone", "hourly": {"instance": "0.72"}}],
                "resources": [{"id": "p1", "account": "=acme", "plan": "phone-pro", "mode": "pay_per_use", "quantity": 2,
                               "created_at": "2023-04-18T08:20:15Z"}]}"#,
        )
        .unwrap();
        ok(&billrun(url, &["migrate"]));
        ok(&billrun(url, &["load", good.to_str().unwrap()]));
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, r#"{"accounts": [{"id": "b2"}], "resources": [{"id": "p9", "account": "b2", "plan": "phone-pro", "mode": "pay_per_use", "created_at": "2023-04-18T08:00:00"}]}"#).unwrap();
        fails(&billrun(url, &["load", bad.to_str().unwrap()]), 2, "resources[0] (id \"p9\"): field `created_at`");
        fails(&billrun(url, &["tick", "--now", "2023-04-18T12:00:00"]), 2, "--now");
        let out = ok(&billrun(url, &["tick", "--now", "2023-04-18T12:00:00Z"]));
        assert!(out.contains("3 settle runs, 0 daily runs, 3 lines, 3.83 due"), "{out}");
        let csv_path = dir.path().join("bills.csv");
        ok(&billrun(url, &["export", "--out", csv_path.to_str().unwrap()]));
        let csv = std::fs::read_to_string(&csv_path).unwrap();
        let mut lines = csv.lines();
        assert_eq!(
            lines.next().unwrap(),
            "transaction_id,transaction_time,account_id,resource_id,product,plan_id,billing_mode,transaction_type,billing_item,period_start,period_end,usage_seconds,quantity,unit_price,list_amount,truncated_amount,amount_due,paid_amount,arrears_amount,balance_after,currency"
        );
        let first: Vec<&str> = lines.next().unwrap().split(',').collect();
        // 0.72/h x 2 x 2,385 s / 3600 = 0.954, due 0.95, truncated 0.004; the account id is defused
        assert_eq!(&first[2..], ["'=acme", "p1", "KooPhone", "phone-pro", "pay_per_use", "usage", "instance", "2023-04-18T08:20:15Z", "2023-04-18T09:00:00Z", "2385", "2", "0.72", "0.954", "0.004", "0.95", "0.95", "0.00", "0.05", "USD"]);
        let second: Vec<&str> = lines.next().unwrap().split(',').collect();
        assert_eq!(&second[14..20], ["1.44", "0.00", "1.44", "0.05", "1.39", "-1.39"]);
        let explained = ok(&billrun(url, &["explain", first[0]]));
        assert!(explained.contains("0.72/h x 2 x 2385 s / 3600 = 0.954"), "{explained}");
        assert!(explained.contains("settle run scheduled at 2023-04-18T10:00:00Z"), "{explained}");
        let j: serde_json::Value = serde_json::from_str(&ok(&billrun(url, &["explain", first[0], "--json"]))).unwrap();
        assert_eq!(j["inputs"]["seconds"], 2385);
        fails(&billrun(url, &["explain", "tx_nope"]), 2, "tx_nope");

        let status: serde_json::Value = serde_json::from_str(&ok(&billrun(url, &["status", "--json"]))).unwrap();
        assert_eq!(status["accounts"][0]["id"], "=acme");
        assert_eq!(status["accounts"][0]["balance"], "-2.83");
        assert_eq!(status["accounts"][0]["in_arrears_since"], "2023-04-18T11:00:00Z");
        assert_eq!(status["resources"][0]["state"], "running");
        assert_eq!(status["resources"][0]["mode"], "pay_per_use");
        let settle = status["jobs"].as_array().unwrap().iter().find(|j| j["job"] == "settle").expect("the settle job");
        assert_eq!(settle["last_scheduled_at"], "2023-04-18T12:00:00Z");
        assert_eq!(settle["last_outcome"], "ok");
        let daily = status["jobs"].as_array().unwrap().iter().find(|j| j["job"] == "daily").expect("the daily job is listed");
        assert!(daily["last_scheduled_at"].is_null(), "no daily run yet: {daily}");

        ok(&billrun(url, &["topup", "=acme", "5.00", "--at", "2023-04-18T12:30:00Z"]));
        fails(&billrun(url, &["topup", "=acme", "5.001"]), 2, "AMOUNT");
        let notes: serde_json::Value = serde_json::from_str(&ok(&billrun(url, &["notifications", "--json"]))).unwrap();
        let kinds: Vec<&str> = notes.as_array().unwrap().iter().map(|n| n["kind"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["arrears_began", "arrears_cleared"]);
        assert_eq!(notes[1]["at"], "2023-04-18T12:30:00Z");
        assert!(notes[0]["resource_id"].is_null());

        let dry = ok(&billrun(url, &["settle", "--hour", "2023-04-18T09:00:00Z", "--dry-run"]));
        assert!(dry.contains("nothing to post"), "{dry}");
        fails(&billrun(url, &["settle", "--hour", "2023-04-18T09:30:00Z"]), 2, "--hour");
        fails(&billrun(url, &["--timezone", "Asia/Tokyo", "status"]), 2, "--timezone");
        fails(&billrun(url, &["frobnicate"]), 2, "frobnicate");
    })
    .await;
}

#[test]
fn passwords_stay_out_of_errors() {
    let o = billrun("postgres://billing:s3cretpw@127.0.0.1:1/nowhere", &["status"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(!err.contains("s3cretpw"), "{err}");
    assert!(err.contains("billing:***@127.0.0.1"), "{err}");
}

#[test]
fn demo_runs_on_a_fresh_directory() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("demo");
    let o = Command::new(env!("CARGO_BIN_EXE_billrun"))
        .args(["demo", "--dir", d.to_str().unwrap()])
        .output()
        .unwrap();
    let out = ok(&o);
    assert!(out.contains("account globex is in arrears"), "{out}");
    for shown in [
        "renewal_succeeded",
        "renewal_failed",
        "expiry_alert",
        "expired",
        "frozen",
        "released",
    ] {
        assert!(out.contains(shown), "the demo shows {shown}: {out}");
    }
    let csv = std::fs::read_to_string(d.join("bills.csv")).unwrap();
    assert!(csv.contains(",monthly,renewal,,"), "a renewal line");
    assert!(csv.contains(",yearly,purchase,,"), "a purchase line");
    assert!(out.contains("email@pk1"), "units drawn from a package: {out}");
    assert!(out.contains("package_expiry_alert"), "{out}");
    assert!(csv.contains(",usage,email@pk1,"), "a line drawn from the package");
    // a second demo starts afresh
    let again = ok(&Command::new(env!("CARGO_BIN_EXE_billrun"))
        .args(["demo", "--dir", d.to_str().unwrap()])
        .output()
        .unwrap());
    assert_eq!(again, out);
}

#[test]
fn subscription_commands() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("b.db").display());
    let doc = dir.path().join("s.json");
    std::fs::write(
        &doc,
        r#"{"accounts": [{"id": "acme", "balance": "500.00"}],
            "plans": [{"id": "pp", "product": "KooPhone", "hourly": {"instance": "0.36"}, "monthly": "99.00"}],
            "resources": [{"id": "s1", "account": "acme", "plan": "pp", "mode": "monthly", "purchased_at": "2023-06-16T00:00:00Z"},
                          {"id": "s2", "account": "acme", "plan": "pp", "mode": "monthly", "purchased_at": "2023-06-16T00:00:00Z"},
                          {"id": "s3", "account": "acme", "plan": "pp", "mode": "monthly", "purchased_at": "2023-06-16T00:00:00Z"}]}"#,
    )
    .unwrap();
    ok(&billrun(&url, &["load", doc.to_str().unwrap()]));
    let out = ok(&billrun(&url, &["renew", "s1", "--periods", "2", "--at", "2023-06-20T00:00:00Z"]));
    assert!(out.contains("renewed to 2023-09-17T00:00:00Z for 198.00"), "{out}");
    let out = ok(&billrun(&url, &["unsubscribe", "s2", "--at", "2023-06-28T08:58:30Z"]));
    assert!(out.contains("refunded 59.40"), "{out}");
    fails(&billrun(&url, &["to-ppu", "s3"]), 2, "--now");
    fails(&billrun(&url, &["to-ppu", "s3", "--now", "--at-expiry"]), 2, "cannot be used with");
    let out = ok(&billrun(&url, &["to-ppu", "s3", "--at-expiry", "--at", "2023-06-20T00:00:00Z"]));
    assert!(out.contains("billed pay-per-use from 2023-07-17T00:00:00Z"), "{out}");
    fails(&billrun(&url, &["renew", "nope", "--periods", "1"]), 2, "no resource");
    fails(&billrun(&url, &["renew", "s1", "--periods", "0"]), 2, "--periods");
    let status: serde_json::Value = serde_json::from_str(&ok(&billrun(&url, &["status", "--json"]))).unwrap();
    let s1 = status["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == "s1")
        .unwrap()
        .clone();
    assert_eq!(
        (s1["mode"].as_str(), s1["expires_on"].as_str()),
        (Some("monthly"), Some("2023-09-16"))
    );
}

/// The jobs' cron expressions come from flags (or env, or the config file), in the billing time
/// zone: settling every six hours posts the same lines as hourly, at the six-hourly instants; the
/// daily job runs at its configured local time.
#[test]
fn cron_expressions_from_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let doc = dir.path().join("w.json");
    std::fs::write(
        &doc,
        r#"{"accounts": [{"id": "a", "balance": "100.00"}],
            "plans": [{"id": "p", "product": "KooPhone", "hourly": {"instance": "0.36"}, "monthly": "30.00"}],
            "resources": [{"id": "vm", "account": "a", "plan": "p", "mode": "pay_per_use", "created_at": "2023-04-18T00:00:00+08:00"},
                          {"id": "sub", "account": "a", "plan": "p", "mode": "monthly", "purchased_at": "2023-04-18T00:00:00+08:00"}]}"#,
    )
    .unwrap();
    let url = |name: &str| format!("sqlite://{}", dir.path().join(name).display());
    let (hourly, six) = (url("hourly.db"), url("six.db"));
    for u in [&hourly, &six] {
        ok(&billrun(u, &["--timezone", "Asia/Shanghai", "load", doc.to_str().unwrap()]));
    }
    ok(&billrun(&hourly, &["tick", "--now", "2023-04-19T12:00:00+08:00"]));
    let out = ok(&billrun(
        &six,
        &[
            "--settle-cron",
            "0 0 */6 * * *",
            "--daily-cron",
            "0 30 1 * * *",
            "tick",
            "--now",
            "2023-04-19T12:00:00+08:00",
        ],
    ));
    assert!(out.contains("6 settle runs, 2 daily runs"), "{out}");
    let lines = |u: &str| -> Vec<Vec<String>> {
        let csv = ok(&billrun(u, &["export"]));
        let mut r = csv::Reader::from_reader(csv.as_bytes());
        let h = r.headers().unwrap().clone();
        let keep = ["resource_id", "transaction_type", "period_start", "amount_due", "transaction_time"]
            .map(|n| h.iter().position(|x| x == n).unwrap());
        let mut v: Vec<Vec<String>> = r
            .records()
            .map(|rec| {
                let rec = rec.unwrap();
                keep.iter().map(|&i| rec[i].to_string()).collect()
            })
            .collect();
        v.sort();
        v
    };
    let (a, b) = (lines(&hourly), lines(&six));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x[..4], y[..4], "same line, same amount");
    }
    // six-hourly: usage of 00:00-01:00 on the 18th is posted at 06:00 local
    assert!(
        b.iter()
            .any(|l| l[2] == "2023-04-18T00:00:00+08:00" && l[4] == "2023-04-18T06:00:00+08:00"),
        "{b:?}"
    );
    let status: serde_json::Value = serde_json::from_str(&ok(&billrun(&six, &["status", "--json"]))).unwrap();
    let daily = status["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["job"] == "daily")
        .unwrap()
        .clone();
    assert_eq!(daily["last_scheduled_at"], "2023-04-19T01:30:00+08:00", "{status}");
    // a malformed expression is refused, naming the flag
    fails(&billrun(&six, &["--daily-cron", "3 0 * * *", "tick"]), 2, "--daily-cron");
}

/// 100 MB documents: a hostile one (an id of 100 MB, a document cut off after 100 MB of
/// whitespace) exits 2 naming the problem; a genuine one (about 100 MB of usage records) is
/// accepted and billed.
#[test]
fn hundred_megabyte_documents() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("big.db").display());
    let mb = 100 * 1024 * 1024;
    let long_id = dir.path().join("long-id.json");
    std::fs::write(&long_id, format!(r#"{{"accounts": [{{"id": "{}"}}]}}"#, "x".repeat(mb))).unwrap();
    fails(&billrun(&url, &["load", long_id.to_str().unwrap()]), 2, "accounts[0]");
    let cut = dir.path().join("cut.json");
    std::fs::write(&cut, format!(r#"{{"accounts": [{}"#, " ".repeat(mb))).unwrap();
    fails(&billrun(&url, &["load", cut.to_str().unwrap()]), 2, "EOF while parsing");
    // a genuine 100 MB document: one resource and 800,000 short segments
    let big = dir.path().join("usage.json");
    let mut doc = String::with_capacity(mb + 1024);
    doc.push_str(
        r#"{"accounts": [{"id": "acme", "balance": "1000.00"}],
        "plans": [{"id": "drive", "product": "KooDrive", "hourly": {"storage_gb": "0.0001"}}],
        "resources": [{"id": "d1", "account": "acme", "plan": "drive", "mode": "pay_per_use", "created_at": "2024-01-01T00:00:00Z"}],
        "usage": ["#,
    );
    let start = 1_704_067_200i64;
    let n = 800_000;
    for i in 0..n {
        let from = chrono::DateTime::from_timestamp(start + i * 2, 0).unwrap().to_rfc3339();
        let to = chrono::DateTime::from_timestamp(start + i * 2 + 1, 0).unwrap().to_rfc3339();
        let sep = if i == 0 { "" } else { "," };
        doc.push_str(&format!(
            r#"{sep}{{"resource": "d1", "item": "storage_gb", "quantity": "36000", "from": "{from}", "to": "{to}", "at": null}}"#
        ));
    }
    doc.push_str("]}");
    assert!(doc.len() > mb, "{} bytes", doc.len());
    std::fs::write(&big, &doc).unwrap();
    drop(doc);
    let out = ok(&billrun(&url, &["load", big.to_str().unwrap()]));
    assert!(out.contains("800000 usage records"), "{out}");
    // 800,000 one-second uses of 36,000 GB at 0.0001/h: 0.001 each, 800 in all over 445 hours
    ok(&billrun(&url, &["tick", "--now", "2024-01-20T12:00:00Z"]));
    let csv = ok(&billrun(&url, &["export"]));
    let rows = common::rows(&csv);
    let list: rust_decimal::Decimal = rows.iter().map(|r| common::dec(&r["list_amount"])).sum();
    let seconds: i64 = rows.iter().map(|r| r["usage_seconds"].parse::<i64>().unwrap()).sum();
    assert_eq!((seconds, list), (800_000, common::dec("800.0")));
}

/// Hostile command-line arguments: each exits 2 naming the argument, or is accepted; none panics
/// and none changes anything when refused.
#[test]
fn hostile_arguments_exit_2_naming_the_argument() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("args.db").display());
    let doc = dir.path().join("w.json");
    std::fs::write(
        &doc,
        r#"{"accounts": [{"id": "acme", "balance": "100.00"}],
            "plans": [{"id": "p", "product": "KooPhone", "hourly": {"instance": "0.36"}, "monthly": "9.90"}],
            "resources": [{"id": "s1", "account": "acme", "plan": "p", "mode": "monthly", "purchased_at": "2024-01-10T00:00:00Z"}]}"#,
    )
    .unwrap();
    ok(&billrun(&url, &["load", doc.to_str().unwrap()]));
    let before = ok(&billrun(&url, &["export"]));
    let refused: &[(&[&str], &str)] = &[
        (&["topup", "acme", "NaN"], "AMOUNT"),
        (&["topup", "acme", "Infinity"], "AMOUNT"),
        (&["topup", "acme", "1e3"], "AMOUNT"),
        (&["topup", "acme", "123456789012345678901234567890"], "AMOUNT"),
        (&["topup", "acme", "0.000000000000000000000000000001"], "AMOUNT"),
        (&["topup", "acme", "--", "-5.00"], "AMOUNT"),
        (&["topup", "acme", "0"], "AMOUNT"),
        (&["topup", "nobody", "5.00"], "nobody"),
        (&["topup", "acme", "5.00", "--at", "1969-12-31T23:59:59Z"], "--at"),
        (&["topup", "acme", "5.00", "--at", "9999-01-01T00:00:00Z"], "--at"),
        (&["topup", "acme", "5.00", "--at", "2024-01-10T12:00:00"], "--at"),
        (&["topup", "acme", "5.00", "--at", "2024-02-30T00:00:00Z"], "--at"),
        (&["topup", "acme", "5.00", "--at", "2024-01-10T12:00:00.5Z"], "--at"),
        (&["tick", "--now", "tomorrow"], "--now"),
        (&["tick", "--now", "2024-01-10T12:00:00+25:00"], "--now"),
        (&["renew", "s1", "--periods", "99999999999999999999"], "--periods"),
        (&["renew", "s1", "--periods", "abc"], "--periods"),
        (&["renew", "s1", "--periods", "-1"], "--periods"),
        (&["export", "--from", "garbage"], "--from"),
        (&["settle", "--hour", "2024-01-10T10:00:00Z", "--at", "NaN"], "--at"),
        (&["--chunk-resources", "-1", "tick", "--now", "2024-01-10T12:00:00Z"], "'-1'"),
        (&["--chunk-resources", "99999999999999999999999", "tick"], "chunk"),
        (
            &["--chunk-workers", "0", "tick", "--now", "2024-01-10T12:00:00Z"],
            "--chunk-workers",
        ),
        (
            &["--chunk-workers", "65", "tick", "--now", "2024-01-10T12:00:00Z"],
            "--chunk-workers",
        ),
        (&["--chunk-parts", "0", "tick", "--now", "2024-01-10T12:00:00Z"], "--chunk-parts"),
        (&["--chunk-parts", "65", "tick", "--now", "2024-01-10T12:00:00Z"], "--chunk-parts"),
        (&["--timezone", "Mars/Olympus_Mons", "status"], "--timezone"),
        (&["--timezone", "+99:00", "status"], "--timezone"),
        (&["unsubscribe", "日本語"], "日本語"),
    ];
    for (args, mention) in refused {
        let o = billrun(&url, args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(mention), "{args:?} should name {mention:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    assert_eq!(ok(&billrun(&url, &["export"])), before, "nothing changed");
    // accepted: an instant inside Berlin's DST gap written with its offset is an ordinary instant;
    // unicode and formula-like ids are only looked up
    ok(&billrun(
        &url,
        &["export", "--account", "日本語", "--from", "2024-03-31T02:30:00+01:00"],
    ));
    ok(&billrun(&url, &["notifications", "--account", "=HYPERLINK(\"x\")"]));
    ok(&billrun(&url, &["tick", "--now", "2024-03-31T02:30:00+01:00"]));
}

/// The daily run walks subscriptions a batch of accounts at a time: batches of two accounts give
/// the same ledger and notifications as one batch, on both backends.
#[tokio::test]
async fn daily_batches_of_accounts_change_nothing() {
    let mut accounts = Vec::new();
    let mut subs = Vec::new();
    for a in 0..9 {
        // some accounts cannot pay every renewal
        accounts.push(format!(r#"{{"id": "acct{a}", "balance": "{}.00"}}"#, 30 + a * 9));
        for s in 0..3 {
            subs.push(format!(
                r#"{{"id": "s{a}{s}", "account": "acct{a}", "plan": "p", "mode": "monthly", "purchased_at": "2024-01-{:02}T10:00:00Z", "auto_renew": {}}}"#,
                1 + (a * 3 + s) % 27,
                (a + s) % 3 != 0
            ));
        }
    }
    let doc = format!(
        r#"{{"accounts": [{}], "plans": [{{"id": "p", "product": "KooPhone", "monthly": "9.90"}}], "resources": [{}]}}"#,
        accounts.join(","),
        subs.join(",")
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("subs.json");
    std::fs::write(&file, doc).unwrap();
    for name in common::available() {
        let mut outputs = Vec::new();
        for batch in ["2", "5000"] {
            let be = common::fresh(name).await;
            let run = |args: &[&str]| {
                let o = Command::new(env!("CARGO_BIN_EXE_billrun"))
                    .arg("--database-url")
                    .arg(&be.url)
                    .args(args)
                    .env("BILLRUN_DAILY_BATCH_ACCOUNTS", batch)
                    .env("BILLRUN_LOG", "warn")
                    .output()
                    .unwrap();
                ok(&o)
            };
            run(&["load", file.to_str().unwrap()]);
            run(&["tick", "--now", "2024-04-15T00:00:00Z"]);
            outputs.push((run(&["export"]), run(&["notifications", "--json"])));
        }
        assert!(outputs[0].0.contains(",renewal,"), "{name}: renewals happened");
        assert!(outputs[0].1.contains("renewal_failed"), "{name}: and failed attempts");
        assert_eq!(outputs[0], outputs[1], "{name}: batches of 2 accounts = one batch");
    }
}
