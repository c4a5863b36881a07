//! SPEC sections 2, 3 and 6 for KooMessage (count-metered usage, prepaid packages) and KooDrive
//! editions with expansion parts, on SQLite and PostgreSQL.

mod common;

use billrun::app::Billing;
use billrun::error::exit_code;
use common::*;
use rust_decimal::Decimal;
use std::collections::HashMap;

type Row = HashMap<String, String>;

const MAIL: &str = r#""plans": [{"id": "mail", "product": "KooMessage", "per_unit": {"email": "0.0005"},
    "packages": {"email-10k": {"item": "email", "quantity": "10000", "price": "4.00", "months": 1}}}]"#;

fn count(resource: &str, n: u32, at: &str) -> String {
    format!(r#"{{"resource": "{resource}", "item": "email", "quantity": "{n}", "at": "{at}"}}"#)
}

/// (hour start, billing_item, type, quantity, amount_due) of the usage and adjustment lines.
fn usage(rows: &[Row]) -> Vec<(String, String, String, String, String)> {
    let mut out: Vec<_> = rows
        .iter()
        .filter(|r| r["transaction_type"] == "usage" || r["transaction_type"] == "adjustment")
        .map(|r| {
            (
                r["transaction_time"].clone(),
                r["billing_item"].clone(),
                r["transaction_type"].clone(),
                r["quantity"].clone(),
                r["amount_due"].clone(),
            )
        })
        .collect();
    out.sort();
    out
}

fn line(time: &str, item: &str, kind: &str, qty: &str, due: &str) -> (String, String, String, String, String) {
    (time.into(), item.into(), kind.into(), qty.into(), due.into())
}

/// Units drawn from each package over the whole ledger.
fn drawn(rows: &[Row]) -> HashMap<String, Decimal> {
    let mut out = HashMap::new();
    for r in rows {
        if let Some((_, pk)) = r["billing_item"].split_once('@') {
            *out.entry(pk.to_string()).or_insert(Decimal::ZERO) += dec(&r["quantity"]);
        }
    }
    out
}

async fn balance(b: &Billing, account: &str) -> String {
    let s = b.status().await.unwrap();
    s.accounts.iter().find(|a| a.id == account).unwrap().balance.clone()
}

#[tokio::test]
async fn twelve_thousand_emails_with_a_ten_thousand_package() {
    let doc = format!(
        r#"{{"accounts": [{{"id": "acme", "balance": "20.00"}}], {MAIL},
        "resources": [{{"id": "m1", "account": "acme", "plan": "mail", "mode": "pay_per_use", "created_at": "2024-05-01T00:00:00Z"}}],
        "packages": [{{"id": "pk1", "resource": "m1", "package": "email-10k", "purchased_at": "2024-05-01T00:00:00Z"}}],
        "usage": [{}, {}, {}]}}"#,
        count("m1", 7000, "2024-05-02T10:15:00Z"),
        count("m1", 5000, "2024-05-02T10:50:00Z"),
        count("m1", 3000, "2024-05-02T11:20:00Z"),
    );
    on_each_backend(async |be| {
        let b = be.open("UTC").await;
        b.load_json("mail.json", &doc).await.unwrap();
        b.tick(t("2024-05-02T13:00:00Z"), |_, _| {}).await.unwrap();
        let rows = rows(&csv(&b).await);
        let purchase = rows.iter().find(|r| r["transaction_type"] == "purchase").unwrap();
        assert_eq!(
            (
                purchase["resource_id"].as_str(),
                purchase["billing_mode"].as_str(),
                purchase["amount_due"].as_str(),
                purchase["period_end"].as_str()
            ),
            ("pk1", "monthly", "4.00", "2024-06-02T00:00:00Z"),
            "{}",
            be.name
        );
        assert_eq!(
            usage(&rows),
            vec![
                line("2024-05-02T12:00:00Z", "email", "usage", "2000", "1.00"),
                line("2024-05-02T12:00:00Z", "email@pk1", "usage", "10000", "0.00"),
                line("2024-05-02T13:00:00Z", "email", "usage", "3000", "1.50"),
            ],
            "{}: 10,000 drawn, 2,000 billed at 0.0005; the next hour everything billed",
            be.name
        );
        let draw = rows.iter().find(|r| r["billing_item"] == "email@pk1").unwrap();
        assert_eq!(
            (
                draw["usage_seconds"].as_str(),
                draw["list_amount"].as_str(),
                draw["unit_price"].as_str(),
                draw["period_start"].as_str(),
                draw["period_end"].as_str()
            ),
            ("", "0.00", "0", "2024-05-02T10:15:00Z", "2024-05-02T10:50:00Z")
        );
        let excess = rows
            .iter()
            .find(|r| r["billing_item"] == "email" && r["quantity"] == "2000")
            .unwrap();
        assert_eq!(
            (
                excess["usage_seconds"].as_str(),
                excess["unit_price"].as_str(),
                excess["list_amount"].as_str()
            ),
            ("", "0.0005", "1.00")
        );
        assert_eq!(balance(&b, "acme").await, "13.50", "{}: 20 - 4 - 1 - 1.50", be.name);
        // the status lists the package with its expiry and what it serves
        let s = b.status().await.unwrap();
        let pk = s.resources.iter().find(|r| r.id == "pk1").unwrap();
        assert_eq!(
            (
                pk.state.as_str(),
                pk.expires_on.as_deref(),
                pk.package.as_deref(),
                pk.serves.as_deref()
            ),
            ("running", Some("2024-06-01"), Some("email-10k"), Some("m1"))
        );
        // another tick and a rerun of the hour post nothing
        b.tick(t("2024-05-02T13:30:00Z"), |_, _| {}).await.unwrap();
        let rerun = b
            .settle_hour(t("2024-05-02T10:00:00Z"), t("2024-05-02T14:00:00Z"), false)
            .await
            .unwrap();
        assert_eq!(rerun.lines, 0, "{}", be.name);
        assert_eq!(csv(&b).await.lines().count(), 5);
        assert_export_matches_records(&b, be.name).await;
    })
    .await;
}

#[tokio::test]
async fn the_package_expiring_first_is_drawn_first_and_an_expired_rest_is_not() {
    let doc = format!(
        r#"{{"accounts": [{{"id": "acme", "balance": "50.00"}}], {MAIL},
        "resources": [{{"id": "m1", "account": "acme", "plan": "mail", "mode": "pay_per_use", "created_at": "2024-05-01T00:00:00Z"}}],
        "packages": [{{"id": "pkB", "resource": "m1", "package": "email-10k", "purchased_at": "2024-05-20T09:00:00Z"}},
                     {{"id": "pkA", "resource": "m1", "package": "email-10k", "purchased_at": "2024-05-01T00:00:00Z"}}],
        "usage": [{}, {}, {}, {}]}}"#,
        count("m1", 5000, "2024-05-25T10:15:00Z"),
        count("m1", 8000, "2024-06-01T23:59:59Z"),
        count("m1", 8000, "2024-06-02T00:00:00Z"),
        count("m1", 3000, "2024-06-04T08:00:00Z"),
    );
    on_each_backend(async |be| {
        let b = be.open("UTC").await;
        b.load_json("two.json", &doc).await.unwrap();
        b.tick(t("2024-06-05T00:00:00Z"), |_, _| {}).await.unwrap();
        let rows = rows(&csv(&b).await);
        assert_eq!(
            usage(&rows),
            vec![
                // both valid: pkA expires on 06-01, pkB on 06-20; pkA goes first
                line("2024-05-25T12:00:00Z", "email@pkA", "usage", "5000", "0.00"),
                // the last second of pkA's cycle: its 5,000 left, then pkB
                line("2024-06-02T01:00:00Z", "email@pkA", "usage", "5000", "0.00"),
                line("2024-06-02T01:00:00Z", "email@pkB", "usage", "3000", "0.00"),
                // pkA expired at 06-02 00:00: nothing left there anyway; pkB gives 7,000 more
                line("2024-06-02T02:00:00Z", "email", "usage", "1000", "0.50"),
                line("2024-06-02T02:00:00Z", "email@pkB", "usage", "7000", "0.00"),
                line("2024-06-04T10:00:00Z", "email", "usage", "3000", "1.50"),
            ],
            "{}",
            be.name
        );
        let d = drawn(&rows);
        assert_eq!((d["pkA"], d["pkB"]), (dec("10000"), dec("10000")));
    })
    .await;

    // an expired package's rest is not drawn: 4,000 left in pkA when it lapses
    let doc = format!(
        r#"{{"accounts": [{{"id": "acme", "balance": "50.00"}}], {MAIL},
        "resources": [{{"id": "m1", "account": "acme", "plan": "mail", "mode": "pay_per_use", "created_at": "2024-05-01T00:00:00Z"}}],
        "packages": [{{"id": "pkA", "resource": "m1", "package": "email-10k", "purchased_at": "2024-05-01T00:00:00Z"}},
                     {{"id": "pkB", "resource": "m1", "package": "email-10k", "purchased_at": "2024-05-20T09:00:00Z"}}],
        "usage": [{}, {}]}}"#,
        count("m1", 6000, "2024-05-25T10:15:00Z"),
        count("m1", 12000, "2024-06-03T10:00:00Z"),
    );
    on_each_backend(async |be| {
        let b = be.open("UTC").await;
        b.load_json("lapse.json", &doc).await.unwrap();
        b.tick(t("2024-06-04T00:00:00Z"), |_, _| {}).await.unwrap();
        let rows = rows(&csv(&b).await);
        assert_eq!(
            usage(&rows),
            vec![
                line("2024-05-25T12:00:00Z", "email@pkA", "usage", "6000", "0.00"),
                line("2024-06-03T12:00:00Z", "email", "usage", "2000", "1.00"),
                line("2024-06-03T12:00:00Z", "email@pkB", "usage", "10000", "0.00"),
            ],
            "{}",
            be.name
        );
    })
    .await;
}

#[tokio::test]
async fn package_alert_grace_and_retention_on_their_exact_instants() {
    let doc = format!(
        r#"{{"accounts": [{{"id": "acme", "balance": "50.00"}}, {{"id": "tier", "balance": "50.00", "grace_days": 3, "retention_days": 5}}], {MAIL},
        "resources": [{{"id": "m1", "account": "acme", "plan": "mail", "mode": "pay_per_use", "created_at": "2024-05-01T00:00:00+08:00"}},
                      {{"id": "m2", "account": "tier", "plan": "mail", "mode": "pay_per_use", "created_at": "2024-05-01T00:00:00+08:00"}}],
        "packages": [{{"id": "pk1", "resource": "m1", "package": "email-10k", "purchased_at": "2024-05-01T10:00:00+08:00"}},
                     {{"id": "pk2", "resource": "m1", "package": "email-10k", "purchased_at": "2024-05-01T10:00:00+08:00", "auto_renew": true}},
                     {{"id": "pk3", "resource": "m2", "package": "email-10k", "purchased_at": "2024-05-01T10:00:00+08:00"}}],
        "usage": [{}]}}"#,
        count("m1", 25000, "2024-06-05T09:30:00+08:00"),
    );
    on_each_backend(async |be| {
        let b = be.open("Asia/Shanghai").await;
        b.load_json("life.json", &doc).await.unwrap();
        let state = async |id: &str, at: &str| {
            b.tick(t(at), |_, _| {}).await.unwrap();
            let s = b.status().await.unwrap();
            s.resources.iter().find(|r| r.id == id).unwrap().state.clone()
        };
        assert_eq!(state("pk1", "2024-06-01T23:59:59+08:00").await, "running");
        assert_eq!(state("pk1", "2024-06-02T00:00:00+08:00").await, "expired", "{}", be.name);
        assert_eq!(state("pk3", "2024-06-04T23:59:59+08:00").await, "expired");
        assert_eq!(
            state("pk3", "2024-06-05T00:00:00+08:00").await,
            "frozen",
            "{}: the tier's 3 grace days",
            be.name
        );
        assert_eq!(
            state("pk3", "2024-06-10T00:00:00+08:00").await,
            "released",
            "{}: and 5 retention days",
            be.name
        );
        assert_eq!(state("pk1", "2024-06-16T23:59:59+08:00").await, "expired");
        assert_eq!(
            state("pk1", "2024-06-17T00:00:00+08:00").await,
            "frozen",
            "{}: 15 grace days",
            be.name
        );
        assert_eq!(
            state("pk1", "2024-07-02T00:00:00+08:00").await,
            "released",
            "{}: 15 retention days",
            be.name
        );
        assert_eq!(
            state("pk2", "2024-07-02T00:00:00+08:00").await,
            "running",
            "{}: auto-renewed",
            be.name
        );
        // the daily run at 00:03 records the transitions of the day
        b.tick(t("2024-07-02T00:03:00+08:00"), |_, _| {}).await.unwrap();

        let notes = b.notifications(None).await.unwrap();
        let of = |id: &str, kind: &str| -> Vec<String> {
            notes
                .iter()
                .filter(|n| n["resource_id"] == id && n["kind"] == kind)
                .map(|n| n["at"].as_str().unwrap().to_string())
                .collect()
        };
        let alert = notes
            .iter()
            .find(|n| n["resource_id"] == "pk1" && n["kind"] == "package_expiry_alert")
            .unwrap();
        assert_eq!(
            (alert["at"].as_str(), alert["days_before"].as_i64(), alert["expires_on"].as_str()),
            (Some("2024-05-25T00:03:00+08:00"), Some(7), Some("2024-06-01")),
            "{}: one alert, 7 days before",
            be.name
        );
        assert_eq!(of("pk1", "package_expiry_alert").len(), 1);
        assert!(of("pk1", "expiry_alert").is_empty(), "packages have their own alert kind");
        assert_eq!(of("pk1", "expired"), vec!["2024-06-02T00:00:00+08:00"]);
        assert_eq!(of("pk1", "frozen"), vec!["2024-06-17T00:00:00+08:00"]);
        assert_eq!(of("pk1", "released"), vec!["2024-07-02T00:00:00+08:00"]);
        assert_eq!(of("pk3", "frozen"), vec!["2024-06-05T00:00:00+08:00"]);
        assert_eq!(of("pk3", "released"), vec!["2024-06-10T00:00:00+08:00"]);
        // the auto-renewed package: renewed 7 days before each expiry, before the alerts of that
        // run, so no alert is due
        assert_eq!(
            of("pk2", "renewal_succeeded"),
            vec!["2024-05-25T00:03:00+08:00", "2024-06-24T00:03:00+08:00"]
        );
        assert!(of("pk2", "package_expiry_alert").is_empty());
        assert!(of("pk2", "expired").is_empty());
        let rows = rows(&csv(&b).await);
        let renewals: Vec<_> = rows
            .iter()
            .filter(|r| r["resource_id"] == "pk2" && r["transaction_type"] == "renewal")
            .map(|r| (r["period_start"].clone(), r["period_end"].clone(), r["amount_due"].clone()))
            .collect();
        assert_eq!(
            renewals[0],
            (
                "2024-06-02T00:00:00+08:00".to_string(),
                "2024-07-02T00:00:00+08:00".to_string(),
                "4.00".to_string()
            )
        );
        // 06-05: pk1 has expired, its 10,000 are not drawn; pk2's renewed cycle gives 10,000
        assert_eq!(
            usage(&rows),
            vec![
                line("2024-06-05T11:00:00+08:00", "email", "usage", "15000", "7.50"),
                line("2024-06-05T11:00:00+08:00", "email@pk2", "usage", "10000", "0.00"),
            ],
            "{}",
            be.name
        );
        // a released package cannot be renewed; unsubscribing a package is refused (non-refundable)
        let e = b.renew("pk1", 1, t("2024-07-03T00:00:00+08:00")).await.unwrap_err();
        assert_eq!(exit_code(&e), 2, "{e:#}");
        let e = b.unsubscribe("pk2", t("2024-07-03T00:00:00+08:00")).await.unwrap_err();
        assert!(format!("{e:#}").contains("non-refundable"), "{e:#}");
    })
    .await;
}

#[tokio::test]
async fn late_counts_draw_or_bill_only_the_difference_and_no_unit_twice() {
    let doc = format!(
        r#"{{"accounts": [{{"id": "acme", "balance": "50.00"}}], {MAIL},
        "resources": [{{"id": "m1", "account": "acme", "plan": "mail", "mode": "pay_per_use", "created_at": "2024-05-01T00:00:00Z"}}],
        "packages": [{{"id": "pk1", "resource": "m1", "package": "email-10k", "purchased_at": "2024-05-01T00:00:00Z"}}],
        "usage": [{}, {}]}}"#,
        count("m1", 8000, "2024-05-02T10:15:00Z"),
        count("m1", 1500, "2024-05-02T11:15:00Z"),
    );
    on_each_backend(async |be| {
        let b = be.open("UTC").await;
        b.load_json("mail.json", &doc).await.unwrap();
        b.tick(t("2024-05-02T13:00:00Z"), |_, _| {}).await.unwrap();
        // late: 1,000 more at 10:40; 500 are left in the package, so 500 drawn and 500 billed
        let late = b
            .load_json(
                "late.json",
                &format!(r#"{{"usage": [{}]}}"#, count("m1", 1000, "2024-05-02T10:40:00Z")),
            )
            .await
            .unwrap();
        assert_eq!(late.hours_marked_for_resettlement, 1);
        b.tick(t("2024-05-02T14:00:00Z"), |_, _| {}).await.unwrap();
        let after_late = rows(&csv(&b).await);
        assert_eq!(
            usage(&after_late),
            vec![
                line("2024-05-02T12:00:00Z", "email@pk1", "usage", "8000", "0.00"),
                line("2024-05-02T13:00:00Z", "email@pk1", "usage", "1500", "0.00"),
                line("2024-05-02T14:00:00Z", "email", "usage", "500", "0.25"),
                line("2024-05-02T14:00:00Z", "email@pk1", "adjustment", "500", "0.00"),
            ],
            "{}",
            be.name
        );
        // rerunning the hour by hand posts nothing more
        let rerun = b
            .settle_hour(t("2024-05-02T10:00:00Z"), t("2024-05-02T14:10:00Z"), false)
            .await
            .unwrap();
        assert_eq!(rerun.lines, 0, "{}", be.name);
        // a corrected record (10:40 was 200, not 1,000): 800 go back, 500 billed are taken back
        b.load_json(
            "fix.json",
            &format!(r#"{{"usage": [{}]}}"#, count("m1", 200, "2024-05-02T10:40:00Z")),
        )
        .await
        .unwrap();
        let fixed = b
            .settle_hour(t("2024-05-02T10:00:00Z"), t("2024-05-02T14:20:00Z"), false)
            .await
            .unwrap();
        assert_eq!(fixed.lines, 2, "{}", be.name);
        let rows = rows(&csv(&b).await);
        let hour10: Vec<_> = usage(&rows).into_iter().filter(|l| l.0 == "2024-05-02T14:20:00Z").collect();
        assert_eq!(
            hour10,
            vec![
                line("2024-05-02T14:20:00Z", "email", "adjustment", "-500", "-0.25"),
                line("2024-05-02T14:20:00Z", "email@pk1", "adjustment", "-300", "0.00"),
            ],
            "{}",
            be.name
        );
        // hour 10 now draws 8,200 and bills nothing, as a first settlement of 8,200 would; the package
        // has given 9,700 units in all and the balance moved by the package and the billed units only
        let d = drawn(&rows);
        assert_eq!(d["pk1"], dec("9700"), "{}", be.name);
        assert_eq!(balance(&b, "acme").await, "46.00", "{}", be.name);
        // the next scheduled run does not re-settle it again
        b.tick(t("2024-05-02T16:00:00Z"), |_, _| {}).await.unwrap();
        assert_eq!(csv(&b).await.lines().count(), rows.len() + 1);
    })
    .await;
}

#[tokio::test]
async fn a_package_loaded_late_covers_hours_already_billed() {
    let doc = format!(
        r#"{{"accounts": [{{"id": "acme", "balance": "50.00"}}], {MAIL},
        "resources": [{{"id": "m1", "account": "acme", "plan": "mail", "mode": "pay_per_use", "created_at": "2024-05-01T00:00:00Z"}}],
        "usage": [{}]}}"#,
        count("m1", 3000, "2024-05-02T10:15:00Z"),
    );
    on_each_backend(async |be| {
        let b = be.open("UTC").await;
        b.load_json("mail.json", &doc).await.unwrap();
        b.tick(t("2024-05-02T13:00:00Z"), |_, _| {}).await.unwrap();
        let pk = r#"{"packages": [{"id": "pk1", "resource": "m1", "package": "email-10k", "purchased_at": "2024-05-02T09:00:00Z"}]}"#;
        let s = b.load_json("pk.json", pk).await.unwrap();
        assert_eq!((s.packages, s.purchases, s.hours_marked_for_resettlement), (1, 1, 1));
        b.tick(t("2024-05-02T14:00:00Z"), |_, _| {}).await.unwrap();
        assert_eq!(
            usage(&rows(&csv(&b).await)),
            vec![
                line("2024-05-02T12:00:00Z", "email", "usage", "3000", "1.50"),
                line("2024-05-02T14:00:00Z", "email", "adjustment", "-3000", "-1.50"),
                line("2024-05-02T14:00:00Z", "email@pk1", "usage", "3000", "0.00"),
            ],
            "{}",
            be.name
        );
    })
    .await;
}

#[tokio::test]
async fn one_tick_equals_hourly_ticks_with_packages() {
    let doc = format!(
        r#"{{"accounts": [{{"id": "acme", "balance": "30.00"}}], {MAIL},
        "resources": [{{"id": "m1", "account": "acme", "plan": "mail", "mode": "pay_per_use", "created_at": "2024-05-01T00:00:00Z"}}],
        "packages": [{{"id": "pk1", "resource": "m1", "package": "email-10k", "purchased_at": "2024-05-01T00:00:00Z", "auto_renew": true}}],
        "usage": [{}, {}, {}, {}]}}"#,
        count("m1", 4000, "2024-05-10T10:15:00Z"),
        count("m1", 7000, "2024-05-20T10:15:00Z"),
        count("m1", 9000, "2024-06-01T23:30:00Z"),
        count("m1", 12000, "2024-06-02T00:30:00Z"),
    );
    let mut csvs = Vec::new();
    for hourly in [false, true] {
        let per_backend = std::sync::Mutex::new(Vec::new());
        on_each_backend(async |be| {
            let b = be.open("UTC").await;
            b.load_json("mail.json", &doc).await.unwrap();
            if hourly {
                let mut now = t("2024-05-01T00:00:00Z");
                while now <= t("2024-06-03T00:00:00Z") {
                    b.tick(now, |_, _| {}).await.unwrap();
                    now += 3600;
                }
            } else {
                b.tick(t("2024-06-03T00:00:00Z"), |_, _| {}).await.unwrap();
            }
            let out = csv(&b).await;
            per_backend.lock().unwrap().push(out);
        })
        .await;
        csvs.push(per_backend.into_inner().unwrap());
    }
    assert_eq!(csvs[0], csvs[1], "one tick and hourly ticks post the same lines");
    let rows = rows(&csvs[0][0]);
    assert_eq!(
        usage(&rows),
        vec![
            line("2024-05-10T12:00:00Z", "email@pk1", "usage", "4000", "0.00"),
            line("2024-05-20T12:00:00Z", "email", "usage", "1000", "0.50"),
            line("2024-05-20T12:00:00Z", "email@pk1", "usage", "6000", "0.00"),
            line("2024-06-02T01:00:00Z", "email", "usage", "9000", "4.50"),
            // the renewed cycle from 06-02 00:00 holds a fresh 10,000
            line("2024-06-02T02:00:00Z", "email", "usage", "2000", "1.00"),
            line("2024-06-02T02:00:00Z", "email@pk1", "usage", "10000", "0.00"),
        ]
    );
}

#[tokio::test]
async fn koodrive_edition_with_expansion_parts_renews_every_part() {
    let doc = r#"{"accounts": [{"id": "acme", "balance": "100.00"}],
        "plans": [{"id": "drive-pro", "product": "KooDrive", "monthly": "10.00", "yearly": "100.00",
                   "parts": {"storage-100gb": {"monthly": "5.00", "yearly": "50.00"}, "users-5": {"monthly": "3.00"}}}],
        "resources": [{"id": "k1", "account": "acme", "plan": "drive-pro", "mode": "monthly", "quantity": 1,
                       "parts": {"storage-100gb": 2, "users-5": 1}, "purchased_at": "2024-03-10T12:00:00Z", "auto_renew": true}]}"#;
    on_each_backend(async |be| {
        let b = be.open("UTC").await;
        b.load_json("drive.json", doc).await.unwrap();
        b.tick(t("2024-04-05T00:00:00Z"), |_, _| {}).await.unwrap();
        let rows = rows(&csv(&b).await);
        let lines: Vec<_> = rows
            .iter()
            .map(|r| {
                (
                    r["transaction_type"].clone(),
                    r["unit_price"].clone(),
                    r["amount_due"].clone(),
                    r["period_end"].clone(),
                )
            })
            .collect();
        assert_eq!(
            lines,
            vec![
                (
                    "purchase".to_string(),
                    "23".to_string(),
                    "23.00".to_string(),
                    "2024-04-11T00:00:00Z".to_string()
                ),
                (
                    "renewal".to_string(),
                    "23".to_string(),
                    "23.00".to_string(),
                    "2024-05-11T00:00:00Z".to_string()
                ),
            ],
            "{}: 10 + 2 x 5 + 3 per month, the renewal renews every part",
            be.name
        );
        let e = b.explain(&rows[1]["transaction_id"]).await.unwrap();
        assert!(e.text.contains("23 per period"), "{}", e.text);
        assert_eq!(balance(&b, "acme").await, "54.00");
        // a manual renewal of two months renews every part too
        let line = b.renew("k1", 2, t("2024-04-06T00:00:00Z")).await.unwrap();
        assert_eq!(line.amount_due, dec("46.00"));
    })
    .await;
    // bad parts are refused, naming the field
    for (bad, needle) in [
        (doc.replace(r#""users-5": 1}"#, r#""users-9": 1}"#), "parts.users-9"),
        (
            doc.replace(r#""mode": "monthly""#, r#""mode": "yearly""#),
            "no yearly price for part \"users-5\"",
        ),
        (doc.replace(r#""users-5": 1}"#, r#""users-5": 0}"#), "not a count"),
    ] {
        on_each_backend(async |be| {
            let b = be.open("UTC").await;
            let e = b.load_json("bad.json", &bad).await.unwrap_err();
            assert_eq!(exit_code(&e), 2);
            assert!(format!("{e:#}").contains(needle), "{e:#}");
            assert!(csv(&b).await.lines().count() == 1, "nothing loaded");
        })
        .await;
    }
}

#[tokio::test]
async fn bad_package_and_count_documents_exit_2_naming_the_field() {
    let base = format!(
        r#"{{"accounts": [{{"id": "acme", "balance": "50.00"}}], {MAIL},
        "resources": [{{"id": "m1", "account": "acme", "plan": "mail", "mode": "pay_per_use", "created_at": "2024-05-01T00:00:00Z", "deleted_at": "2024-06-01T00:00:00Z"}},
                      {{"id": "s1", "account": "acme", "plan": "mail", "mode": "pay_per_use", "created_at": "2024-05-01T00:00:00Z"}}]"#
    );
    let cases: Vec<(String, &str)> = vec![
        (
            format!(r#"{base}, "packages": [{{"id": "pk1", "resource": "m1", "package": "email-1m", "purchased_at": "2024-05-01T00:00:00Z"}}]}}"#),
            "packages[0] (id \"pk1\"): field `package`: plan \"mail\" has no package \"email-1m\"",
        ),
        (
            format!(r#"{base}, "packages": [{{"id": "m1", "resource": "m1", "package": "email-10k", "purchased_at": "2024-05-01T00:00:00Z"}}]}}"#),
            "field `id`: duplicate id",
        ),
        (
            format!(r#"{base}, "packages": [{{"id": "pk1", "resource": "m9", "package": "email-10k", "purchased_at": "2024-05-01T00:00:00Z"}}]}}"#),
            "field `resource`: unknown resource \"m9\"",
        ),
        (
            format!(r#"{base}, "packages": [{{"id": "pk1", "resource": "m1", "package": "email-10k", "purchased_at": "2024-06-01T00:00:00Z"}}]}}"#),
            "field `purchased_at`: resource \"m1\" is deleted by then",
        ),
        (
            format!(r#"{base}, "packages": [{{"id": "pk1", "resource": "m1", "package": "email-10k", "purchased_at": "2024-05-01T00:00:00"}}]}}"#),
            "field `purchased_at`",
        ),
        (
            format!(r#"{base}, "packages": [{{"id": "pk1", "resource": "m1", "package": "email-10k", "purchased_at": "2024-05-01T00:00:00Z", "periods": 0}}]}}"#),
            "field `periods`",
        ),
        (
            format!(r#"{base}, "packages": [{{"id": "pk1", "resource": "m1", "package": "email-10k", "purchased_at": "2024-05-01T00:00:00Z", "quota": "5"}}]}}"#),
            "unknown field `quota`",
        ),
        (
            format!(r#"{base}, "usage": [{{"resource": "m1", "item": "email", "quantity": "5", "at": "2024-05-02T00:00:00Z", "to": "2024-05-02T01:00:00Z"}}]}}"#),
            "usage[0]: field `to`: a count record gives `at`",
        ),
        (
            format!(r#"{base}, "usage": [{{"resource": "m1", "item": "sms", "quantity": "5", "at": "2024-05-02T00:00:00Z"}}]}}"#),
            "usage[0]: field `item`: plan \"mail\" has no per_unit price for `sms`",
        ),
        (
            format!(r#"{base}, "usage": [{{"resource": "m1", "item": "email", "quantity": "-5", "at": "2024-05-02T00:00:00Z"}}]}}"#),
            "usage[0]: field `quantity`: may not be negative",
        ),
        (
            format!(r#"{base}, "usage": [{{"resource": "m1", "item": "email", "quantity": "5", "at": "2024-06-01T00:00:00Z"}}]}}"#),
            "usage[0]: field `at`: the record lies outside resource \"m1\"'s lifetime",
        ),
        (
            format!(r#"{base}, "usage": [{{"resource": "m1", "item": "email", "quantity": "5", "from": "2024-05-02T00:00:00Z", "to": "2024-05-02T01:00:00Z"}}]}}"#),
            "(it is count-metered: give `at` instead of `from`/`to`)",
        ),
        (
            format!(
                r#"{base}, "usage": [{{"resource": "m1", "item": "email", "quantity": "5", "at": "2024-05-02T00:00:00Z"}}, {{"resource": "m1", "item": "email", "quantity": "6", "at": "2024-05-02T00:00:00Z"}}]}}"#
            ),
            "usage[1]: field `at`: a second count",
        ),
        (
            format!(r#"{base}, "usage": [{{"resource": "m1", "item": "email", "quantity": "1e3", "at": "2024-05-02T00:00:00Z"}}]}}"#),
            "not a decimal number",
        ),
        (
            r#"{"plans": [{"id": "m", "product": "KooMessage", "per_unit": {"email": "0.0005"}, "packages": {"k": {"item": "sms", "quantity": "10", "price": "1", "months": 1}}}]}"#.to_string(),
            "field `packages.k.item`",
        ),
        (
            r#"{"plans": [{"id": "m", "product": "KooMessage", "per_unit": {"email": "0.0005"}, "packages": {"k": {"item": "email", "quantity": "0", "price": "1", "months": 1}}}]}"#.to_string(),
            "field `packages.k.quantity`: a package's quota must be positive",
        ),
        (
            r#"{"plans": [{"id": "m", "product": "KooMessage", "per_unit": {"email": "0.0005"}, "packages": {"k": {"item": "email", "quantity": "10", "price": "1", "months": 0}}}]}"#.to_string(),
            "field `packages.k.months`",
        ),
        (
            r#"{"plans": [{"id": "m", "product": "KooMessage", "per_unit": {"e@mail": "0.0005"}}]}"#.to_string(),
            "may not contain `@`",
        ),
    ];
    on_each_backend(async |be| {
        let b = be.open("UTC").await;
        for (doc, needle) in &cases {
            let e = b.load_json("bad.json", doc).await.unwrap_err();
            assert_eq!(exit_code(&e), 2, "{doc}: {e:#}");
            assert!(format!("{e:#}").contains(needle), "{}: expected {needle:?} in {e:#}", be.name);
        }
        assert_eq!(b.status().await.unwrap().accounts.len(), 0, "nothing half-loaded");
    })
    .await;
}

#[tokio::test]
async fn a_package_renewed_while_expired_covers_units_from_the_renewal_on() {
    let doc = format!(
        r#"{{"accounts": [{{"id": "acme", "balance": "50.00"}}], {MAIL},
        "resources": [{{"id": "m1", "account": "acme", "plan": "mail", "mode": "pay_per_use", "created_at": "2024-05-01T00:00:00Z"}}],
        "packages": [{{"id": "pk1", "resource": "m1", "package": "email-10k", "purchased_at": "2024-05-01T00:00:00Z"}}],
        "usage": [{}, {}, {}]}}"#,
        count("m1", 1000, "2024-06-03T10:00:00Z"),
        count("m1", 2000, "2024-06-05T10:00:00Z"),
        count("m1", 3000, "2024-06-05T12:30:00Z"),
    );
    on_each_backend(async |be| {
        let b = be.open("UTC").await;
        b.load_json("mail.json", &doc).await.unwrap();
        // pk1 expired at 06-02 00:00; renewed by hand on 06-05 at 12:00, in its grace period
        b.tick(t("2024-06-05T12:00:00Z"), |_, _| {}).await.unwrap();
        assert_eq!(
            b.status().await.unwrap().resources.iter().find(|r| r.id == "pk1").unwrap().state,
            "expired"
        );
        let renewal = b.renew("pk1", 1, t("2024-06-05T12:00:00Z")).await.unwrap();
        assert_eq!(
            (renewal.amount_due, renewal.period_start, renewal.period_end),
            (dec("4.00"), t("2024-06-02T00:00:00Z"), t("2024-07-02T00:00:00Z")),
            "{}: the new cycle continues from the old expiry",
            be.name
        );
        b.tick(t("2024-06-05T16:00:00Z"), |_, _| {}).await.unwrap();
        let s = b.status().await.unwrap();
        let pk = s.resources.iter().find(|r| r.id == "pk1").unwrap();
        assert_eq!((pk.state.as_str(), pk.expires_on.as_deref()), ("running", Some("2024-07-01")));
        // before the renewal everything was billed (06-03, and 06-05 10:00 settled at 12:00); the
        // units after it are drawn from the renewed cycle
        assert_eq!(
            usage(&rows(&csv(&b).await)),
            vec![
                line("2024-06-03T12:00:00Z", "email", "usage", "1000", "0.50"),
                line("2024-06-05T12:00:00Z", "email", "usage", "2000", "1.00"),
                line("2024-06-05T14:00:00Z", "email@pk1", "usage", "3000", "0.00"),
            ],
            "{}",
            be.name
        );
    })
    .await;
}
