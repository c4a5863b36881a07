//! SPEC sections 2 (arrears lifecycle) and 3 with the daily job, on SQLite and PostgreSQL.

mod common;

use billrun::app::Billing;
use billrun::error::exit_code;
use common::*;

async fn notes(b: &Billing) -> Vec<(String, String, String, Option<i64>, String)> {
    b.notifications(None)
        .await
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["kind"].as_str().unwrap().to_string(),
                n["resource_id"].as_str().unwrap_or("-").to_string(),
                n["at"].as_str().unwrap().to_string(),
                n["days_before"].as_i64(),
                n["delivery"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn kinds(n: &[(String, String, String, Option<i64>, String)], kind: &str) -> Vec<String> {
    n.iter().filter(|x| x.0 == kind).map(|x| x.2.clone()).collect()
}

async fn state(b: &Billing, id: &str) -> (String, Option<String>) {
    let s = b.status().await.unwrap();
    let r = s.resources.iter().find(|r| r.id == id).unwrap();
    (r.state.clone(), r.expires_on.clone())
}

const PLANS: &str =
    r#""plans": [{"id": "phone-pro", "product": "KooPhone", "hourly": {"instance": "0.36"}, "monthly": "99.00", "yearly": "990.00"}]"#;

#[tokio::test]
async fn koophone_purchase_and_auto_renewal() {
    let doc = format!(
        r#"{{"accounts": [{{"id": "acme", "balance": "300.00"}}], {PLANS},
        "resources": [{{"id": "s1", "account": "acme", "plan": "phone-pro", "mode": "monthly", "periods": 1, "quantity": 1,
                        "purchased_at": "2023-02-08T15:50:04+08:00", "auto_renew": true}}]}}"#
    );
    on_each_backend(async |be| {
        let b = be.open("Asia/Shanghai").await;
        b.load_json("s.json", &doc).await.unwrap();
        b.tick(t("2023-02-08T16:00:00+08:00"), |_, _| {}).await.unwrap();
        assert_eq!(state(&b, "s1").await, ("running".into(), Some("2023-03-08".into())));
        b.tick(t("2023-03-01T00:02:59+08:00"), |_, _| {}).await.unwrap();
        assert_eq!(
            state(&b, "s1").await.1.as_deref(),
            Some("2023-03-08"),
            "{}: not renewed before 00:03:00",
            be.name
        );
        b.tick(t("2023-03-01T00:03:00+08:00"), |_, _| {}).await.unwrap();
        assert_eq!(state(&b, "s1").await.1.as_deref(), Some("2023-04-08"), "{}", be.name);
        let rows = rows(&csv(&b).await);
        let purchase = rows.iter().find(|r| r["transaction_type"] == "purchase").unwrap();
        assert_eq!(
            (
                purchase["period_start"].as_str(),
                purchase["period_end"].as_str(),
                purchase["amount_due"].as_str(),
                purchase["billing_item"].as_str(),
                purchase["usage_seconds"].as_str()
            ),
            ("2023-02-08T15:50:04+08:00", "2023-03-09T00:00:00+08:00", "99.00", "", "")
        );
        assert_eq!(
            (
                purchase["quantity"].as_str(),
                purchase["unit_price"].as_str(),
                purchase["balance_after"].as_str()
            ),
            ("1", "99", "201.00")
        );
        let renewal = rows.iter().find(|r| r["transaction_type"] == "renewal").unwrap();
        assert_eq!(
            (
                renewal["transaction_time"].as_str(),
                renewal["period_start"].as_str(),
                renewal["period_end"].as_str(),
                renewal["amount_due"].as_str(),
                renewal["balance_after"].as_str()
            ),
            (
                "2023-03-01T00:03:00+08:00",
                "2023-03-09T00:00:00+08:00",
                "2023-04-09T00:00:00+08:00",
                "99.00",
                "102.00"
            )
        );
        let n = notes(&b).await;
        assert_eq!(kinds(&n, "renewal_succeeded"), ["2023-03-01T00:03:00+08:00"]);
        assert_export_matches_records(&b, be.name).await;
        b.db.close().await;
    })
    .await;
}

#[tokio::test]
async fn month_ends_clamp_and_renewals_do_not_drift() {
    let doc = format!(
        r#"{{"accounts": [{{"id": "a", "balance": "5000.00"}}], {PLANS},
        "resources": [{{"id": "m23", "account": "a", "plan": "phone-pro", "mode": "monthly", "purchased_at": "2023-01-31T10:00:00Z", "auto_renew": true}},
                      {{"id": "m24", "account": "a", "plan": "phone-pro", "mode": "monthly", "purchased_at": "2024-01-31T10:00:00Z", "auto_renew": true, "auto_renew_times": 1}}]}}"#
    );
    on_each_backend(async |be| {
        let b = be.open("UTC").await;
        b.load_json("m.json", &doc).await.unwrap();
        assert_eq!(state(&b, "m23").await.1.as_deref(), Some("2023-02-28"));
        assert_eq!(state(&b, "m24").await.1.as_deref(), Some("2024-02-29"));
        b.tick(t("2023-03-01T00:00:00Z"), |_, _| {}).await.unwrap();
        assert_eq!(
            state(&b, "m23").await.1.as_deref(),
            Some("2023-03-31"),
            "{}: Jan 31 -> Feb 28 -> Mar 31",
            be.name
        );
        b.tick(t("2023-04-20T00:00:00Z"), |_, _| {}).await.unwrap();
        assert_eq!(state(&b, "m23").await.1.as_deref(), Some("2023-04-30"));
        b.tick(t("2023-05-24T00:03:00Z"), |_, _| {}).await.unwrap();
        assert_eq!(
            state(&b, "m23").await.1.as_deref(),
            Some("2023-06-30"),
            "renewed on 05-24, seven days before May 31"
        );
        b.tick(t("2024-04-01T00:00:00Z"), |_, _| {}).await.unwrap();
        // one auto-renewal allowed: Feb 29 -> Mar 31, then it expires
        assert_eq!(state(&b, "m24").await, ("expired".into(), Some("2024-03-31".into())), "{}", be.name);
        b.db.close().await;
    })
    .await;
}

#[tokio::test]
async fn short_balance_fails_eight_times_then_expires_freezes_and_releases() {
    let doc = format!(
        r#"{{"accounts": [{{"id": "acme", "balance": "120.00", "grace_days": 15, "retention_days": 15}}], {PLANS},
        "resources": [{{"id": "s1", "account": "acme", "plan": "phone-pro", "mode": "monthly", "purchased_at": "2023-02-08T15:50:04Z", "auto_renew": true}},
                      {{"id": "s2", "account": "acme", "plan": "phone-pro", "mode": "monthly", "purchased_at": "2023-02-08T16:00:00Z"}}]}}"#
    );
    on_each_backend(async |be| {
        let b = be.open("UTC").await;
        let err = b.load_json("s.json", &doc).await.unwrap_err();
        assert_eq!(exit_code(&err), 2, "{}: a purchase may not take the balance below zero: {err:#}", be.name);
        assert!(format!("{err:#}").contains("resources[1]"), "{err:#}");
        let doc = doc.replace(",\n                      {\"id\": \"s2\", \"account\": \"acme\", \"plan\": \"phone-pro\", \"mode\": \"monthly\", \"purchased_at\": \"2023-02-08T16:00:00Z\"}", "");
        b.load_json("s.json", &doc).await.unwrap();
        b.tick(t("2023-04-30T00:00:00Z"), |_, _| {}).await.unwrap();
        let n = notes(&b).await;
        let failures = kinds(&n, "renewal_failed");
        assert_eq!(failures.len(), 8, "{}: {n:?}", be.name);
        assert_eq!(failures.first().map(String::as_str), Some("2023-03-01T00:03:00Z"));
        assert_eq!(failures.last().map(String::as_str), Some("2023-03-08T00:03:00Z"));
        let reason = b.notifications(None).await.unwrap().into_iter().find(|x| x["kind"] == "renewal_failed").unwrap()["reason"].as_str().unwrap().to_string();
        assert_eq!(reason, "balance 21.00 is short of the renewal price 99.00");
        assert_eq!(rows(&csv(&b).await).len(), 1, "no charge besides the purchase");
        assert_eq!(kinds(&n, "expired"), ["2023-03-09T00:00:00Z"]);
        assert_eq!(kinds(&n, "frozen"), ["2023-03-24T00:00:00Z"]);
        assert_eq!(kinds(&n, "released"), ["2023-04-08T00:00:00Z"]);
        b.db.close().await;
    })
    .await;
    // a manual renewal while frozen restores it and extends from the old expiry
    let doc = format!(
        r#"{{"accounts": [{{"id": "acme", "balance": "120.00"}}], {PLANS},
        "resources": [{{"id": "s1", "account": "acme", "plan": "phone-pro", "mode": "monthly", "purchased_at": "2023-02-08T15:50:04Z"}}]}}"#
    );
    on_each_backend(async |be| {
        let b = be.open("UTC").await;
        b.load_json("s.json", &doc).await.unwrap();
        b.tick(t("2023-03-10T12:00:00Z"), |_, _| {}).await.unwrap();
        assert_eq!(state(&b, "s1").await.0, "expired");
        b.tick(t("2023-03-30T12:00:00Z"), |_, _| {}).await.unwrap();
        assert_eq!(state(&b, "s1").await.0, "frozen", "{}", be.name);
        let err = b.renew("s1", 1, t("2023-03-30T12:00:00Z")).await.unwrap_err();
        assert!(format!("{err:#}").contains("short"), "{err:#}");
        b.topup("acme", "100.00", t("2023-03-30T12:05:00Z")).await.unwrap();
        let line = b.renew("s1", 1, t("2023-03-30T12:10:00Z")).await.unwrap();
        assert_eq!(
            (line.period_start, line.period_end),
            (t("2023-03-09T00:00:00Z"), t("2023-04-09T00:00:00Z"))
        );
        assert_eq!(state(&b, "s1").await, ("running".into(), Some("2023-04-08".into())), "{}", be.name);
        b.tick(t("2023-06-01T00:00:00Z"), |_, _| {}).await.unwrap();
        assert!(
            b.renew("s1", 1, t("2023-06-01T00:00:00Z")).await.is_err(),
            "released resources cannot be renewed"
        );
        b.db.close().await;
    })
    .await;
}

#[tokio::test]
async fn alerts_on_their_local_dates_once_each() {
    let doc = format!(
        r#"{{"accounts": [{{"id": "a", "balance": "5000.00"}}], {PLANS},
        "resources": [{{"id": "y1", "account": "a", "plan": "phone-pro", "mode": "yearly", "purchased_at": "2023-01-10T12:00:00+08:00"}},
                      {{"id": "m1", "account": "a", "plan": "phone-pro", "mode": "monthly", "purchased_at": "2023-12-01T12:00:00+08:00"}},
                      {{"id": "m2", "account": "a", "plan": "phone-pro", "mode": "monthly", "purchased_at": "2023-12-01T12:00:00+08:00"}}]}}"#
    );
    on_each_backend(async |be| {
        let b = be.open("Asia/Shanghai").await;
        b.load_json("a.json", &doc).await.unwrap();
        // m2 renewed early, before any alert for 2024-01-01
        b.tick(t("2023-12-05T00:00:00+08:00"), |_, _| {}).await.unwrap();
        b.renew("m2", 1, t("2023-12-05T09:00:00+08:00")).await.unwrap();
        for day in 0..45 {
            b.tick(t("2023-12-05T00:00:00+08:00") + day * 86_400, |_, _| {}).await.unwrap();
        }
        let n = notes(&b).await;
        let alerts = |id: &str| -> Vec<(String, i64)> {
            n.iter()
                .filter(|x| x.0 == "expiry_alert" && x.1 == id)
                .map(|x| (x.2.clone(), x.3.unwrap()))
                .collect()
        };
        assert_eq!(
            alerts("y1"),
            [
                ("2023-12-11T00:03:00+08:00".to_string(), 30),
                ("2023-12-26T00:03:00+08:00".to_string(), 15),
                ("2024-01-03T00:03:00+08:00".to_string(), 7),
                ("2024-01-07T00:03:00+08:00".to_string(), 3),
                ("2024-01-09T00:03:00+08:00".to_string(), 1)
            ],
            "{}",
            be.name
        );
        assert_eq!(
            alerts("m1"),
            [
                ("2023-12-17T00:03:00+08:00".to_string(), 15),
                ("2023-12-25T00:03:00+08:00".to_string(), 7),
                ("2023-12-29T00:03:00+08:00".to_string(), 3),
                ("2023-12-31T00:03:00+08:00".to_string(), 1)
            ]
        );
        // m2 now expires on 2024-02-01: its alerts are for the new date only
        let m2: Vec<_> = b
            .notifications(None)
            .await
            .unwrap()
            .into_iter()
            .filter(|x| x["kind"] == "expiry_alert" && x["resource_id"] == "m2")
            .collect();
        assert!(m2.iter().all(|x| x["expires_on"] == "2024-02-01"), "{m2:?}");
        assert_eq!(m2.len(), 1, "15 days before 2024-02-01 (Jan 17) by Jan 18");
        b.db.close().await;
    })
    .await;
}

#[tokio::test]
async fn after_an_outage_only_the_latest_missed_alert_is_sent() {
    let doc = format!(
        r#"{{"accounts": [{{"id": "a", "balance": "5000.00"}}], {PLANS},
        "resources": [{{"id": "m1", "account": "a", "plan": "phone-pro", "mode": "monthly", "purchased_at": "2024-03-01T12:00:00Z"}}]}}"#
    );
    on_each_backend(async |be| {
        let b = be.open("UTC").await;
        b.load_json("a.json", &doc).await.unwrap();
        b.tick(t("2024-03-20T00:00:00Z"), |_, _| {}).await.unwrap();
        let pending: Vec<_> = notes(&b)
            .await
            .into_iter()
            .filter(|x| x.0 == "expiry_alert" && x.4 == "pending")
            .collect();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].3, Some(15));
        // ten days down: 7 and 3 days before were missed; 3 is the one sent
        b.tick(t("2024-03-30T00:10:00Z"), |_, _| {}).await.unwrap();
        let n = notes(&b).await;
        let alerts: Vec<_> = n
            .iter()
            .filter(|x| x.0 == "expiry_alert")
            .map(|x| (x.3.unwrap(), x.4.as_str()))
            .collect();
        assert_eq!(alerts, [(15, "superseded"), (7, "superseded"), (3, "pending")], "{}", be.name);
        b.db.close().await;
    })
    .await;
}

#[tokio::test]
async fn unsubscribing_after_twelve_days_refunds_eighteen_thirtieths() {
    let doc = format!(
        r#"{{"accounts": [{{"id": "a", "balance": "100.00"}}], {PLANS},
        "resources": [{{"id": "s1", "account": "a", "plan": "phone-pro", "mode": "monthly", "purchased_at": "2023-06-16T00:00:00Z"}}]}}"#
    );
    on_each_backend(async |be| {
        let b = be.open("UTC").await;
        b.load_json("u.json", &doc).await.unwrap();
        let refund = b.unsubscribe("s1", t("2023-06-28T08:58:30Z")).await.unwrap().expect("a refund");
        // 99 - 99/30 x 12 = 59.40
        assert_eq!(
            (refund.list_amount, refund.amount_due, refund.paid_amount, refund.arrears_amount),
            (dec("-59.4"), dec("-59.40"), dec("-59.40"), dec("0.00"))
        );
        assert_eq!(refund.balance_after, dec("60.40"));
        assert_eq!(
            (refund.period_start, refund.period_end),
            (t("2023-06-28T08:58:30Z"), t("2023-07-17T00:00:00Z"))
        );
        assert_eq!(state(&b, "s1").await.0, "released");
        let rows = rows(&csv(&b).await);
        let r = rows.iter().find(|r| r["transaction_type"] == "refund").unwrap();
        assert_eq!(
            (
                r["amount_due"].as_str(),
                r["paid_amount"].as_str(),
                r["arrears_amount"].as_str(),
                r["billing_item"].as_str()
            ),
            ("-59.40", "-59.40", "0.00", "")
        );
        assert!(b.unsubscribe("s1", t("2023-06-29T00:00:00Z")).await.is_err());
        assert_export_matches_records(&b, be.name).await;
        b.db.close().await;
    })
    .await;
}

#[tokio::test]
async fn to_ppu_now_and_at_expiry_bill_the_right_hours() {
    let doc = format!(
        r#"{{"accounts": [{{"id": "a", "balance": "300.00"}}], {PLANS},
        "resources": [{{"id": "now", "account": "a", "plan": "phone-pro", "mode": "monthly", "purchased_at": "2023-06-16T00:00:00Z"}},
                      {{"id": "later", "account": "a", "plan": "phone-pro", "mode": "monthly", "purchased_at": "2023-06-16T00:00:00Z"}}]}}"#
    );
    on_each_backend(async |be| {
        let b = be.open("UTC").await;
        b.load_json("p.json", &doc).await.unwrap();
        let (from, refund) = b.to_ppu("now", true, t("2023-06-28T08:30:00Z")).await.unwrap();
        assert_eq!(from, t("2023-06-28T08:30:00Z"));
        assert_eq!(refund.unwrap().amount_due, dec("-59.40"));
        let (from, refund) = b.to_ppu("later", false, t("2023-06-28T08:30:00Z")).await.unwrap();
        assert_eq!((from, refund), (t("2023-07-17T00:00:00Z"), None));
        b.tick(t("2023-07-17T03:00:00Z"), |_, _| {}).await.unwrap();
        let rows = rows(&csv(&b).await);
        let usage = |id: &str| -> Vec<&std::collections::HashMap<String, String>> {
            rows.iter()
                .filter(|r| r["resource_id"] == id && r["transaction_type"] == "usage")
                .collect()
        };
        let now = usage("now");
        assert_eq!(now[0]["period_start"], "2023-06-28T08:30:00Z", "{}", be.name);
        assert_eq!(
            (now[0]["usage_seconds"].as_str(), now[0]["billing_mode"].as_str()),
            ("1800", "pay_per_use")
        );
        // the hours from 08:00 on Jun 28 through 01:00 on Jul 17 (settled at 03:00): 16 + 18 x 24 + 2
        assert_eq!(now.len(), 16 + 18 * 24 + 2);
        let later = usage("later");
        assert_eq!(
            later.len(),
            2,
            "{}: the hours 00:00 and 01:00 on Jul 17 are settled by 03:00",
            be.name
        );
        assert_eq!(later[0]["period_start"], "2023-07-17T00:00:00Z");
        let n = notes(&b).await;
        assert!(
            kinds(&n, "expired").is_empty(),
            "a resource changed to pay-per-use at expiry does not expire: {n:?}"
        );
        assert_eq!(state(&b, "later").await.0, "running");
        b.db.close().await;
    })
    .await;
}

#[tokio::test]
async fn arrears_freeze_pay_per_use_and_a_top_up_resumes_billing() {
    let doc = r#"{"accounts": [{"id": "a", "balance": "10.00", "grace_days": 2, "retention_days": 3}],
      "plans": [{"id": "p", "product": "KooPhone", "hourly": {"instance": "0.36"}}],
      "resources": [{"id": "r", "account": "a", "plan": "p", "mode": "pay_per_use", "created_at": "2024-01-01T00:00:00Z"}]}"#;
    on_each_backend(async |be| {
        let b = be.open("UTC").await;
        b.load_json("a.json", doc).await.unwrap();
        // 10.00 / 0.36 = 27.8 h: the 28th hour (03:00 on Jan 2) takes it below zero, posted at 05:00
        b.tick(t("2024-01-05T00:00:00Z"), |_, _| {}).await.unwrap();
        let st = b.status().await.unwrap();
        assert_eq!(
            st.accounts[0].in_arrears_since.as_deref(),
            Some("2024-01-02T05:00:00Z"),
            "{}",
            be.name
        );
        assert_eq!(state(&b, "r").await.0, "frozen");
        let rows1 = rows(&csv(&b).await);
        let last = rows1.last().unwrap();
        assert_eq!(
            last["period_end"], "2024-01-04T05:00:00Z",
            "{}: not billed from the freeze on",
            be.name
        );
        let frozen_at = kinds(&notes(&b).await, "frozen");
        assert_eq!(frozen_at, ["2024-01-04T05:00:00Z"]);
        b.topup("a", "50.00", t("2024-01-05T10:20:00Z")).await.unwrap();
        b.tick(t("2024-01-05T13:00:00Z"), |_, _| {}).await.unwrap();
        assert_eq!(state(&b, "r").await.0, "running");
        let rows2 = rows(&csv(&b).await);
        let resumed: Vec<_> = rows2.iter().skip(rows1.len()).collect();
        assert_eq!(
            resumed[0]["period_start"], "2024-01-05T10:20:00Z",
            "{}: billing resumes from the top-up",
            be.name
        );
        assert_eq!(resumed[0]["usage_seconds"], "2400");
        // never topped up again: frozen after 2 days, released 3 days later, never billed again
        b.tick(t("2024-02-01T00:00:00Z"), |_, _| {}).await.unwrap();
        assert_eq!(state(&b, "r").await.0, "released", "{}", be.name);
        let n = notes(&b).await;
        assert_eq!(kinds(&n, "released").len(), 1);
        let released = n.iter().find(|x| x.0 == "released").unwrap().2.clone();
        let rows3 = rows(&csv(&b).await);
        assert!(
            rows3.iter().all(|r| r["period_end"] <= released),
            "{}: nothing billed after release at {released}",
            be.name
        );
        b.db.close().await;
    })
    .await;
}

#[tokio::test]
async fn a_year_in_one_tick_equals_a_year_day_by_day() {
    let doc = format!(
        r#"{{"accounts": [{{"id": "a", "balance": "400.00"}}, {{"id": "b", "balance": "1100.00"}}, {{"id": "c", "balance": "30.00"}}], {PLANS},
        "resources": [{{"id": "m1", "account": "a", "plan": "phone-pro", "mode": "monthly", "purchased_at": "2023-01-31T10:00:00Z", "auto_renew": true}},
                      {{"id": "y1", "account": "b", "plan": "phone-pro", "mode": "yearly", "purchased_at": "2023-02-15T10:00:00Z", "auto_renew": true}},
                      {{"id": "p1", "account": "c", "plan": "phone-pro", "mode": "pay_per_use", "created_at": "2023-01-20T00:00:00Z", "deleted_at": "2023-03-01T00:00:00Z"}}],
        "topups": [{{"account": "b", "amount": "10.00", "at": "2023-01-01T00:00:00Z"}}]}}"#
    );
    on_each_backend(async |be| {
        let one = be.open("Europe/Berlin").await;
        one.load_json("y.json", &doc).await.unwrap();
        one.tick(t("2024-02-01T00:00:00Z"), |_, _| {}).await.unwrap();
        let (csv1, notes1) = (csv(&one).await, notes(&one).await);
        one.db.close().await;
        let other = common::fresh(be.name).await;
        let many = other.open("Europe/Berlin").await;
        many.load_json("y.json", &doc).await.unwrap();
        let mut now = t("2023-01-20T00:00:00Z");
        while now < t("2024-02-01T00:00:00Z") {
            now += 86_400;
            many.tick(now.min(t("2024-02-01T00:00:00Z")), |_, _| {}).await.unwrap();
        }
        assert_eq!(csv(&many).await, csv1, "{}", be.name);
        assert_eq!(notes(&many).await, notes1, "{}", be.name);
        assert!(
            notes1.iter().any(|n| n.0 == "renewal_succeeded")
                && notes1.iter().any(|n| n.0 == "renewal_failed")
                && notes1.iter().any(|n| n.0 == "released")
        );
        many.db.close().await;
    })
    .await;
}

/// The daily run reads its subscriptions a batch of accounts at a time, and each batch's read
/// searches the account index by range. A condition that also allowed "no range" (`$3 = '' OR
/// account_id >= $3 ...`) kept SQLite from it: every batch walked the whole index (1M
/// subscriptions, 20 batches: 4.7 of the run's 12.9 s; after: 2.5 s).
#[tokio::test]
async fn each_daily_batch_searches_its_accounts_by_range() {
    use billrun::store::db::Backend;
    use billrun::store::subscriptions::subscriptions_select;
    on_each_backend(async |be| {
        let b = be.open("UTC").await;
        let backend = b.db.backend();
        let today = chrono::NaiveDate::from_ymd_opt(2024, 1, 11).unwrap();
        let (rest, args) = subscriptions_select(
            backend,
            None,
            Some(t("2024-01-11T00:03:00Z")),
            Some(("acct-0100", "acct-0199")),
            Some(today),
        );
        let mut tx = plan_tx(&b.db).await;
        let plan = query_plan(&mut tx, &format!("SELECT id {rest}"), args).await;
        let by_range = match backend {
            Backend::Sqlite => plan.contains("SEARCH resources USING INDEX resources_account (account_id>? AND account_id<?)"),
            Backend::Postgres => plan.contains("using resources_account on resources") && plan.contains("Index Cond: ((account_id >= "),
        };
        assert!(by_range, "{}: a daily batch's read\n{plan}", be.name);
        tx.rollback().await.unwrap();
        b.db.close().await;
    })
    .await;
}

/// A command naming no resource acts on none. The subscriptions query used to write "one
/// resource" as `($1 = '' OR id = $1)`, so `renew ""` matched every subscription and renewed the
/// first one in account order, charging it; each filter is now a plain comparison. The
/// notifications listing had the same form for its account (listing, so read-only).
#[tokio::test]
async fn an_empty_resource_id_names_no_subscription() {
    let doc = format!(
        r#"{{"accounts": [{{"id": "a", "balance": "5000.00"}}], {PLANS},
        "resources": [{{"id": "m1", "account": "a", "plan": "phone-pro", "mode": "monthly", "purchased_at": "2024-01-10T10:00:00Z"}}]}}"#
    );
    on_each_backend(async |be| {
        let b = be.open("UTC").await;
        b.load_json("m.json", &doc).await.unwrap();
        let before = csv(&b).await;
        let at = t("2024-01-20T00:00:00Z");
        assert!(b.renew("", 1, at).await.is_err(), "{}: renew \"\"", be.name);
        assert!(b.unsubscribe("", at).await.is_err(), "{}: unsubscribe \"\"", be.name);
        assert!(b.to_ppu("", true, at).await.is_err(), "{}: to-ppu \"\"", be.name);
        assert_eq!(csv(&b).await, before, "{}: nothing posted", be.name);
        assert_eq!(state(&b, "m1").await.1.as_deref(), Some("2024-02-10"), "{}", be.name);
        // likewise an empty account lists no notifications (it listed every account's)
        b.tick(t("2024-01-26T00:04:00Z"), |_, _| {}).await.unwrap();
        assert!(!b.notifications(Some("a")).await.unwrap().is_empty(), "{}: account a's", be.name);
        assert!(
            b.notifications(Some("")).await.unwrap().is_empty(),
            "{}: notifications --account \"\"",
            be.name
        );
        b.db.close().await;
    })
    .await;
}

/// The daily run's superseding of older expiry alerts looks only at the resources it alerted, and
/// finds their alerts and each one's newer alert through the resource index, which holds expiry
/// alerts only (migration 15: renewal notices and transitions, three in four of a day's notices,
/// no longer go into it). Without the index that statement took 241 s at 1M subscriptions
/// (session 10); without the partial condition in the statement the index could not be used.
#[tokio::test]
async fn superseding_alerts_searches_the_alerts_resource_index() {
    use billrun::store::db::Backend;
    use billrun::store::subscriptions::supersede_alerts_sql;
    on_each_backend(async |be| {
        let b = be.open("UTC").await;
        let backend = b.db.backend();
        let mut tx = plan_tx(&b.db).await;
        let plan = query_plan(&mut tx, &supersede_alerts_sql(backend), vec![r#"["r1", "r2"]"#.into()]).await;
        let searched = match backend {
            Backend::Sqlite => {
                plan.contains("SEARCH n USING INDEX notifications_resource (resource_id=?)")
                    && plan.lines().any(|l| {
                        l.starts_with("SEARCH n2 ") && l.contains("COVERING INDEX notifications_resource (resource_id=? AND at>?)")
                    })
            }
            // on empty tables PostgreSQL may scan the index whole rather than per resource; what
            // matters is that it can use it at all, which the partial condition decides
            Backend::Postgres => {
                plan.contains("using notifications_resource on notifications n2")
                    && plan
                        .lines()
                        .any(|l| l.contains("using notifications_resource on notifications") && !l.contains(" n2"))
            }
        };
        assert!(searched, "{}: the alerts' and the newer alert's lookups\n{plan}", be.name);
        tx.rollback().await.unwrap();
        b.db.close().await;
    })
    .await;
}
