//! The contract suite: SPEC sections 1, 2 (to arrears), 6 and 7, on SQLite and PostgreSQL.

mod common;

use billrun::error::exit_code;
use common::*;
use rust_decimal::Decimal;
use std::collections::HashMap;

const PHONE: &str = r#"{
  "accounts": [{"id": "acme", "balance": "100.00", "currency": "USD"}],
  "plans": [{"id": "phone-pro", "product": "KooPhone", "hourly": {"instance": "0.36"}}],
  "resources": [
    {"id": "p1", "account": "acme", "plan": "phone-pro", "mode": "pay_per_use", "quantity": 1,
     "created_at": "2023-04-18T09:59:30Z", "deleted_at": "2023-04-18T10:45:46Z"},
    {"id": "p2", "account": "acme", "plan": "phone-pro", "mode": "pay_per_use",
     "created_at": "2023-04-18T08:45:30Z", "deleted_at": "2023-04-18T08:55:30Z"}
  ]
}"#;

fn line<'a>(rows: &'a [HashMap<String, String>], resource: &str, period_start: &str) -> &'a HashMap<String, String> {
    rows.iter()
        .find(|r| r["resource_id"] == resource && r["period_start"] == period_start)
        .unwrap_or_else(|| panic!("no line for {resource} at {period_start}"))
}

#[tokio::test]
async fn koophone_examples_to_the_second_and_the_cent() {
    on_each_backend(async |be| {
        let b = be.open("UTC").await;
        b.load_json("phone.json", PHONE).await.unwrap();
        let total = b.tick(t("2023-04-18T13:00:00Z"), |_, _| {}).await.unwrap();
        assert_eq!(total.lines, 3, "{}", be.name);
        let rows = rows(&csv(&b).await);
        let first = line(&rows, "p1", "2023-04-18T09:59:30Z");
        assert_eq!(first["period_end"], "2023-04-18T10:00:00Z");
        assert_eq!(first["usage_seconds"], "30");
        assert_eq!(
            (
                first["list_amount"].as_str(),
                first["amount_due"].as_str(),
                first["truncated_amount"].as_str()
            ),
            ("0.003", "0.00", "0.003")
        );
        // the fees of 09:00-10:00 are deducted at 11:00:00
        assert_eq!(first["transaction_time"], "2023-04-18T11:00:00Z");
        let second = line(&rows, "p1", "2023-04-18T10:00:00Z");
        assert_eq!(
            (second["period_end"].as_str(), second["usage_seconds"].as_str()),
            ("2023-04-18T10:45:46Z", "2746")
        );
        assert_eq!(
            (
                second["list_amount"].as_str(),
                second["amount_due"].as_str(),
                second["truncated_amount"].as_str()
            ),
            ("0.2746", "0.27", "0.0046")
        );
        let short = line(&rows, "p2", "2023-04-18T08:45:30Z");
        assert_eq!(
            (
                short["period_end"].as_str(),
                short["usage_seconds"].as_str(),
                short["amount_due"].as_str()
            ),
            ("2023-04-18T08:55:30Z", "600", "0.06")
        );
        assert_eq!(short["transaction_time"], "2023-04-18T10:00:00Z");
        for r in &rows {
            assert_eq!(
                (r["billing_mode"].as_str(), r["transaction_type"].as_str(), r["currency"].as_str()),
                ("pay_per_use", "usage", "USD")
            );
            assert_eq!(dec(&r["amount_due"]) + dec(&r["truncated_amount"]), dec(&r["list_amount"]));
        }
        assert_eq!(rows.last().unwrap()["balance_after"], "99.67");
        let status = b.status().await.unwrap();
        assert_eq!(status.accounts[0].balance, "99.67");
        b.db.close().await;
    })
    .await;
}

#[tokio::test]
async fn koodrive_users_and_storage_in_utc_plus_8() {
    let doc = r#"{
      "accounts": [{"id": "acme", "balance": "10.00"}],
      "plans": [{"id": "drive", "product": "KooDrive", "hourly": {"users": "0.012", "storage_gb": "0.0001"}}],
      "resources": [{"id": "d1", "account": "acme", "plan": "drive", "mode": "pay_per_use",
                     "created_at": "2024-02-01T09:00:00+08:00", "deleted_at": "2024-02-01T11:00:00+08:00"}],
      "usage": [{"resource": "d1", "item": "users", "quantity": "5", "from": "2024-02-01T10:00:00+08:00", "to": "2024-02-01T11:00:00+08:00"},
                {"resource": "d1", "item": "storage_gb", "quantity": "100", "from": "2024-02-01T10:00:00+08:00", "to": "2024-02-01T11:00:00+08:00"}]
    }"#;
    on_each_backend(async |be| {
        let b = be.open("Asia/Shanghai").await;
        b.load_json("drive.json", doc).await.unwrap();
        b.tick(t("2024-02-01T14:00:00+08:00"), |_, _| {}).await.unwrap();
        let rows = rows(&csv(&b).await);
        assert_eq!(rows.len(), 2, "{}: {rows:?}", be.name);
        let users = rows.iter().find(|r| r["billing_item"] == "users").unwrap();
        let storage = rows.iter().find(|r| r["billing_item"] == "storage_gb").unwrap();
        // 5 users x 1 hour x 0.012 + 100 GB x 1 hour x 0.0001
        assert_eq!(
            (
                users["quantity"].as_str(),
                users["unit_price"].as_str(),
                users["list_amount"].as_str(),
                users["amount_due"].as_str()
            ),
            ("5", "0.012", "0.06", "0.06")
        );
        assert_eq!(
            (
                storage["quantity"].as_str(),
                storage["list_amount"].as_str(),
                storage["amount_due"].as_str()
            ),
            ("100", "0.01", "0.01")
        );
        assert_eq!(users["period_start"], "2024-02-01T10:00:00+08:00");
        assert_eq!(users["period_end"], "2024-02-01T11:00:00+08:00");
        assert_eq!(users["transaction_time"], "2024-02-01T12:00:00+08:00");
        assert_eq!(b.status().await.unwrap().accounts[0].balance, "9.93");
        b.db.close().await;
    })
    .await;
}

#[tokio::test]
async fn the_hour_grid_is_local_in_a_half_hour_zone() {
    let doc = r#"{
      "accounts": [{"id": "a", "balance": "10.00"}],
      "plans": [{"id": "p", "product": "KooPhone", "hourly": {"instance": "0.36"}}],
      "resources": [{"id": "r", "account": "a", "plan": "p", "mode": "pay_per_use",
                     "created_at": "2024-01-01T10:00:00Z", "deleted_at": "2024-01-01T11:00:00Z"}]
    }"#;
    on_each_backend(async |be| {
        let b = be.open("+05:30").await;
        b.load_json("half.json", doc).await.unwrap();
        b.tick(t("2024-01-02T00:00:00Z"), |_, _| {}).await.unwrap();
        let rows = rows(&csv(&b).await);
        assert_eq!(rows.len(), 2, "{}", be.name);
        // local 15:30-16:00 and 16:00-16:30: the hours start at local full hours
        assert_eq!(
            (
                rows[0]["period_start"].as_str(),
                rows[0]["period_end"].as_str(),
                rows[0]["usage_seconds"].as_str()
            ),
            ("2024-01-01T15:30:00+05:30", "2024-01-01T16:00:00+05:30", "1800")
        );
        assert_eq!(
            (
                rows[1]["period_start"].as_str(),
                rows[1]["usage_seconds"].as_str(),
                rows[1]["amount_due"].as_str()
            ),
            ("2024-01-01T16:00:00+05:30", "1800", "0.18")
        );
        assert_eq!(rows[1]["transaction_time"], "2024-01-01T18:00:00+05:30");
        b.db.close().await;
    })
    .await;
}

const DAY: &str = r#"{
  "accounts": [{"id": "acme", "balance": "30.00"}, {"id": "zeta", "balance": "3.00"}],
  "plans": [{"id": "phone-pro", "product": "KooPhone", "hourly": {"instance": "0.36"}},
            {"id": "phone-ent", "product": "KooPhone", "hourly": {"instance": "0.72"}},
            {"id": "drive", "product": "KooDrive", "hourly": {"users": "0.012", "storage_gb": "0.0001"}}],
  "resources": [
    {"id": "p1", "account": "acme", "plan": "phone-pro", "mode": "pay_per_use", "created_at": "2023-04-18T00:17:03Z", "deleted_at": "2023-04-18T19:02:59Z"},
    {"id": "e1", "account": "zeta", "plan": "phone-ent", "mode": "pay_per_use", "quantity": 2, "created_at": "2023-04-18T01:20:15Z"},
    {"id": "d1", "account": "acme", "plan": "drive", "mode": "pay_per_use", "created_at": "2023-04-18T00:00:00Z"}
  ],
  "usage": [
    {"resource": "d1", "item": "users", "quantity": "7", "from": "2023-04-18T00:00:00Z", "to": "2023-04-18T09:30:00Z"},
    {"resource": "d1", "item": "users", "quantity": "9", "from": "2023-04-18T09:30:00Z", "to": "2023-04-18T23:00:00Z"},
    {"resource": "d1", "item": "storage_gb", "quantity": "250.5", "from": "2023-04-18T02:00:00Z", "to": "2023-04-18T22:10:00Z"}
  ],
  "topups": [{"account": "zeta", "amount": "2.50", "at": "2023-04-18T00:00:00Z"}]
}"#;

#[tokio::test]
async fn one_tick_equals_twenty_four_and_a_second_tick_adds_nothing() {
    on_each_backend(async |be| {
        let one = be.open("UTC").await;
        one.load_json("day.json", DAY).await.unwrap();
        one.tick(t("2023-04-19T02:00:00Z"), |_, _| {}).await.unwrap();
        let once = csv(&one).await;
        let again = one.tick(t("2023-04-19T02:00:00Z"), |_, _| {}).await.unwrap();
        assert_eq!((again.settle_runs, again.daily_runs, again.lines), (0, 0, 0));
        assert_eq!(csv(&one).await, once);
        let status_once = serde_json::to_value(one.status().await.unwrap()).unwrap();
        one.db.close().await;

        let fresh = common::fresh(be.name).await;
        let many = fresh.open("UTC").await;
        many.load_json("day.json", DAY).await.unwrap();
        let mut runs = 0;
        for h in 0..=26 {
            runs += many
                .tick(t("2023-04-18T00:00:00Z") + h * 3600, |_, _| {})
                .await
                .unwrap()
                .settle_runs;
        }
        assert_eq!(runs, 25, "{}: one run an hour from 02:00 to 02:00 next day", be.name);
        assert_eq!(csv(&many).await, once, "{}: same CSV, ids included", be.name);
        assert_eq!(
            serde_json::to_value(many.status().await.unwrap()).unwrap()["accounts"],
            status_once["accounts"]
        );
        many.db.close().await;
    })
    .await;
}

/// Sum of amount_due in the export equals what the balances moved by, less top-ups.
#[tokio::test]
async fn export_reconciles_with_the_balances() {
    on_each_backend(async |be| {
        let b = be.open("UTC").await;
        b.load_json("day.json", DAY).await.unwrap();
        b.tick(t("2023-04-18T12:00:00Z"), |_, _| {}).await.unwrap();
        b.topup("zeta", "20.00", t("2023-04-18T12:30:00Z")).await.unwrap();
        b.tick(t("2023-04-19T03:00:00Z"), |_, _| {}).await.unwrap();
        assert_export_matches_records(&b, be.name).await;
        let rows = rows(&csv(&b).await);
        let status = b.status().await.unwrap();
        let opening: HashMap<&str, Decimal> = HashMap::from([("acme", dec("30.00")), ("zeta", dec("3.00"))]);
        let topups: HashMap<&str, Decimal> = HashMap::from([("acme", dec("0")), ("zeta", dec("22.50"))]);
        for a in &status.accounts {
            let due: Decimal = rows.iter().filter(|r| r["account_id"] == a.id).map(|r| dec(&r["amount_due"])).sum();
            let moved = opening[a.id.as_str()] + topups[a.id.as_str()] - dec(&a.balance);
            assert_eq!(due, moved, "{}: account {}", be.name, a.id);
            let paid: Decimal = rows
                .iter()
                .filter(|r| r["account_id"] == a.id)
                .map(|r| dec(&r["paid_amount"]) + dec(&r["arrears_amount"]))
                .sum();
            assert_eq!(paid, due);
        }
        // zeta's 0.72/h x 2 outran 5.50, was topped up by 20.00 at 12:30, and ran out again
        let zeta = status.accounts.iter().find(|a| a.id == "zeta").unwrap();
        let zeta_rows: Vec<_> = rows.iter().filter(|r| r["account_id"] == "zeta").collect();
        let went_negative: Vec<&str> = zeta_rows
            .windows(2)
            .filter(|w| dec(&w[0]["balance_after"]) >= Decimal::ZERO && dec(&w[1]["balance_after"]) < Decimal::ZERO)
            .map(|w| w[1]["transaction_time"].as_str())
            .collect();
        assert_eq!(went_negative.len(), 2, "{}", be.name);
        assert_eq!(zeta.in_arrears_since.as_deref(), Some(went_negative[1]), "{}", be.name);
        let kinds: Vec<String> = b
            .notifications(Some("zeta"))
            .await
            .unwrap()
            .iter()
            .map(|n| n["kind"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(kinds, ["arrears_began", "arrears_cleared", "arrears_began"], "{}", be.name);
        b.db.close().await;
    })
    .await;
}

/// Ids with what a CSV, SQL literal or COPY's text format treats specially come out of the export
/// as they went in (formula starts defused), on both backends, filtered by account too.
#[tokio::test]
async fn export_keeps_awkward_ids_intact() {
    let ids = [r"a\b", "o'brien", "=cmd()", "\"q\",x", "ünï 口", r"\N", "-1"];
    let accounts: Vec<String> = ids.iter().map(|a| json_str(a)).collect();
    let doc = format!(
        r#"{{"accounts": [{}], "plans": [{{"id": "p\\1", "product": "Koo\"Phone", "hourly": {{"instance": "0.36"}}}}],
        "resources": [{}]}}"#,
        accounts
            .iter()
            .map(|a| format!(r#"{{"id": {a}, "balance": "10.00"}}"#))
            .collect::<Vec<_>>()
            .join(", "),
        // five resources an account: 35 lines in one posting, which PostgreSQL writes with COPY
        accounts
            .iter()
            .enumerate()
            .flat_map(|(i, a)| {
                (0..5).map(move |k| {
                    format!(
                        r#"{{"id": {}, "account": {a}, "plan": "p\\1", "mode": "pay_per_use", "created_at": "2024-02-01T00:00:00Z"}}"#,
                        json_str(&format!("{}#{i}.{k}", ids[i]))
                    )
                })
            })
            .collect::<Vec<_>>()
            .join(", ")
    );
    on_each_backend(async |be| {
        let b = be.open("UTC").await;
        b.load_json("ids.json", &doc).await.unwrap();
        b.tick(t("2024-02-01T02:00:00Z"), |_, _| {}).await.unwrap();
        let all = rows(&csv(&b).await);
        assert_eq!(all.len(), 5 * ids.len(), "{}", be.name);
        for (i, id) in ids.iter().enumerate() {
            let shown = |s: &str| {
                if s.starts_with(['=', '-']) {
                    format!("'{s}")
                } else {
                    s.to_string()
                }
            };
            let mut out = Vec::new();
            let filter = billrun::store::ledger::ExportFilter {
                account: Some(id.to_string()),
                ..Default::default()
            };
            b.export(&filter, &mut out).await.unwrap();
            let mine = rows(&String::from_utf8(out).unwrap());
            assert_eq!(mine.len(), 5, "{}: account {id}", be.name);
            let mut resources: Vec<&str> = mine.iter().map(|r| r["resource_id"].as_str()).collect();
            resources.sort();
            let want: Vec<String> = (0..5).map(|k| shown(&format!("{id}#{i}.{k}"))).collect();
            assert_eq!(resources, want, "{}", be.name);
            for r in &mine {
                assert_eq!(r["account_id"], shown(id), "{}", be.name);
                assert_eq!(r["plan_id"], r"p\1", "{}", be.name);
                assert_eq!(r["product"], "Koo\"Phone", "{}", be.name);
                assert_eq!(r["amount_due"], "0.36", "{}", be.name);
            }
        }
        b.db.close().await;
    })
    .await;
}

/// Migration 7 drops the ledger's unique (line_key, revision) (SQLite: by rebuilding the table):
/// every row, column and seq survives, seq continues, and the unique transaction_id (a hash of
/// that pair) still refuses a second posting.
#[tokio::test]
async fn ledger_migration_keeps_every_row() {
    use billrun::store::db::{Db, Kind};
    use billrun::store::schema::{migrate, migrate_to};
    on_each_backend(async |be| {
        let db = Db::connect(&be.url).await.unwrap();
        assert_eq!(migrate_to(&db, 6).await.unwrap(), 6);
        for (id, key, revision) in [("tx_a", "k1", 0), ("tx_b", "k1", 1), ("tx_x", "k9", 0), ("tx_c", "k2", 0)] {
            db.exec(sqlx::AssertSqlSafe(hour_line_sql(id, key, revision, 0)), vec![])
                .await
                .unwrap();
        }
        // a gap in seq, as a rolled-back posting leaves
        db.exec("DELETE FROM ledger WHERE transaction_id = 'tx_x'", vec![]).await.unwrap();
        let dump = "SELECT seq, transaction_id, transaction_time, quantity, list_amount, amount_due, balance_after, line_key, revision, explain \
                    FROM ledger ORDER BY seq";
        let kinds = [Kind::Int, Kind::Text, Kind::Int, Kind::Money, Kind::Money, Kind::Money, Kind::Money, Kind::Text, Kind::Int, Kind::Text];
        let before: Vec<String> = db.rows(dump, vec![], &kinds).await.unwrap().iter().map(|r| format!("{:?}", r.0)).collect();
        assert_eq!(migrate(&db).await.unwrap(), 17, "{}", be.name);
        if be.name == "postgres" {
            // room on each page for balance (migration 9) and subscription (11) updates to stay HOT
            for (table, fill) in [("accounts", "fillfactor=50"), ("resources", "fillfactor=80")] {
                let options = db
                    .rows(
                        "SELECT COALESCE(array_to_string(reloptions, ','), '') FROM pg_class WHERE relname = $1",
                        vec![table.into()],
                        &[Kind::Text],
                    )
                    .await
                    .unwrap()[0]
                    .text(0);
                assert_eq!(options, fill, "{table}");
            }
        }
        let after: Vec<String> = db.rows(dump, vec![], &kinds).await.unwrap().iter().map(|r| format!("{:?}", r.0)).collect();
        assert_eq!(before, after, "{}", be.name);
        assert!(after[2].contains("Int(Some(4))") && after[1].contains("-0.06"), "{after:?}");
        // the same (line_key, revision) under a new id is no longer refused by the pair...
        db.exec(sqlx::AssertSqlSafe(hour_line_sql("tx_d", "k2", 0, 0)), vec![]).await.unwrap();
        // ...and a second posting of a line (same pair, so the same hashed id) still is
        assert!(db.exec(sqlx::AssertSqlSafe(hour_line_sql("tx_c", "k2", 0, 0)), vec![]).await.is_err(), "{}", be.name);
        // seq goes on after the highest one kept
        let next = "INSERT INTO ledger (transaction_id, transaction_time, account_id, resource_id, product, plan_id, billing_mode, \
                    transaction_type, period_start, period_end, quantity, unit_price, list_amount, truncated_amount, amount_due, paid_amount, \
                    arrears_amount, balance_after, currency, line_key, revision, run_job, run_at, explain) VALUES ('tx_e', 100, 'a', 'r', \
                    'KooPhone', 'p', 'pay_per_use', 'usage', 0, 3600, 1, 0.36, 0.36, 0, 0.36, 0.36, 0, 0, 'CNY', 'k3', 0, 'settle', 100, '{}')";
        db.exec(next, vec![]).await.unwrap();
        let seq = db.rows("SELECT seq FROM ledger WHERE transaction_id = 'tx_e'", vec![], &[Kind::Int]).await.unwrap()[0].int(0);
        assert!(seq > 5, "{}: seq {seq}", be.name);
        db.close().await;
    })
    .await;
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

#[tokio::test]
async fn settle_hour_rerun_adds_nothing_and_a_correction_posts_the_difference() {
    let doc = r#"{
      "accounts": [{"id": "acme", "balance": "50.00"}],
      "plans": [{"id": "drive", "product": "KooDrive", "hourly": {"users": "0.012", "storage_gb": "0.0001"}}],
      "resources": [{"id": "d1", "account": "acme", "plan": "drive", "mode": "pay_per_use", "created_at": "2024-02-01T00:00:00Z"}],
      "usage": [{"resource": "d1", "item": "storage_gb", "quantity": "1000", "from": "2024-02-01T10:00:00Z", "to": "2024-02-01T10:39:45Z"}]
    }"#;
    let correction = r#"{"usage": [{"resource": "d1", "item": "storage_gb", "quantity": "1000", "from": "2024-02-01T10:00:00Z", "to": "2024-02-01T10:59:59Z"}]}"#;
    on_each_backend(async |be| {
        let b = be.open("UTC").await;
        b.load_json("drive.json", doc).await.unwrap();
        b.tick(t("2024-02-01T12:00:00Z"), |_, _| {}).await.unwrap();
        let before = csv(&b).await;
        // 1000 GB x 0.0001 x 2385 s / 3600 = 0.06625 -> due 0.06
        assert_eq!(rows(&before)[0]["list_amount"], "0.06625");
        let hour = t("2024-02-01T10:00:00Z");
        let rerun = b.settle_hour(hour, t("2024-02-01T12:30:00Z"), false).await.unwrap();
        assert!(rerun.lines == 0, "{}", be.name);
        assert_eq!(csv(&b).await, before);

        let s = b.load_json("fix.json", correction).await.unwrap();
        assert_eq!((s.corrected_readings, s.hours_marked_for_resettlement), (1, 1));
        let dry = b.settle_hour(hour, t("2024-02-01T12:40:00Z"), true).await.unwrap();
        assert_eq!(dry.lines, 1);
        assert_eq!(csv(&b).await, before, "dry run changes nothing");
        let fixed = b.settle_hour(hour, t("2024-02-01T12:45:00Z"), false).await.unwrap();
        assert_eq!(fixed.lines, 1, "{}", be.name);
        let adj = &fixed.shown[0];
        // corrected 3599 s -> 0.09997222 (due 0.09); posted 0.06625 (due 0.06)
        assert_eq!(adj.transaction_type.as_str(), "adjustment");
        assert_eq!(
            (adj.list_amount, adj.amount_due, adj.usage_seconds),
            (dec("0.03372222"), dec("0.03"), Some(1214))
        );
        assert_eq!(adj.transaction_time, t("2024-02-01T12:45:00Z"));
        // the next scheduled run finds the hour already re-settled
        let next = b.tick(t("2024-02-01T13:00:00Z"), |_, _| {}).await.unwrap();
        assert_eq!(next.lines, 0, "{}", be.name);
        let again = b.settle_hour(hour, t("2024-02-01T13:30:00Z"), false).await.unwrap();
        assert!(again.lines == 0);
        let explained = b.explain(&adj.transaction_id).await.unwrap();
        assert!(
            explained.text.contains("corrected 0.09997222 - posted 0.06625 = 0.03372222"),
            "{}",
            explained.text
        );
        let all = rows(&csv(&b).await);
        let hour_due: Decimal = all
            .iter()
            .filter(|r| r["period_start"] == "2024-02-01T10:00:00Z")
            .map(|r| dec(&r["amount_due"]))
            .sum();
        assert_eq!(
            hour_due,
            dec("0.09"),
            "the hour's lines sum to a first settlement of the corrected data"
        );
        b.db.close().await;
    })
    .await;
}

#[tokio::test]
async fn late_usage_is_resettled_by_the_next_run() {
    let doc = r#"{
      "accounts": [{"id": "acme", "balance": "50.00"}],
      "plans": [{"id": "drive", "product": "KooDrive", "hourly": {"users": "0.012"}}],
      "resources": [{"id": "d1", "account": "acme", "plan": "drive", "mode": "pay_per_use", "created_at": "2024-02-01T00:00:00Z"}],
      "usage": [{"resource": "d1", "item": "users", "quantity": "10", "from": "2024-02-01T00:00:00Z", "to": "2024-02-01T01:00:00Z"}]
    }"#;
    let late = r#"{"usage": [{"resource": "d1", "item": "users", "quantity": "3", "from": "2024-02-01T00:30:00Z", "to": "2024-02-01T03:00:00Z"}]}"#;
    on_each_backend(async |be| {
        let b = be.open("UTC").await;
        b.load_json("d.json", doc).await.unwrap();
        b.tick(t("2024-02-01T05:00:00Z"), |_, _| {}).await.unwrap();
        assert_eq!(rows(&csv(&b).await).len(), 1);
        let s = b.load_json("late.json", late).await.unwrap();
        assert_eq!(s.hours_marked_for_resettlement, 3, "{}: 00:00, 01:00, 02:00 were settled", be.name);
        let out = b.tick(t("2024-02-01T06:00:00Z"), |_, _| {}).await.unwrap();
        assert_eq!(out.lines, 3, "{}", be.name);
        let rows = rows(&csv(&b).await);
        let late_lines: Vec<_> = rows.iter().filter(|r| r["quantity"] == "3").collect();
        assert_eq!(late_lines.len(), 3);
        for r in &late_lines {
            assert_eq!(
                r["transaction_time"], "2024-02-01T06:00:00Z",
                "posted at the run's scheduled instant"
            );
        }
        let first = late_lines
            .iter()
            .find(|r| r["period_start"] == "2024-02-01T00:30:00Z")
            .expect("the 00:00 hour's late line");
        assert_eq!((first["usage_seconds"].as_str(), first["amount_due"].as_str()), ("1800", "0.01"));
        assert_eq!(b.status().await.unwrap().settle.hours_awaiting_resettlement, 0);
        b.db.close().await;
    })
    .await;
}

/// Hundreds of nested arrays: refused by the parser's depth limit (128), not by a stack overflow.
const DEEP: &str = concat!("{\"accounts\": ", "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[", "}");

#[tokio::test]
async fn bad_input_exits_2_and_changes_nothing() {
    let base = r#"{"accounts": [{"id": "acme", "balance": "10.00"}],
      "plans": [{"id": "pp", "product": "KooPhone", "hourly": {"instance": "0.36"}, "monthly": "9.90"}, {"id": "dr", "product": "KooDrive", "hourly": {"users": "0.012"}}],
      "resources": [{"id": "d1", "account": "acme", "plan": "dr", "mode": "pay_per_use", "created_at": "2024-01-01T00:00:00Z"}]}"#;
    let cases: &[(&str, &str)] = &[
        (r#"{"accounts": [{"id": "new", "balance": "1.00", "colour": "red"}]}"#, "colour"),
        (r#"{"acounts": []}"#, "acounts"),
        (r#"{"accounts": [{"id": "acme"}]}"#, "duplicate account id"),
        (r#"{"accounts": [{"id": "x"}, {"id": "x"}]}"#, "accounts[1]"),
        (r#"{"plans": [{"id": "pp", "product": "KooPhone"}]}"#, "duplicate plan id"),
        (
            r#"{"resources": [{"id": "d1", "account": "acme", "plan": "pp", "mode": "pay_per_use", "created_at": "2024-01-01T00:00:00Z"}]}"#,
            "duplicate resource id",
        ),
        (
            r#"{"resources": [{"id": "r2", "account": "nobody", "plan": "pp", "mode": "pay_per_use", "created_at": "2024-01-01T00:00:00Z"}]}"#,
            "unknown account",
        ),
        (
            r#"{"resources": [{"id": "r2", "account": "acme", "plan": "nope", "mode": "pay_per_use", "created_at": "2024-01-01T00:00:00Z"}]}"#,
            "unknown plan",
        ),
        (
            r#"{"usage": [{"resource": "ghost", "item": "users", "quantity": "1", "from": "2024-01-01T00:00:00Z", "to": "2024-01-01T01:00:00Z"}]}"#,
            "unknown resource",
        ),
        (
            r#"{"plans": [{"id": "neg", "product": "X", "hourly": {"instance": "-0.36"}}]}"#,
            "negative",
        ),
        (
            r#"{"resources": [{"id": "r2", "account": "acme", "plan": "pp", "mode": "pay_per_use", "quantity": -1, "created_at": "2024-01-01T00:00:00Z"}]}"#,
            "quantity",
        ),
        (
            r#"{"usage": [{"resource": "d1", "item": "users", "quantity": "-1", "from": "2024-01-01T00:00:00Z", "to": "2024-01-01T01:00:00Z"}]}"#,
            "negative",
        ),
        (
            r#"{"usage": [{"resource": "d1", "item": "users", "quantity": "1", "from": "2024-01-01T01:00:00Z", "to": "2024-01-01T01:00:00Z"}]}"#,
            "must be after from",
        ),
        (
            r#"{"resources": [{"id": "r2", "account": "acme", "plan": "pp", "mode": "pay_per_use", "created_at": "2024-01-01T00:00:00Z", "deleted_at": "2023-12-31T00:00:00Z"}]}"#,
            "deleted_at",
        ),
        (
            r#"{"usage": [{"resource": "d1", "item": "users", "quantity": "1", "from": "2024-01-01T00:00:00", "to": "2024-01-01T01:00:00Z"}]}"#,
            "no UTC offset",
        ),
        (
            r#"{"resources": [{"id": "r2", "account": "acme", "plan": "pp", "mode": "pay_per_use", "created_at": "2024-01-01 00:00:00"}]}"#,
            "created_at",
        ),
        (
            r#"{"topups": [{"account": "acme", "amount": "5.00", "at": "2024-01-01T00:00:00"}]}"#,
            "no UTC offset",
        ),
        (
            r#"{"topups": [{"account": "acme", "amount": "NaN", "at": "2024-01-01T00:00:00Z"}]}"#,
            "not a decimal",
        ),
        (
            r#"{"topups": [{"account": "acme", "amount": 5, "at": "2024-01-01T00:00:00Z"}]}"#,
            "topups[0].amount",
        ),
        (
            r#"{"accounts": [{"id": "big", "balance": "123456789012345678901234567890.00"}]}"#,
            "too large",
        ),
        (
            r#"{"usage": [{"resource": "d1", "item": "gpus", "quantity": "1", "from": "2024-01-01T00:00:00Z", "to": "2024-01-01T01:00:00Z"}]}"#,
            "no hourly price",
        ),
        (
            r#"{"accounts": [{"id": "ok"}], "topups": [{"account": "ok", "amount": "0.00", "at": "2024-01-01T00:00:00Z"}]}"#,
            "positive",
        ),
        ("not json", "doc.json"),
        // hostile values: each names the field and the rule
        (
            r#"{"plans": [{"id": "p30", "product": "X", "hourly": {"instance": "0.123456789012345678901234567890"}}]}"#,
            "has 30 decimal places",
        ),
        (
            r#"{"usage": [{"resource": "d1", "item": "users", "quantity": "1.000000000000000000000000001", "from": "2024-01-01T00:00:00Z", "to": "2024-01-01T01:00:00Z"}]}"#,
            "at most 8 are allowed",
        ),
        (
            r#"{"topups": [{"account": "acme", "amount": "Infinity", "at": "2024-01-01T00:00:00Z"}]}"#,
            "`Infinity` is not a decimal",
        ),
        (
            r#"{"accounts": [{"id": "n", "balance": 10.5}]}"#,
            "accounts[0].balance: invalid type: floating point",
        ),
        (r#"{"accounts": [{"id": "t", "balance": "1e3"}]}"#, "`1e3` is not a decimal"),
        (r#"{"accounts": [{"id": "t", "balance": "0x10"}]}"#, "`0x10` is not a decimal"),
        (r#"{"accounts": [{"id": "t", "balance": "１０.00"}]}"#, "is not a decimal"),
        (r#"{"accounts": [{"id": ""}]}"#, "must be 1 to 128 characters"),
        (r#"{"accounts": [{"id": "t", "balance": "10.00", "grace_days": -1}]}"#, "grace_days"),
        (
            r#"{"resources": [{"id": "r2", "account": "acme", "plan": "pp", "mode": "pay_per_use", "quantity": "2", "created_at": "2024-01-01T00:00:00Z"}]}"#,
            "resources[0].quantity: invalid type: string",
        ),
        (
            r#"{"resources": [{"id": "r2", "account": "acme", "plan": "pp", "mode": "pay_per_use", "quantity": 1000000000000000000000000000000, "created_at": "2024-01-01T00:00:00Z"}]}"#,
            "resources[0].quantity",
        ),
        (
            r#"{"resources": [{"id": "r2", "account": "acme", "plan": "pp", "mode": "pay_per_use", "created_at": "1969-12-31T23:59:59Z"}]}"#,
            "is outside 1970-01-01..2200-01-01",
        ),
        (
            r#"{"resources": [{"id": "r2", "account": "acme", "plan": "pp", "mode": "pay_per_use", "created_at": "9999-01-01T00:00:00Z"}]}"#,
            "is outside 1970-01-01..2200-01-01",
        ),
        (
            r#"{"resources": [{"id": "r2", "account": "acme", "plan": "pp", "mode": "pay_per_use", "created_at": "2024-01-01T00:00:00.5Z"}]}"#,
            "fractional seconds",
        ),
        (
            r#"{"usage": [{"resource": "d1", "item": "users", "quantity": "1", "from": "2024-01-01T00:00:00+25:00", "to": "2024-01-01T01:00:00Z"}]}"#,
            "is not an RFC 3339 instant",
        ),
        (
            r#"{"resources": [{"id": "r2", "account": "acme", "plan": "pp", "mode": "weekly", "created_at": "2024-01-01T00:00:00Z"}]}"#,
            "`weekly` is not pay_per_use, monthly or yearly",
        ),
        (
            r#"{"resources": [{"id": "s9", "account": "acme", "plan": "pp", "mode": "monthly", "periods": 0, "purchased_at": "2024-01-01T00:00:00Z"}]}"#,
            "0 is not between 1 and 120",
        ),
        (
            r#"{"resources": [{"id": "s9", "account": "acme", "plan": "pp", "mode": "monthly", "periods": 100000, "purchased_at": "2024-01-01T00:00:00Z"}]}"#,
            "100000 is not between 1 and 120",
        ),
        (
            r#"{"resources": [{"id": "s9", "account": "acme", "plan": "dr", "mode": "monthly", "purchased_at": "2024-01-01T00:00:00Z"}]}"#,
            "has no monthly price",
        ),
        (
            r#"{"topups": [{"account": "nobody", "amount": "5.00", "at": "2024-01-01T00:00:00Z"}]}"#,
            "unknown account \"nobody\"",
        ),
        ("null", "invalid type: null"),
        (DEEP, "recursion limit exceeded"),
    ];
    on_each_backend(async |be| {
        let b = be.open("UTC").await;
        b.load_json("base.json", base).await.unwrap();
        b.tick(t("2024-01-01T05:00:00Z"), |_, _| {}).await.unwrap();
        let csv_before = csv(&b).await;
        let status_before = serde_json::to_string(&b.status().await.unwrap()).unwrap();
        for (doc, expect) in cases {
            // a valid account first: proves a rejected document loads nothing of itself
            let valid_part = if doc.contains("\"plans\"") {
                r#"{"accounts": [{"id": "extra-acct"}],"#
            } else {
                r#"{"plans": [{"id": "extra-plan", "product": "X"}],"#
            };
            let with_valid_part = doc.replacen('{', valid_part, 1);
            for text in [doc.to_string(), with_valid_part] {
                let err = b.load_json("doc.json", &text).await.expect_err(&text);
                assert_eq!(exit_code(&err), 2, "{}: {text}: {err:#}", be.name);
                assert!(
                    format!("{err:#}").contains(expect),
                    "{}: {text}: message {err:#} should mention {expect}",
                    be.name
                );
            }
        }
        assert_eq!(csv(&b).await, csv_before);
        assert_eq!(
            serde_json::to_string(&b.status().await.unwrap()).unwrap(),
            status_before,
            "{}",
            be.name
        );
        // the first, valid-looking part of a rejected document was not loaded either
        assert!(b
            .load_json(
                "ok.json",
                r#"{"plans": [{"id": "extra-plan", "product": "X"}], "accounts": [{"id": "extra-acct"}]}"#
            )
            .await
            .is_ok());
        let err = b.topup("nobody", "1.00", t("2024-01-01T00:00:00Z")).await.unwrap_err();
        assert_eq!(exit_code(&err), 2);
        let err = b
            .settle_hour(t("2024-01-01T00:30:00Z"), t("2024-01-01T05:00:00Z"), false)
            .await
            .unwrap_err();
        assert_eq!(exit_code(&err), 2, "{err:#}");
        b.db.close().await;
    })
    .await;
}

#[tokio::test]
async fn a_zone_other_than_the_stored_one_is_refused() {
    on_each_backend(async |be| {
        let b = be.open("Asia/Shanghai").await;
        b.db.close().await;
        let cfg = billrun::config::Config {
            timezone: Some(billrun::billing::zone::BillingZone::parse("UTC").unwrap()),
            ..billrun::config::Config::for_url(&be.url)
        };
        let err = billrun::app::Billing::open(&cfg).await.err().expect("refused");
        assert_eq!(exit_code(&err), 2);
        assert!(format!("{err:#}").contains("Asia/Shanghai"));
        let cfg = billrun::config::Config { timezone: None, ..cfg };
        let again = billrun::app::Billing::open(&cfg).await.unwrap();
        assert_eq!(again.zone.name(), "Asia/Shanghai");
        again.db.close().await;
    })
    .await;
}

/// Clock edges: a spring-forward local day bills 23 hours in 23 hourly runs and a fall-back day 25
/// in 25, each hour 3600 s; a `tick` to an instant before the last run changes nothing.
#[tokio::test]
async fn dst_days_bill_23_and_25_hours_and_time_never_runs_backwards() {
    const VM: &str = r#"{
      "accounts": [{"id": "eu", "balance": "1000.00", "currency": "EUR"}],
      "plans": [{"id": "vm", "product": "KooPhone", "hourly": {"instance": "0.36"}}],
      "resources": [
        {"id": "spring", "account": "eu", "plan": "vm", "mode": "pay_per_use",
         "created_at": "2024-03-30T12:00:00+01:00", "deleted_at": "2024-04-01T00:00:00+02:00"},
        {"id": "autumn", "account": "eu", "plan": "vm", "mode": "pay_per_use",
         "created_at": "2024-10-26T12:00:00+02:00", "deleted_at": "2024-10-28T00:00:00+01:00"}]
    }"#;
    on_each_backend(async |be| {
        let b = be.open("Europe/Berlin").await;
        b.load_json("vm.json", VM).await.unwrap();
        b.tick(t("2024-11-01T00:00:00+01:00"), |_, _| {}).await.unwrap();
        let rows = rows(&csv(&b).await);
        let on = |day: &str| -> Vec<&HashMap<String, String>> { rows.iter().filter(|r| r["period_start"].starts_with(day)).collect() };
        // 2024-03-31: 00:00+01:00 .. 01:00+01:00, then 03:00+02:00 .. 23:00+02:00
        let spring = on("2024-03-31");
        assert_eq!(spring.len(), 23, "{}", be.name);
        assert!(spring.iter().all(|r| r["usage_seconds"] == "3600" && r["amount_due"] == "0.36"));
        assert!(spring
            .iter()
            .any(|r| r["period_start"] == "2024-03-31T01:00:00+01:00" && r["period_end"] == "2024-03-31T03:00:00+02:00"));
        // 2024-10-27: 02:00 comes twice, once in summer time and once in winter time
        let autumn = on("2024-10-27");
        assert_eq!(autumn.len(), 25, "{}", be.name);
        assert!(autumn.iter().all(|r| r["usage_seconds"] == "3600"));
        assert!(autumn.iter().any(|r| r["period_start"] == "2024-10-27T02:00:00+02:00"));
        assert!(autumn.iter().any(|r| r["period_start"] == "2024-10-27T02:00:00+01:00"));
        // each hour was posted by its own run, at its own instant
        let times: std::collections::BTreeSet<&str> = autumn.iter().map(|r| r["transaction_time"].as_str()).collect();
        assert_eq!(times.len(), 25, "{}", be.name);
        // time never runs backwards: a tick to an earlier instant does nothing
        let before = csv(&b).await;
        let back = b.tick(t("2024-06-01T00:00:00+02:00"), |_, _| {}).await.unwrap();
        assert_eq!((back.settle_runs, back.daily_runs, back.lines), (0, 0, 0), "{}", be.name);
        assert_eq!(csv(&b).await, before, "{}", be.name);
        let status = b.status().await.unwrap();
        let expected = Decimal::from(1000) - Decimal::new(36, 2) * Decimal::from(rows.len() as i64);
        assert_eq!(status.accounts[0].balance, expected.to_string(), "{}", be.name);
    })
    .await;
}

/// Settlement looks for an hour's segments among those starting at most the longest loaded
/// segment before it: a long segment loaded after short ones is still found in every hour it
/// covers, and so is one loaded late into hours already settled.
#[tokio::test]
async fn long_segments_loaded_after_short_ones_are_billed_in_every_hour() {
    let doc = r#"{"accounts": [{"id": "acme", "balance": "100.00"}],
        "plans": [{"id": "drive", "product": "KooDrive", "hourly": {"storage_gb": "0.36"}}],
        "resources": [{"id": "d1", "account": "acme", "plan": "drive", "mode": "pay_per_use", "created_at": "2024-03-01T00:00:00Z"}],
        "usage": [{"resource": "d1", "item": "storage_gb", "quantity": "1", "from": "2024-03-01T00:00:00Z", "to": "2024-03-01T00:01:00Z"}]}"#;
    on_each_backend(async |be| {
        let b = be.open("UTC").await;
        b.load_json("short.json", doc).await.unwrap();
        b.tick(t("2024-03-01T12:00:00Z"), |_, _| {}).await.unwrap();
        // 30 hours from 02:00, ten of them already settled; and a two-hour one inside them
        let late = r#"{"usage": [{"resource": "d1", "item": "storage_gb", "quantity": "2", "from": "2024-03-01T02:00:00Z", "to": "2024-03-02T08:00:00Z"},
                                 {"resource": "d1", "item": "storage_gb", "quantity": "3", "from": "2024-03-01T20:30:00Z", "to": "2024-03-01T22:30:00Z"}]}"#;
        b.load_json("long.json", late).await.unwrap();
        b.tick(t("2024-03-03T00:00:00Z"), |_, _| {}).await.unwrap();
        let rows = rows(&csv(&b).await);
        let seconds = |q: &str| -> i64 {
            rows.iter()
                .filter(|r| r["quantity"] == q)
                .map(|r| r["usage_seconds"].parse::<i64>().unwrap())
                .sum()
        };
        assert_eq!((seconds("1"), seconds("2"), seconds("3")), (60, 30 * 3600, 2 * 3600), "{}", be.name);
        let hours = rows.iter().filter(|r| r["quantity"] == "2").count();
        assert_eq!(hours, 30, "{}: one line per hour", be.name);
    })
    .await;
}

/// The chunk bucket is one function in Rust (metered ids) and in each database's SQL (chunk
/// ranges, migration 10's indexes): equal on awkward ids, and a chunk's reads search the indexes.
#[tokio::test]
async fn chunk_buckets_agree_in_sql_and_chunks_search_their_indexes() {
    use billrun::billing::settle::chunk_bucket;
    use billrun::store::db::Kind;
    use billrun::store::settle::{bucket_sql, range_sql, ChunkRange};
    let mut ids: Vec<String> = [
        "",
        "a",
        "ab",
        "abc",
        "abcd",
        "acct000123",
        "xacct000123",
        "o'brien",
        "ü",
        "口座-7",
        "a b\nc",
        "\u{1F600}",
        "x\u{10FFFF}\u{10FFFF}\u{10FFFF}\u{10FFFF}",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // and 300 more of one to nine characters, ASCII and not, from a fixed seed
    let alphabet: Vec<char> = "az09-_.' ZÀéß口座\u{1F600}\u{10FFFF}".chars().collect();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..300 {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        let len = (seed >> 60) as usize % 9 + 1;
        ids.push((0..len).map(|i| alphabet[(seed >> (i * 6)) as usize % alphabet.len()]).collect());
    }
    on_each_backend(async |be| {
        let b = be.open("UTC").await;
        let backend = b.db.backend();
        let sql = format!("SELECT {} FROM (SELECT CAST($1 AS TEXT) AS x) t", bucket_sql(backend, "x"));
        for id in &ids {
            let got =
                b.db.rows(sqlx::AssertSqlSafe(sql.clone()), vec![id.as_str().into()], &[Kind::Int])
                    .await
                    .unwrap()[0]
                    .int(0);
            assert_eq!(got, i64::from(chunk_bucket(id)), "{}: bucket of {id:?}", be.name);
        }
        // a middle chunk's reads: the accounts' resources, and the hour's posted lines
        let (lo, hi) = ((7i64, "k".to_string()), (900i64, "m".to_string()));
        let range = ChunkRange::Keys(Some(&lo), Some(&hi));
        let (cond, args) = range_sql(backend, "account_id", range, 1);
        let resources = format!("SELECT account_id FROM resources WHERE (mode = 'pay_per_use' OR ppu_from IS NOT NULL){cond}");
        // the posted lines: the chunk's id range (current ids), and the partial index of
        // metered lines posted before migration 10
        let (lines, hour_args) = billrun::store::ledger::hour_lines_sql(backend, 1_704_880_800, range);
        let mut tx = plan_tx(&b.db).await;
        let id_index = match backend {
            billrun::store::db::Backend::Sqlite => "sqlite_autoindex_ledger_1",
            billrun::store::db::Backend::Postgres => "ledger_transaction_id_key",
        };
        for (query, args, indexes) in [
            (resources, args, vec!["resources_ppu_chunk"]),
            (lines, hour_args, vec![id_index, "ledger_hour_legacy"]),
        ] {
            let plan = query_plan(&mut tx, &query, args).await;
            for index in indexes {
                let searched = match backend {
                    billrun::store::db::Backend::Sqlite => {
                        plan.contains(&format!("SEARCH ledger USING INDEX {index} ("))
                            || plan.contains(&format!("SEARCH resources USING INDEX {index} ("))
                    }
                    billrun::store::db::Backend::Postgres => plan.contains(&format!("Scan using {index} ")) && plan.contains("Index Cond"),
                };
                assert!(searched, "{}: {index} in {query}\n{plan}", be.name);
            }
            assert!(
                !plan.contains("SCAN ledger") && !plan.contains("Seq Scan"),
                "{}: {query}\n{plan}",
                be.name
            );
        }
        tx.rollback().await.unwrap();
        b.db.close().await;
    })
    .await;
}

/// The whole-ledger export walks the time index in the file's order, streamed, whatever the
/// planner's statistics say: on a ledger never analyzed, PostgreSQL left to itself read it by a
/// bitmap and sorted it on disk (checked by hand: 1M lines, 187 MB of temporary files, half the
/// speed). An account's export keeps the planner's choice.
#[tokio::test]
async fn the_export_walks_the_time_index_without_statistics() {
    use billrun::store::db::Backend;
    use billrun::store::ledger::{export_select, pg_export_settings, ExportFilter};
    on_each_backend(async |be| {
        let b = be.open("UTC").await;
        let backend = b.db.backend();
        let whole = ExportFilter {
            from: Some(t("2024-01-01T00:00:00Z")),
            to: None,
            account: None,
        };
        let mut tx = b.db.begin().await.unwrap();
        // a ledger of some size, written and never analyzed (as right after a big hour)
        insert_minute_lines(&mut tx, 20_000).await;
        if backend == Backend::Postgres {
            for set in pg_export_settings(&whole) {
                tx.exec(*set, vec![]).await.unwrap();
            }
        }
        let plan = query_plan(&mut tx, &export_select(&whole), vec![]).await;
        let walks = match backend {
            Backend::Sqlite => plan.contains("USING INDEX ledger_time") && !plan.contains("TEMP B-TREE"),
            Backend::Postgres => plan.contains("Index Scan using ledger_time ") && !plan.contains("Sort"),
        };
        assert!(walks, "{}: the export's plan\n{plan}", be.name);
        tx.rollback().await.unwrap();
        let one = ExportFilter {
            account: Some("acct".into()),
            ..whole
        };
        assert!(pg_export_settings(&one).is_empty(), "an account's export is planned as usual");
        b.db.close().await;
    })
    .await;
}

/// A refund finds the cycles its subscription paid for in their own index (migration 17), never by
/// reading the whole ledger, which settlement grows by a line a resource an hour; and it still
/// refunds exactly, with the ledger full of other lines (some of them the same resource's).
#[tokio::test]
async fn a_refund_searches_the_paid_cycles_not_the_ledger() {
    use billrun::store::db::Backend;
    use billrun::store::subscriptions::PAID_CYCLES_SQL;
    let doc = r#"{
      "accounts": [{"id": "acme", "balance": "100.00"}],
      "plans": [{"id": "vm", "product": "KooPhone", "hourly": {"instance": "0.36"}, "monthly": "9.90"}],
      "resources": [{"id": "s1", "account": "acme", "plan": "vm", "mode": "monthly", "purchased_at": "2024-01-01T00:00:00Z"}]
    }"#;
    on_each_backend(async |be| {
        let b = be.open("UTC").await;
        b.load_json("refund.json", doc).await.unwrap();
        b.renew("s1", 1, t("2024-01-05T00:00:00Z")).await.unwrap();
        // a ledger of some size, never analyzed, with usage lines of s1 among them
        let mut tx = b.db.begin().await.unwrap();
        insert_minute_lines(&mut tx, 20_000).await;
        tx.exec(
            "UPDATE ledger SET resource_id = 's1' WHERE transaction_id IN ('tx_7', 'tx_70')",
            vec![],
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();

        let mut tx = plan_tx(&b.db).await;
        let plan = query_plan(&mut tx, PAID_CYCLES_SQL, vec!["s1".into()]).await;
        let searched = match b.db.backend() {
            Backend::Sqlite => {
                plan.contains("SEARCH ledger USING INDEX ledger_paid_cycles (resource_id=?)") && !plan.contains("TEMP B-TREE")
            }
            Backend::Postgres => plan.contains("Scan using ledger_paid_cycles on ledger") && !plan.contains("Sort"),
        };
        assert!(searched, "{}: the paid cycles' plan\n{plan}", be.name);
        assert!(!plan.contains("SCAN ledger") && !plan.contains("Seq Scan"), "{}\n{plan}", be.name);
        tx.rollback().await.unwrap();

        // 12 whole days of the current cycle used (9.90 / 30 x 12 = 3.96), the renewed cycle
        // not begun: 9.90 - 3.96 + 9.90
        let refund = b.unsubscribe("s1", t("2024-01-13T00:00:00Z")).await.unwrap().expect("a refund");
        assert_eq!(refund.amount_due, dec("-15.84"), "{}", be.name);
        assert_eq!(
            (refund.period_start, refund.period_end),
            (t("2024-01-13T00:00:00Z"), t("2024-03-02T00:00:00Z")),
            "{}: from the unsubscription to the end of the renewed cycle",
            be.name
        );
        b.db.close().await;
    })
    .await;
}

/// Whether a span of settle runs has anything to settle (tried for every catch-up of two runs or
/// more) is answered from indexes, never by reading the ledger; and a line posted for one of its
/// hours (by `settle --hour` ahead of the schedule, say), with a current or an older id, makes
/// the span busy, so the runs reconcile it; lines of the hours around it do not.
#[tokio::test]
async fn a_quiet_span_is_checked_in_indexes_and_its_posted_lines_make_it_busy() {
    use billrun::billing::settle::metered_transaction_id;
    use billrun::store::db::{Backend, Kind};
    use billrun::store::settle::{record_empty_runs, span_busy_sql};
    let h = t("2024-03-01T00:00:00Z");
    // four hourly runs, each settling the hour two hours before it
    let runs: Vec<(i64, Vec<i64>)> = (0..4).map(|i| (h + (i + 2) * 3600, vec![h + i * 3600])).collect();
    let line = |id: &str, hour: i64| hour_line_sql(id, &format!("k{id}"), 0, hour);
    on_each_backend(async |be| {
        let b = be.open("UTC").await;
        let mut tx = plan_tx(&b.db).await;
        insert_minute_lines(&mut tx, 20_000).await;
        let (sql, args) = span_busy_sql(h, h + 3 * 3600, h + 4 * 3600, 3600);
        let plan = query_plan(&mut tx, &sql, args).await;
        let searched = match b.db.backend() {
            Backend::Sqlite => {
                plan.contains("SEARCH ledger USING INDEX sqlite_autoindex_ledger_1 (transaction_id>? AND transaction_id<?)")
                    && plan.contains("SEARCH ledger USING INDEX ledger_hour_legacy (hour_start>? AND hour_start<?)")
            }
            Backend::Postgres => {
                plan.contains("using ledger_transaction_id_key on ledger") && plan.contains("using ledger_hour_legacy on ledger")
            }
        };
        assert!(searched, "{}: the span check's plan\n{plan}", be.name);
        assert!(
            !plan.contains("SCAN ledger") && !plan.contains("Seq Scan on ledger"),
            "{}\n{plan}",
            be.name
        );
        tx.rollback().await.unwrap();

        let current = metered_transaction_id(h + 3600, 7, "k", 0);
        let older = format!("tx_{:0>24}", "legacy");
        for (id, hour) in [(current.as_str(), h + 3600), (older.as_str(), h + 2 * 3600)] {
            b.db.exec(sqlx::AssertSqlSafe(line(id, hour)), vec![]).await.unwrap();
            assert!(
                !record_empty_runs(&b.db, &b.zone, &runs).await.unwrap(),
                "{}: {id} makes it busy",
                be.name
            );
            b.db.exec(
                sqlx::AssertSqlSafe(format!("DELETE FROM ledger WHERE transaction_id = '{id}'")),
                vec![],
            )
            .await
            .unwrap();
        }
        let runs_recorded = async || {
            b.db.rows("SELECT COUNT(*) FROM job_runs WHERE job = 'settle'", vec![], &[Kind::Int])
                .await
                .unwrap()[0]
                .int(0)
        };
        assert_eq!(runs_recorded().await, 0, "{}", be.name);
        for (id, hour) in [
            (metered_transaction_id(h - 3600, 7, "k", 0), h - 3600),
            (metered_transaction_id(h + 4 * 3600, 7, "k", 0), h + 4 * 3600),
        ] {
            b.db.exec(sqlx::AssertSqlSafe(line(&id, hour)), vec![]).await.unwrap();
        }
        assert!(
            record_empty_runs(&b.db, &b.zone, &runs).await.unwrap(),
            "{}: quiet between its neighbours",
            be.name
        );
        assert_eq!(runs_recorded().await, 4, "{}", be.name);
        b.db.close().await;
    })
    .await;
}

/// The jobs' state reads (run before every step: several times for each run of a catch-up) find
/// the last run done as the first entry of the index of runs done (migration 12), however long
/// the history and whatever the statistics: before it, PostgreSQL read every run of the job on a
/// table never analyzed (a bitmap scan; an empty year of catch-up spent 2 of its 5 s there). And
/// the answer is the last run done however many newer runs are not done.
#[tokio::test]
async fn the_last_run_done_is_read_from_the_newest_runs() {
    use billrun::jobs::{daily, settle};
    use billrun::store::db::Backend;
    on_each_backend(async |be| {
        let b = be.open("UTC").await;
        let backend = b.db.backend();
        let h0 = t("2024-01-01T00:00:00Z");
        let mut tx = b.db.begin().await.unwrap();
        // a few months of hourly runs done, never analyzed
        insert_runs(&mut tx, "settle", h0, 3_000, 3_600, "ok").await;
        let plan = query_plan(&mut tx, settle::STATE_SQL, vec!["settle".into()]).await;
        let from_newest = match backend {
            Backend::Sqlite => plan.contains("SEARCH job_runs USING COVERING INDEX job_runs_done (job=?)") && !plan.contains("TEMP B-TREE"),
            Backend::Postgres => plan.contains("Index Only Scan Backward using job_runs_done on job_runs"),
        };
        assert!(from_newest, "{}: the settle state's plan\n{plan}", be.name);
        tx.commit().await.unwrap();
        let last_done = h0 + 2_999 * 3_600;
        let last_run = async || settle::state(&b.db).await.unwrap().last_run;
        assert_eq!(last_run().await, Some(last_done), "{}", be.name);

        // newer runs not done: the one being claimed, then more than the newest few read first
        let mut tx = b.db.begin().await.unwrap();
        insert_runs(&mut tx, "settle", last_done + 3_600, 1, 3_600, "running").await;
        tx.commit().await.unwrap();
        assert_eq!(last_run().await, Some(last_done), "{}: one run claimed", be.name);
        let mut tx = b.db.begin().await.unwrap();
        for (i, outcome) in ["running", "chunked", "failed"].into_iter().enumerate() {
            insert_runs(&mut tx, "settle", last_done + (2 + 4 * i as i64) * 3_600, 4, 3_600, outcome).await;
        }
        tx.commit().await.unwrap();
        assert_eq!(last_run().await, Some(last_done), "{}: 13 newer runs not done", be.name);
        let mut tx = b.db.begin().await.unwrap();
        insert_runs(&mut tx, "settle", last_done + 20 * 3_600, 1, 3_600, "ok").await;
        // the daily job's own runs: done through the 5th, the 6th's and later ones being claimed
        let d0 = t("2024-01-05T00:03:00Z");
        insert_runs(&mut tx, "daily", d0 - 4 * 86_400, 5, 86_400, "ok").await;
        insert_runs(&mut tx, "daily", d0 + 86_400, 10, 86_400, "running").await;
        let plan = query_plan(&mut tx, daily::NEXT_DUE_SQL, vec!["daily".into()]).await;
        assert!(plan.contains("job_runs_done"), "{}: the daily state's plan\n{plan}", be.name);
        tx.commit().await.unwrap();
        assert_eq!(last_run().await, Some(last_done + 20 * 3_600), "{}", be.name);
        let cron = billrun::jobs::cron::CronSchedule::default_daily();
        assert_eq!(
            daily::next_due(&b.db, &b.zone, &cron).await.unwrap(),
            Some(d0 + 86_400),
            "{}: the daily run after the last one done",
            be.name
        );
        b.db.close().await;
    })
    .await;
}

/// Before the first settle run the job's state holds the earliest pay-per-use usage: a resource's
/// creation, or its switch to pay-per-use (`ppu_from`), never a prepaid resource's creation. It is
/// the first entry of its own index (migration 16): before it, every pay-per-use resource was read
/// for it, about 0.3 s of every first tick at 1M resources.
#[tokio::test]
async fn the_earliest_usage_is_the_first_entry_of_its_index() {
    use billrun::jobs::settle;
    use billrun::store::db::Backend;
    let doc = r#"{
      "accounts": [{"id": "acme", "balance": "500.00"}],
      "plans": [{"id": "vm", "product": "KooPhone", "hourly": {"instance": "0.36"}, "monthly": "9.90"}],
      "resources": [
        {"id": "late", "account": "acme", "plan": "vm", "mode": "pay_per_use", "created_at": "2024-01-05T10:00:00Z"},
        {"id": "sub", "account": "acme", "plan": "vm", "mode": "monthly", "purchased_at": "2023-12-20T08:00:00Z"}
      ]
    }"#;
    on_each_backend(async |be| {
        let b = be.open("UTC").await;
        b.load_json("earliest.json", doc).await.unwrap();
        let mut tx = plan_tx(&b.db).await;
        let plan = query_plan(&mut tx, settle::STATE_SQL, vec!["settle".into()]).await;
        let indexed = match b.db.backend() {
            Backend::Sqlite => plan.contains("SEARCH resources USING INDEX resources_ppu_start"),
            Backend::Postgres => plan.contains("using resources_ppu_start on resources"),
        };
        assert!(indexed, "{}: the settle state's plan\n{plan}", be.name);
        tx.rollback().await.unwrap();
        let earliest = async || settle::state(&b.db).await.unwrap().earliest_usage;
        assert_eq!(
            earliest().await,
            Some(t("2024-01-05T10:00:00Z")),
            "{}: the prepaid creation does not count",
            be.name
        );
        b.to_ppu("sub", true, t("2024-01-03T06:30:00Z")).await.unwrap();
        assert_eq!(
            earliest().await,
            Some(t("2024-01-03T06:30:00Z")),
            "{}: the switch to pay-per-use counts",
            be.name
        );
        b.db.close().await;
    })
    .await;
}

/// Many rows a statement, on both backends (SQLite: `VALUES` lists of 1,000 rows; PostgreSQL: one
/// array a column, `UNNEST`ed 5,000 rows at a time): every row is written once with its NULLs,
/// awkward texts and amounts to the last digit, a conflict clause applies row by row, the
/// `WITH v AS (VALUES ..) UPDATE` form updates exactly its rows, and on PostgreSQL (one array a
/// column, of one type) a column whose values change kind is refused rather than bound as another.
#[tokio::test]
async fn multi_row_writes_keep_every_row_and_value() {
    use billrun::store::db::{Backend, Kind, Val};
    on_each_backend(async |be| {
        let b = be.open("UTC").await;
        let amount_type = match b.db.backend() {
            Backend::Sqlite => "TEXT",
            Backend::Postgres => "NUMERIC",
        };
        b.db.exec(
            sqlx::AssertSqlSafe(format!(
                "CREATE TABLE t (id TEXT PRIMARY KEY, n BIGINT, amount {amount_type}, note TEXT)"
            )),
            vec![],
        )
        .await
        .unwrap();
        let n = 10_503;
        let row = |i: usize| -> Vec<Val> {
            let amount = (!i.is_multiple_of(7)).then(|| Decimal::new(i as i64 * 101 - 500_000, 8));
            let note = (!i.is_multiple_of(3)).then(|| format!("a'\\N口,\"{i}\"\r\n\t"));
            vec![
                format!("r{i:05}").into(),
                Val::Int((!i.is_multiple_of(5)).then_some(i as i64 - 7_000)),
                Val::Money(amount),
                Val::Text(note),
            ]
        };
        let cols = ["id", "n", "amount", "note"];
        let mut tx = b.db.begin().await.unwrap();
        let wrote = tx.insert_rows("t", &cols, (0..n).map(row).collect(), "").await.unwrap();
        assert_eq!(wrote, n as u64, "{}", be.name);
        // again, with two new ones: only those are written
        let again = tx
            .insert_rows("t", &cols, (0..n + 2).map(row).collect(), "ON CONFLICT (id) DO NOTHING")
            .await
            .unwrap();
        assert_eq!(again, 2, "{}", be.name);
        let updated = tx
            .values_statements(
                "WITH v(id, n) AS (VALUES ",
                2,
                (0..n)
                    .step_by(2)
                    .map(|i| vec![format!("r{i:05}").into(), Val::Int(Some(-1))])
                    .collect(),
                ") UPDATE t SET n = v.n FROM v WHERE t.id = v.id",
            )
            .await
            .unwrap();
        assert_eq!(updated, n.div_ceil(2) as u64, "{}", be.name);
        tx.commit().await.unwrap();
        let rows =
            b.db.rows(
                "SELECT id, n, amount, note FROM t ORDER BY id",
                vec![],
                &[Kind::Text, Kind::Int, Kind::Money, Kind::Text],
            )
            .await
            .unwrap();
        assert_eq!(rows.len(), n + 2, "{}", be.name);
        for (i, r) in rows.iter().enumerate() {
            let mut want = row(i);
            if i % 2 == 0 && i < n {
                want[1] = Val::Int(Some(-1));
            }
            assert_eq!(r.0, want, "{}: row {i}", be.name);
        }
        if b.db.backend() == Backend::Postgres {
            let mut tx = b.db.begin().await.unwrap();
            let mixed = vec![vec![Val::from("x1"), Val::Int(Some(1))], vec![Val::from("x2"), Val::from("2")]];
            let refused = tx.insert_rows("t", &["id", "n"], mixed, "").await;
            assert!(refused.is_err(), "a column of integers then a text was written");
            tx.rollback().await.unwrap();
        }
        b.db.close().await;
    })
    .await;
}

/// `n` runs of `job`, `step` seconds apart from `from`, with the given outcome.
async fn insert_runs(tx: &mut billrun::store::db::Tx, job: &str, from: i64, n: i64, step: i64, outcome: &str) {
    let rows = (0..n).map(|i| vec![job.into(), (from + i * step).into(), outcome.into()]).collect();
    tx.insert_rows("job_runs", &["job", "scheduled_at", "outcome"], rows, "")
        .await
        .unwrap();
}

/// An INSERT of one usage line of billing hour `hour` straight into the ledger (0.36 for the hour,
/// 0.06 of it in arrears), posted at the hour's start.
fn hour_line_sql(id: &str, key: &str, revision: i64, hour: i64) -> String {
    format!(
        "INSERT INTO ledger (transaction_id, transaction_time, account_id, resource_id, product, plan_id, billing_mode, \
         transaction_type, billing_item, period_start, period_end, usage_seconds, quantity, unit_price, list_amount, \
         truncated_amount, amount_due, paid_amount, arrears_amount, balance_after, currency, hour_start, line_key, revision, \
         run_job, run_at, explain) VALUES ('{id}', {hour}, 'a', 'r', 'KooPhone', 'p', 'pay_per_use', 'usage', 'instance', \
         {hour}, {hour} + 3600, 3600, 1, 0.36, 0.36000000, 0.00000000, 0.36, 0.30, 0.06, -0.06, 'CNY', {hour}, '{key}', {revision}, \
         'settle', {hour}, '{{}}')"
    )
}

/// Writes `n` one-minute usage lines straight into the ledger: `tx_<i>` at 2024-01-01 + i minutes,
/// over 97 accounts.
async fn insert_minute_lines(tx: &mut billrun::store::db::Tx, n: i64) {
    use billrun::store::db::Backend;
    let numbers = match tx.backend() {
        Backend::Sqlite => format!("WITH RECURSIVE g(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM g WHERE i < {n}) SELECT i FROM g"),
        Backend::Postgres => format!("SELECT i FROM generate_series(1, {n}) AS g(i)"),
    };
    tx.exec(
        sqlx::AssertSqlSafe(format!(
            "INSERT INTO ledger (transaction_id, transaction_time, account_id, resource_id, product, plan_id, billing_mode, \
             transaction_type, billing_item, period_start, period_end, usage_seconds, quantity, unit_price, list_amount, \
             truncated_amount, amount_due, paid_amount, arrears_amount, balance_after, currency, line_key, revision, run_job, \
             run_at, explain) \
             SELECT 'tx_' || i, 1704067200 + i * 60, 'a' || (i % 97), 'r' || i, 'ecs', 'p', 'pay_per_use', 'usage', 'instance', \
             0, 60, 60, 1, 0.36, 0.006, 0.006, 0, 0, 0, 10.00, 'USD', 'k' || i, 1, 'settle', 0, '{{}}' FROM ({numbers}) AS n"
        )),
        vec![],
    )
    .await
    .unwrap();
}

/// An export many times larger than what its reader hands over at once (PostgreSQL's COPY
/// buffers, SQLite's row batches) has every line once, whole, in order.
#[tokio::test]
async fn a_large_export_has_every_line_once_in_order() {
    on_each_backend(async |be| {
        let b = be.open("UTC").await;
        let mut tx = b.db.begin().await.unwrap();
        insert_minute_lines(&mut tx, 30_000).await;
        tx.commit().await.unwrap();
        // a reader that handed a row over more than once could run for hours: fail instead
        let text = tokio::time::timeout(std::time::Duration::from_secs(60), csv(&b))
            .await
            .unwrap_or_else(|_| panic!("{}: the export of 30,000 lines took over 60 s", be.name));
        assert!(text.len() > 4_000_000, "{}: {} bytes", be.name, text.len());
        let lines: Vec<&str> = text.split_terminator("\r\n").collect();
        assert_eq!(lines.len(), 30_001, "{}", be.name);
        for (i, line) in lines[1..].iter().enumerate() {
            let i = i as i64 + 1;
            let at = b.zone.format(1704067200 + i * 60);
            let expected = format!(
                "tx_{i},{at},a{},r{i},ecs,p,pay_per_use,usage,instance,1970-01-01T00:00:00Z,1970-01-01T00:01:00Z,60,1,0.36,\
                 0.006,0.006,0.00,0.00,0.00,10.00,USD",
                i % 97
            );
            assert_eq!(*line, expected, "{}: line {i}", be.name);
        }
        b.db.close().await;
    })
    .await;
}

/// A run's chunks start at every `chunk_resources`-th pay-per-use resource in (bucket, account)
/// order, the same on both backends (SQLite numbers its walk of the chunk index in Rust,
/// PostgreSQL with a window function): accounts with several resources, prepaid resources not
/// counted, a boundary falling inside an account repeated once only.
#[tokio::test]
async fn chunks_start_at_every_nth_pay_per_use_resource_in_bucket_order() {
    use billrun::billing::settle::chunk_bucket;
    use billrun::store::db::Kind;
    let accounts: Vec<String> = (0..9)
        .map(|i| format!("acct-{}", ["z", "b", "a9", "0", "y7", "Q", "m", "口", "k"][i]))
        .collect();
    let mut resources = Vec::new();
    let mut ppu: Vec<(i64, String)> = Vec::new();
    for (i, a) in accounts.iter().enumerate() {
        for j in 0..=(i % 4) {
            resources.push(format!(
                r#"{{"id": "r{i}-{j}", "account": "{a}", "plan": "p", "mode": "pay_per_use", "created_at": "2023-04-18T00:00:00Z"}}"#
            ));
            ppu.push((i64::from(chunk_bucket(a)), a.clone()));
        }
        resources.push(format!(
            r#"{{"id": "m{i}", "account": "{a}", "plan": "p", "mode": "monthly", "periods": 1, "purchased_at": "2023-04-18T00:00:00Z"}}"#
        ));
    }
    let doc = format!(
        r#"{{"accounts": [{}], "plans": [{{"id": "p", "product": "ecs", "hourly": {{"instance": "0.36"}}, "monthly": "30.00"}}],
            "resources": [{}]}}"#,
        accounts
            .iter()
            .map(|a| format!(r#"{{"id": "{a}", "balance": "1000.00", "currency": "USD"}}"#))
            .collect::<Vec<_>>()
            .join(", "),
        resources.join(", ")
    );
    ppu.sort();
    on_each_backend(async |be| {
        for every in [1usize, 3, 4, 100] {
            let world = common::fresh(be.name).await;
            let mut b = world.open("UTC").await;
            b.settle.chunk_resources = Some(every);
            b.load_json("chunks.json", &doc).await.unwrap();
            b.tick(t("2023-04-18T02:00:00Z"), |_, _| {}).await.unwrap();
            // each chunk's row records its range [keys[k-1], keys[k]) when done
            let ranges: Vec<serde_json::Value> =
                b.db.rows(
                    "SELECT detail FROM job_runs WHERE job LIKE 'settle#%' AND scheduled_at = $1 ORDER BY job",
                    vec![t("2023-04-18T02:00:00Z").into()],
                    &[Kind::Text],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| serde_json::from_str(&r.text(0)).unwrap())
                .collect();
            let mut want: Vec<(i64, String)> = ppu.iter().skip(every - 1).step_by(every).cloned().collect();
            want.dedup();
            let got: Vec<(i64, String)> = ranges
                .iter()
                .filter_map(|r| serde_json::from_value(r["keys"][1].clone()).ok())
                .collect();
            assert_eq!(got, want, "{}: every {every}: {ranges:?}", be.name);
            assert_eq!(ranges.len(), want.len() + 1, "{}: every {every}", be.name);
            assert_eq!(ppu.len(), 21);
            b.db.close().await;
        }
    })
    .await;
}

/// A run planned by a build before migration 10 (account-id chunk bounds) is finished as it was
/// planned, and bills what a run planned now bills, ids included.
#[tokio::test]
async fn a_run_planned_by_an_older_build_is_finished_as_planned() {
    use billrun::store::db::Kind;
    on_each_backend(async |be| {
        // now: chunks of one resource, so three chunks by (bucket, account)
        let mut now = be.open("UTC").await;
        now.settle.chunk_resources = Some(1);
        now.load_json("day.json", DAY).await.unwrap();
        now.tick(t("2023-04-18T04:00:00Z"), |_, _| {}).await.unwrap();
        let chunks = "SELECT job, detail FROM job_runs WHERE job LIKE 'settle#%' AND scheduled_at = $1 ORDER BY job";
        let at = t("2023-04-18T04:00:00Z");
        let rows = now.db.rows(chunks, vec![at.into()], &[Kind::Text, Kind::Text]).await.unwrap();
        assert_eq!(rows.len(), 3, "{}", be.name);
        assert!(
            rows.iter().all(|r| r.text(1).contains("\"keys\"")),
            "{}: {:?}",
            be.name,
            rows[0].text(1)
        );
        let expected = csv(&now).await;
        now.db.close().await;

        let old = common::fresh(be.name).await;
        let b = old.open("UTC").await;
        b.load_json("day.json", DAY).await.unwrap();
        b.tick(t("2023-04-18T03:00:00Z"), |_, _| {}).await.unwrap();
        // the 04:00 run as an older build leaves it when it stops right after planning: open to
        // every runner, two chunks split at account "b" (acme | zeta), none done
        let hour = t("2023-04-18T02:00:00Z");
        let plan = format!(r#"{{"hours":[{hour}],"run_hours":[{hour}],"dirty":[],"bounds":["b"]}}"#);
        b.db.exec(
            "INSERT INTO job_runs (job, scheduled_at, outcome, detail, attempt, started_at) VALUES ('settle', $1, 'chunked', $2, 1, 0)",
            vec![at.into(), plan.into()],
        )
        .await
        .unwrap();
        let done = b.tick(at, |_, _| {}).await.unwrap();
        assert_eq!(done.settle_runs, 1, "{}", be.name);
        let rows = b.db.rows(chunks, vec![at.into()], &[Kind::Text, Kind::Text]).await.unwrap();
        let details: Vec<String> = rows.iter().map(|r| r.text(1)).collect();
        assert_eq!(details.len(), 2, "{}: {details:?}", be.name);
        assert!(
            details[0].contains(r#""accounts":[null,"b"]"#) && details[1].contains(r#""accounts":["b",null]"#),
            "{}: {details:?}",
            be.name
        );
        assert_eq!(csv(&b).await, expected, "{}: same lines, same ids", be.name);
        b.db.close().await;
    })
    .await;
}

/// A chunk reads its posted lines of an hour by the range of ids its buckets span (migration 14).
/// Accounts at every awkward bucket (the first and last, either side of a hex digit's carry), each
/// its own chunk so that every range edge is one of them, and one account whose line has an id of
/// the form posted before migration 10: a correction of every account's usage finds each posted
/// line and posts only the difference, never a second full line.
#[tokio::test]
async fn a_correction_finds_lines_at_every_bucket_edge_and_of_older_ids() {
    use billrun::billing::settle::chunk_bucket;
    let alnum: Vec<char> = ('0'..='9').chain('a'..='z').chain('A'..='Z').collect();
    // the `nth` account id of the form xABCD with the bucket
    let account_with_bucket = |bucket: u16, nth: usize| -> String {
        let mut seen = 0;
        for &a in &alnum {
            for &b in &alnum {
                for &c in &alnum {
                    for &d in &alnum {
                        let id: String = ['x', a, b, c, d].iter().collect();
                        if chunk_bucket(&id) == bucket {
                            if seen == nth {
                                return id;
                            }
                            seen += 1;
                        }
                    }
                }
            }
        }
        panic!("no account id with bucket {bucket:#x}")
    };
    // two accounts share bucket 0x0100 and two 0xffff: a chunk boundary inside a bucket
    let accounts: Vec<String> = [
        (0x0000, 0),
        (0x0001, 0),
        (0x00ff, 0),
        (0x0100, 0),
        (0x0100, 1),
        (0x0fff, 0),
        (0x1000, 0),
        (0x7f3a, 0),
        (0xfffe, 0),
        (0xffff, 0),
        (0xffff, 1),
    ]
    .into_iter()
    .map(|(bucket, nth)| account_with_bucket(bucket, nth))
    .collect();
    let list = |f: &dyn Fn(usize, &String) -> String| accounts.iter().enumerate().map(|(i, a)| f(i, a)).collect::<Vec<_>>().join(", ");
    let usage = |to: &str| {
        list(&|i, _| {
            format!(r#"{{"resource": "d{i}", "item": "storage_gb", "quantity": "1000", "from": "2024-02-01T10:00:00Z", "to": "{to}"}}"#)
        })
    };
    let world = format!(
        r#"{{"accounts": [{}], "plans": [{{"id": "drive", "product": "KooDrive", "hourly": {{"storage_gb": "0.0001"}}}}],
          "resources": [{}], "usage": [{}]}}"#,
        list(&|_, a| format!(r#"{{"id": "{a}", "balance": "50.00"}}"#)),
        list(&|i, a| format!(
            r#"{{"id": "d{i}", "account": "{a}", "plan": "drive", "mode": "pay_per_use", "created_at": "2024-02-01T00:00:00Z"}}"#
        )),
        usage("2024-02-01T10:39:45Z"),
    );
    let correction = format!(r#"{{"usage": [{}]}}"#, usage("2024-02-01T10:59:59Z"));
    on_each_backend(async |be| {
        let mut b = be.open("UTC").await;
        b.settle.chunk_resources = Some(1);
        b.load_json("drive.json", &world).await.unwrap();
        b.tick(t("2024-02-01T12:00:00Z"), |_, _| {}).await.unwrap();
        let first = rows(&csv(&b).await);
        let hour_lines = |all: &[std::collections::HashMap<String, String>], a: &str| -> Vec<String> {
            all.iter()
                .filter(|r| r["account_id"] == a && r["period_start"] == "2024-02-01T10:00:00Z")
                .map(|r| format!("{} {}", r["transaction_type"], r["amount_due"]))
                .collect()
        };
        for a in &accounts {
            assert_eq!(hour_lines(&first, a), ["usage 0.06"], "{}: {a}", be.name);
        }
        // the line of bucket 0x0100's account as a build before migration 10 posted it
        let old = "UPDATE ledger SET transaction_id = 'tx_' || substr(transaction_id, 8) WHERE account_id = $1";
        assert_eq!(
            b.db.exec(old, vec![accounts[3].as_str().into()]).await.unwrap(),
            1,
            "{}: its line",
            be.name
        );
        let s = b.load_json("fix.json", &correction).await.unwrap();
        assert_eq!(s.hours_marked_for_resettlement, 1, "{}", be.name);
        let fixed = b
            .settle_hour(t("2024-02-01T10:00:00Z"), t("2024-02-01T12:45:00Z"), false)
            .await
            .unwrap();
        assert_eq!(fixed.lines, accounts.len(), "{}", be.name);
        assert!(fixed.chunks_total >= accounts.len(), "{}: {} chunks", be.name, fixed.chunks_total);
        let after = rows(&csv(&b).await);
        for a in &accounts {
            // corrected 3599 s -> 0.09997222 (due 0.09): the posted 0.06 and an adjustment of 0.03
            assert_eq!(hour_lines(&after, a), ["usage 0.06", "adjustment 0.03"], "{}: {a}", be.name);
        }
        let again = b
            .settle_hour(t("2024-02-01T10:00:00Z"), t("2024-02-01T13:00:00Z"), false)
            .await
            .unwrap();
        assert_eq!(again.lines, 0, "{}", be.name);
        b.db.close().await;
    })
    .await;
}
