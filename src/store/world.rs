//! Accounts, plans, resources, usage and top-ups: loading fixture documents and reading them back.

use super::db::{Db, Kind, Row, Tx, Val};
use crate::billing::model::{Account, BillingMode, MeteredResource, Plan};
use crate::billing::prepaid::{months_of, Subscription};
use crate::billing::settle::{AccountBook, ArrearsEvent, INSTANCE_ITEM};
use crate::billing::zone::{split_by_hour, BillingZone};
use crate::error::InputError;
use crate::fixture::{self, Batch, Document, Known, KnownResource, NewSubscription};
use crate::store::packages;
use crate::store::subscriptions::post_purchase;
use anyhow::{Context, Result};
use rust_decimal::Decimal;
use std::collections::{BTreeSet, HashSet};

/// The meta row holding the longest usage segment ever loaded, in seconds: settlement looks for
/// the segments of an hour among those that start at most this long before it, on the index.
pub(crate) const SEGMENT_SPAN: &str = "longest_segment_seconds";

/// Raises the longest segment span to at least `seconds`, atomically (concurrent loads on
/// PostgreSQL each keep the larger value).
async fn widen_segment_span(tx: &mut Tx, seconds: i64) -> Result<()> {
    let sql = if tx.backend() == super::db::Backend::Postgres {
        "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE \
         SET value = GREATEST(meta.value::BIGINT, EXCLUDED.value::BIGINT)::TEXT"
    } else {
        "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE \
         SET value = CAST(max(CAST(meta.value AS INTEGER), CAST(excluded.value AS INTEGER)) AS TEXT)"
    };
    tx.exec(sql, vec![SEGMENT_SPAN.into(), seconds.to_string().into()]).await?;
    Ok(())
}

/// The longest usage segment loaded so far, in seconds. Without the row (which the migration and
/// every load write) no bound is assumed.
pub(crate) async fn segment_span(tx: &mut Tx) -> Result<i64> {
    let row = tx
        .rows("SELECT value FROM meta WHERE key = $1", vec![SEGMENT_SPAN.into()], &[Kind::Text])
        .await?;
    Ok(match row.first() {
        Some(r) => r.text(0).parse().context("stored longest_segment_seconds")?,
        None => i64::MAX / 4,
    })
}

pub const SETTLE_JOB: &str = "settle";

pub(crate) const ACCOUNT_KINDS: &[Kind] = &[Kind::Text, Kind::Text, Kind::Money, Kind::Int, Kind::Int, Kind::Int];

pub(crate) fn account_of(r: &Row) -> Account {
    Account {
        id: r.text(0),
        currency: r.text(1),
        balance: r.money(2),
        in_arrears_since: r.opt_int(3),
        grace_days: r.int(4),
        retention_days: r.int(5),
    }
}

pub(crate) fn resource_of(r: &Row) -> MeteredResource {
    MeteredResource {
        id: r.text(0),
        account_id: r.text(1),
        plan_id: r.text(2),
        quantity: r.int(3),
        created_at: r.int(4),
        deleted_at: r.opt_int(5),
    }
}

pub(crate) fn plan_of(r: &Row) -> Result<Plan> {
    serde_json::from_str(&r.text(0)).context("stored plan document")
}

/// Every plan, by id (plans are few).
pub(crate) async fn all_plans(tx: &mut Tx) -> Result<std::collections::HashMap<String, Plan>> {
    tx.rows("SELECT doc FROM plans", vec![], &[Kind::Text])
        .await?
        .iter()
        .map(|r| plan_of(r).map(|p| (p.id.clone(), p)))
        .collect()
}

/// Summary of one `load`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadSummary {
    pub accounts: usize,
    pub plans: usize,
    /// Resources inserted, packages included.
    pub resources: usize,
    pub packages: usize,
    pub usage: usize,
    pub topups: usize,
    pub purchases: usize,
    pub corrected_readings: usize,
    pub hours_marked_for_resettlement: usize,
}

async fn known_for(tx: &mut Tx, doc: &Document, known: &mut Known) -> Result<()> {
    let (accounts, plans, resources) = fixture::referenced_ids(doc);
    let accounts: Vec<String> = accounts.into_iter().filter(|id| !known.accounts.contains(id)).collect();
    for r in tx
        .rows_in("SELECT id FROM accounts WHERE id IN", &accounts, "", &[Kind::Text])
        .await?
    {
        known.accounts.insert(r.text(0));
    }
    let resources: Vec<String> = resources.into_iter().filter(|id| !known.resources.contains_key(id)).collect();
    let rows = tx
        .rows_in(
            "SELECT id, account_id, plan_id, mode, created_at, deleted_at FROM resources WHERE id IN",
            &resources,
            "",
            &[Kind::Text, Kind::Text, Kind::Text, Kind::Text, Kind::Int, Kind::Int],
        )
        .await?;
    for r in rows {
        let mode = BillingMode::parse(&r.text(3)).context("stored resource mode")?;
        known.resources.insert(
            r.text(0),
            KnownResource {
                account_id: r.text(1),
                plan_id: r.text(2),
                mode,
                created_at: r.int(4),
                deleted_at: r.opt_int(5),
            },
        );
    }
    // plans named by the document and plans of the resources it refers to
    let mut plans: Vec<String> = plans
        .into_iter()
        .chain(known.resources.values().map(|r| r.plan_id.clone()))
        .collect();
    plans.sort();
    plans.dedup();
    plans.retain(|id| !known.plans.contains_key(id));
    for r in tx.rows_in("SELECT doc FROM plans WHERE id IN", &plans, "", &[Kind::Text]).await? {
        let plan = plan_of(&r)?;
        known.plans.insert(plan.id.clone(), plan);
    }
    Ok(())
}

/// The last hour a settle run has settled or is settling: usage loaded for an hour up to it must
/// mark the hour for re-settlement. On PostgreSQL it is read under the lock that planning a run
/// takes exclusively (held until the load commits), so a run either sees the load's data or the
/// load sees the run's horizon.
pub(crate) async fn dirty_horizon(tx: &mut Tx) -> Result<Option<i64>> {
    crate::store::settle::lock_horizon(tx, false).await?;
    Ok(tx
        .rows(
            "SELECT MAX(watermark) FROM job_state WHERE job = $1 OR job = $2",
            vec![SETTLE_JOB.into(), crate::store::settle::HORIZON.into()],
            &[Kind::Int],
        )
        .await?
        .first()
        .and_then(|r| r.opt_int(0)))
}

/// Marks hours for re-settlement; marking one again bumps its generation, so a run that planned
/// to re-settle it before this load leaves it marked.
pub(crate) async fn mark_hours(tx: &mut Tx, hours: BTreeSet<i64>) -> Result<()> {
    let rows: Vec<Vec<Val>> = hours.into_iter().map(|h| vec![Val::from(h)]).collect();
    tx.insert_rows(
        "dirty_hours",
        &["hour_start"],
        rows,
        "ON CONFLICT (hour_start) DO UPDATE SET gen = dirty_hours.gen + 1",
    )
    .await?;
    Ok(())
}

/// Loads documents, all or nothing: each is validated against the database and the documents
/// before it; a rejection rolls back everything. Usage that lands in hours already settled marks
/// them for re-settlement by the next run.
pub async fn load_documents(db: &Db, zone: &BillingZone, docs: &[(String, Document)]) -> Result<LoadSummary> {
    let mut tx = db.begin().await?;
    let mut known = Known::default();
    let mut batches = Vec::with_capacity(docs.len());
    for (name, doc) in docs {
        known_for(&mut tx, doc, &mut known).await?;
        let batch = fixture::validate(doc, &known).map_err(|e| InputError(format!("{name}: {}", e.0)))?;
        known.absorb(&batch);
        batches.push(batch);
    }
    let watermark = dirty_horizon(&mut tx).await?;
    let mut summary = LoadSummary::default();
    let mut dirty = BTreeSet::new();
    for b in &batches {
        write_batch(&mut tx, zone, b, watermark, &known, &mut dirty, &mut summary).await?;
    }
    summary.hours_marked_for_resettlement = dirty.len();
    mark_hours(&mut tx, dirty).await?;
    tx.commit().await?;
    Ok(summary)
}

/// Marks the settled hours in [from, to) for re-settlement by the next settle run.
pub(crate) async fn mark_dirty_span(tx: &mut Tx, zone: &BillingZone, from: i64, to: i64) -> Result<()> {
    let w = dirty_horizon(tx).await?;
    let mut dirty = BTreeSet::new();
    mark_dirty(zone, from, to, w, &mut dirty);
    mark_hours(tx, dirty).await
}

fn mark_dirty(zone: &BillingZone, from: i64, to: i64, watermark: Option<i64>, dirty: &mut BTreeSet<i64>) {
    let Some(w) = watermark else { return };
    let end = to.min(zone.next_hour(w));
    for (h, _, _) in split_by_hour(zone, from, end) {
        dirty.insert(h);
    }
}

async fn write_batch(
    tx: &mut Tx,
    zone: &BillingZone,
    b: &Batch,
    watermark: Option<i64>,
    known: &Known,
    dirty: &mut BTreeSet<i64>,
    s: &mut LoadSummary,
) -> Result<()> {
    let accounts = b
        .accounts
        .iter()
        .map(|a| {
            vec![
                a.id.clone().into(),
                a.currency.clone().into(),
                a.balance.into(),
                a.balance.into(),
                a.grace_days.into(),
                a.retention_days.into(),
            ]
        })
        .collect();
    s.accounts += tx
        .insert_rows(
            "accounts",
            &["id", "currency", "opening_balance", "balance", "grace_days", "retention_days"],
            accounts,
            "",
        )
        .await? as usize;
    let plans = b
        .plans
        .iter()
        .map(|p| {
            Ok(vec![
                p.id.clone().into(),
                p.product.clone().into(),
                serde_json::to_string(p)?.into(),
            ])
        })
        .collect::<Result<Vec<_>>>()?;
    s.plans += tx.insert_rows("plans", &["id", "product", "doc"], plans, "").await? as usize;
    // every purchase at load (a yearly/monthly resource or a package) as the subscription it
    // creates: its row and its purchase line come from the same value
    let mut bought: Vec<(Subscription, i64, String)> = Vec::new();
    for (i, r) in b.resources.iter().enumerate() {
        if let Some(sub) = &r.subscription {
            let buy = Purchase {
                id: &r.id,
                account_id: &r.account_id,
                plan_id: &r.plan_id,
                mode: r.mode,
                quantity: r.quantity,
                at: r.created_at,
            };
            let mut subscription = buy.subscription(zone, sub, months_of(r.mode, 1));
            subscription.parts = sub.parts.clone();
            bought.push((subscription, sub.periods, format!("resources[{i}] (id {:?})", r.id)));
        }
    }
    let first_package = bought.len();
    for (i, p) in b.packages.iter().enumerate() {
        let plan = known.plans.get(&p.plan_id).context("the package's plan")?;
        let buy = Purchase {
            id: &p.id,
            account_id: &p.account_id,
            plan_id: &p.plan_id,
            mode: p.mode,
            quantity: 1,
            at: p.purchased_at,
        };
        let mut subscription = buy.subscription(zone, &p.subscription, plan.packages[&p.kind].months);
        subscription.package = Some(p.kind.clone());
        subscription.serves = Some(p.serves.clone());
        bought.push((subscription, p.subscription.periods, format!("packages[{i}] (id {:?})", p.id)));
    }
    s.packages += b.packages.len();
    let pay_per_use = b.resources.iter().filter(|r| r.subscription.is_none()).map(|r| {
        let mut row = vec![
            r.id.clone().into(),
            r.account_id.clone().into(),
            r.plan_id.clone().into(),
            r.mode.as_str().into(),
            r.quantity.into(),
            r.created_at.into(),
            r.deleted_at.into(),
            None::<i64>.into(),
            0i64.into(),
            None::<i64>.into(),
            7i64.into(),
        ];
        // anchor_date, expires_on, parts; months_paid; package, serves: a subscription's only
        row.extend(std::iter::repeat_with(|| Val::from(None::<String>)).take(3));
        row.push(None::<i64>.into());
        row.extend(std::iter::repeat_with(|| Val::from(None::<String>)).take(2));
        row
    });
    let rows = pay_per_use.chain(bought.iter().map(|(sub, periods, _)| {
        vec![
            sub.id.clone().into(),
            sub.account_id.clone().into(),
            sub.plan_id.clone().into(),
            sub.mode.as_str().into(),
            sub.quantity.into(),
            sub.purchased_at.into(),
            None::<i64>.into(),
            Some(*periods).into(),
            (sub.auto_renew as i64).into(),
            sub.auto_renew_times.into(),
            sub.renew_days_before.into(),
            sub.anchor.to_string().into(),
            sub.expires_on().to_string().into(),
            (!sub.parts.is_empty()).then(|| serde_json::json!(sub.parts).to_string()).into(),
            (sub.months_paid as i64).into(),
            sub.package.clone().into(),
            sub.serves.clone().into(),
        ]
    }));
    s.resources += tx
        .insert_rows(
            "resources",
            &[
                "id",
                "account_id",
                "plan_id",
                "mode",
                "quantity",
                "created_at",
                "deleted_at",
                "periods",
                "auto_renew",
                "auto_renew_times",
                "renew_days_before",
                "anchor_date",
                "expires_on",
                "parts",
                "months_paid",
                "package",
                "serves",
            ],
            rows.collect(),
            "",
        )
        .await? as usize;
    for r in &b.resources {
        if known.plans.get(&r.plan_id).is_some_and(|p| p.hourly.contains_key(INSTANCE_ITEM)) {
            mark_dirty(zone, r.created_at, r.deleted_at.unwrap_or(i64::MAX), watermark, dirty);
        }
    }
    // a new reading for the same (resource, item, from) corrects the earlier one
    let keys = b.segments.iter().map(|g| (g.resource_id.as_str(), g.item.as_str(), g.from));
    for (from, to) in supersede(tx, "usage_segments", "from_at", "to_at", keys).await? {
        s.corrected_readings += 1;
        mark_dirty(zone, from, to, watermark, dirty);
    }
    let mut longest = 0;
    for seg in &b.segments {
        mark_dirty(zone, seg.from, seg.to, watermark, dirty);
        longest = longest.max(seg.to - seg.from);
    }
    if longest > 0 {
        widen_segment_span(tx, longest).await?;
    }
    let segments = b
        .segments
        .iter()
        .map(|u| {
            vec![
                u.resource_id.clone().into(),
                u.item.clone().into(),
                u.quantity.into(),
                u.from.into(),
                u.to.into(),
            ]
        })
        .collect();
    s.usage += tx
        .insert_rows(
            "usage_segments",
            &["resource_id", "item", "quantity", "from_at", "to_at"],
            segments,
            "",
        )
        .await? as usize;
    // a new count for the same (resource, item, at) corrects the earlier one
    let keys = b.counts.iter().map(|c| (c.resource_id.as_str(), c.item.as_str(), c.at));
    s.corrected_readings += supersede(tx, "usage_counts", "at", "at", keys).await?.len();
    for c in &b.counts {
        mark_dirty(zone, c.at, c.at + 1, watermark, dirty);
    }
    let counts = b
        .counts
        .iter()
        .map(|c| vec![c.resource_id.clone().into(), c.item.clone().into(), c.quantity.into(), c.at.into()])
        .collect();
    s.usage += tx
        .insert_rows("usage_counts", &["resource_id", "item", "quantity", "at"], counts, "")
        .await? as usize;
    // purchases and top-ups are posted in the document's order
    if b.topups_after == 0 {
        post_topups(tx, b, s).await?;
    }
    for (k, (sub, periods, record)) in bought.iter().enumerate() {
        if k == first_package && b.topups_after == 1 {
            post_topups(tx, b, s).await?;
        }
        post_purchase(tx, zone, sub, *periods, record).await?;
        s.purchases += 1;
        if let Some(plan) = sub.package.as_ref().and_then(|_| known.plans.get(&sub.plan_id)) {
            // a package bought in hours already settled covers their counts: they are re-settled
            if let Some((serves, from, to)) = packages::add_cycles(tx, zone, plan, sub, 0, *periods, sub.purchased_at).await? {
                dirty.extend(packages::counted_hours(tx, zone, &serves, from, to, watermark).await?);
            }
        }
    }
    if first_package == bought.len() && b.topups_after == 1 {
        post_topups(tx, b, s).await?;
    }
    if b.topups_after == 2 {
        post_topups(tx, b, s).await?;
    }
    Ok(())
}

/// Who buys what at load.
struct Purchase<'a> {
    id: &'a str,
    account_id: &'a str,
    plan_id: &'a str,
    mode: BillingMode,
    quantity: i64,
    at: i64,
}

impl Purchase<'_> {
    /// The subscription bought: `sub.periods` periods of `months_per_period` months from the local
    /// date of purchase.
    fn subscription(&self, zone: &BillingZone, sub: &NewSubscription, months_per_period: u32) -> Subscription {
        Subscription {
            id: self.id.to_string(),
            account_id: self.account_id.to_string(),
            plan_id: self.plan_id.to_string(),
            mode: self.mode,
            quantity: self.quantity,
            purchased_at: self.at,
            anchor: zone.local_date(self.at),
            months_paid: months_per_period * sub.periods as u32,
            auto_renew: sub.auto_renew,
            auto_renew_times: sub.auto_renew_times,
            renewals_done: 0,
            renew_days_before: sub.renew_days_before,
            ppu_from: None,
            ppu_at_expiry: false,
            released_at: None,
            package: None,
            serves: None,
            parts: Default::default(),
        }
    }
}

/// Marks superseded the loaded readings of `table` (not yet superseded) that a batch loads again,
/// by (resource, item, `at_col`): the batch's resources' readings are read once and only the
/// corrected ones are updated. Returns each corrected reading's (`at_col`, `end_col`).
async fn supersede<'a>(
    tx: &mut Tx,
    table: &str,
    at_col: &str,
    end_col: &str,
    keys: impl Iterator<Item = (&'a str, &'a str, i64)>,
) -> Result<Vec<(i64, i64)>> {
    let keys: HashSet<(&str, &str, i64)> = keys.collect();
    let mut ids: Vec<String> = keys.iter().map(|k| k.0.to_string()).collect();
    ids.sort();
    ids.dedup();
    let loaded = tx
        .rows_in(
            &format!("SELECT resource_id, item, {at_col}, {end_col} FROM {table} WHERE superseded = 0 AND resource_id IN"),
            &ids,
            "",
            &[Kind::Text, Kind::Text, Kind::Int, Kind::Int],
        )
        .await?;
    let mut out = Vec::new();
    for r in loaded {
        let (resource, item, at) = (r.text(0), r.text(1), r.int(2));
        if !keys.contains(&(resource.as_str(), item.as_str(), at)) {
            continue;
        }
        // table and column names are this crate's constants
        tx.exec(
            sqlx::AssertSqlSafe(format!(
                "UPDATE {table} SET superseded = 1 WHERE resource_id = $1 AND item = $2 AND {at_col} = $3 AND superseded = 0"
            )),
            vec![resource.into(), item.into(), at.into()],
        )
        .await?;
        out.push((at, r.int(3)));
    }
    Ok(out)
}

async fn post_topups(tx: &mut Tx, b: &Batch, s: &mut LoadSummary) -> Result<()> {
    for t in &b.topups {
        post_topup(tx, &t.account_id, t.amount, t.at).await?;
        s.topups += 1;
    }
    Ok(())
}

/// Reads an account inside a transaction.
pub(crate) async fn account(tx: &mut Tx, id: &str) -> Result<Option<Account>> {
    let sql = if tx.backend() == super::db::Backend::Postgres {
        // its balance is about to change: hold it until commit
        "SELECT id, currency, balance, in_arrears_since, grace_days, retention_days FROM accounts WHERE id = $1 FOR UPDATE"
    } else {
        "SELECT id, currency, balance, in_arrears_since, grace_days, retention_days FROM accounts WHERE id = $1"
    };
    Ok(tx.rows(sql, vec![id.into()], ACCOUNT_KINDS).await?.first().map(account_of))
}

/// The accounts whose id the subquery `ids` selects, as books to charge: on PostgreSQL locked in
/// id order until the transaction ends (their balances are about to move).
pub(crate) async fn lock_books(tx: &mut Tx, ids: &str, args: Vec<Val>) -> Result<std::collections::HashMap<String, AccountBook>> {
    Ok(read_books(tx, ids, "", args, false)
        .await?
        .into_iter()
        .map(|b| (b.account.id.clone(), b))
        .collect())
}

/// [`lock_books`], in the database's order of account ids; `also` is a further condition on the
/// accounts' own `id` (` AND id >= $1`), which lets the server search the accounts by range
/// instead of reading them all for a part of them.
pub(crate) async fn lock_books_in_order(tx: &mut Tx, ids: &str, also: &str, args: Vec<Val>) -> Result<Vec<AccountBook>> {
    read_books(tx, ids, also, args, true).await
}

async fn read_books(tx: &mut Tx, ids: &str, also: &str, args: Vec<Val>, in_order: bool) -> Result<Vec<AccountBook>> {
    let lock = match (tx.backend(), in_order) {
        (super::db::Backend::Postgres, _) => "ORDER BY id FOR UPDATE",
        (super::db::Backend::Sqlite, true) => "ORDER BY id",
        (super::db::Backend::Sqlite, false) => "",
    };
    let sql = format!(
        "SELECT id, currency, balance, in_arrears_since, grace_days, retention_days FROM accounts WHERE id IN ({ids}){also} {lock}"
    );
    // `ids` is SQL written in this crate, with numbered placeholders for `args`; a chunk's books
    // are thousands of accounts
    Ok(tx
        .rows_bulk(sqlx::AssertSqlSafe(sql), args, ACCOUNT_KINDS)
        .await?
        .iter()
        .map(|r| AccountBook::new(account_of(r)))
        .collect())
}

/// Writes balance and arrears state of accounts: on SQLite from DIRECT_FROM_ROWS accounts on one
/// prepared UPDATE stepped per account, otherwise many per statement.
pub(crate) async fn save_accounts(tx: &mut Tx, accounts: Vec<&Account>) -> Result<()> {
    if tx.backend() == super::db::Backend::Sqlite && accounts.len() >= super::db::DIRECT_FROM_ROWS {
        // one prepared UPDATE by primary key per account, through the C API: a chunk's books are
        // up to its 20,000 resources' accounts, and the UPDATE ... FROM (VALUES ...) through sqlx
        // cost 3 µs an account (7.6 s of a 24-hour catch-up of 100k accounts)
        return tx
            .sqlite_direct(|conn| {
                let mut stmt =
                    super::db::CStatement::prepare(conn, "UPDATE accounts SET balance = ?2, in_arrears_since = ?3 WHERE id = ?1")?;
                for a in &accounts {
                    stmt.bind_static(1, &a.id)?;
                    stmt.bind_decimal(2, a.balance)?;
                    stmt.bind_int(3, a.in_arrears_since)?;
                    let n = stmt.execute()?;
                    anyhow::ensure!(n == 1, "account {}: {n} rows updated", a.id);
                }
                Ok(())
            })
            .await;
    }
    let rows = accounts
        .into_iter()
        .map(|a| vec![a.id.clone().into(), a.balance.into(), a.in_arrears_since.into()])
        .collect();
    tx.values_statements(
        "WITH v(id, balance, since) AS (VALUES ",
        3,
        rows,
        ") UPDATE accounts SET balance = v.balance, in_arrears_since = v.since FROM v WHERE accounts.id = v.id",
    )
    .await?;
    Ok(())
}

/// Records arrears beginning or ending: the period table and the notification outbox.
pub(crate) async fn record_arrears_events(tx: &mut Tx, events: &[ArrearsEvent]) -> Result<()> {
    for e in events {
        match e {
            ArrearsEvent::Began { account_id, at } => {
                tx.exec(
                    "INSERT INTO arrears_periods (account_id, began_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    vec![account_id.into(), (*at).into()],
                )
                .await?;
                notify(tx, "arrears_began", account_id, *at).await?;
            }
            ArrearsEvent::Cleared { account_id, at } => {
                tx.exec(
                    "UPDATE arrears_periods SET cleared_at = $2 WHERE account_id = $1 AND cleared_at IS NULL",
                    vec![account_id.into(), (*at).into()],
                )
                .await?;
                notify(tx, "arrears_cleared", account_id, *at).await?;
            }
        }
    }
    Ok(())
}

/// One event for the outbox; `key` makes it exactly once.
#[derive(Clone, Debug, Default)]
pub(crate) struct Notice {
    pub key: String,
    pub kind: &'static str,
    pub account_id: String,
    pub resource_id: Option<String>,
    pub at: i64,
    pub days_before: Option<i64>,
    pub expires_on: Option<String>,
    pub reason: Option<String>,
}

/// Writes a notification in the caller's transaction; a second write of the same event is a no-op.
pub(crate) async fn notify_event(tx: &mut Tx, n: Notice) -> Result<bool> {
    Ok(notify_events(tx, vec![n]).await? > 0)
}

/// Writes many notifications in the caller's transaction, many per statement; events already
/// written are skipped. Returns how many were new.
pub(crate) async fn notify_events(tx: &mut Tx, notices: Vec<Notice>) -> Result<usize> {
    let rows = notices
        .into_iter()
        .map(|n| {
            vec![
                n.key.into(),
                n.kind.into(),
                n.account_id.into(),
                n.resource_id.into(),
                n.at.into(),
                n.days_before.into(),
                n.expires_on.into(),
                n.reason.into(),
            ]
        })
        .collect();
    Ok(tx
        .insert_rows(
            "notifications",
            &[
                "event_key",
                "kind",
                "account_id",
                "resource_id",
                "at",
                "days_before",
                "expires_on",
                "reason",
            ],
            rows,
            "ON CONFLICT (event_key) DO NOTHING",
        )
        .await? as usize)
}

async fn notify(tx: &mut Tx, kind: &'static str, account_id: &str, at: i64) -> Result<()> {
    let key = serde_json::json!([kind, account_id, at]).to_string();
    notify_event(
        tx,
        Notice {
            key,
            kind,
            account_id: account_id.to_string(),
            at,
            ..Default::default()
        },
    )
    .await?;
    Ok(())
}

/// Credits a top-up at `at`; one that brings the balance to zero or above ends arrears.
pub(crate) async fn post_topup(tx: &mut Tx, account_id: &str, amount: Decimal, at: i64) -> Result<Decimal> {
    let acc = account(tx, account_id)
        .await?
        .ok_or_else(|| InputError(format!("topup: unknown account {account_id:?}")))?;
    let mut book = AccountBook::new(acc);
    let mut events = Vec::new();
    let mut after = book.account.balance + amount;
    after.rescale(2);
    book.apply(after, at, &mut events);
    tx.exec(
        "INSERT INTO balance_postings (account_id, kind, amount, at, balance_after) VALUES ($1, 'topup', $2, $3, $4)",
        vec![account_id.into(), amount.into(), at.into(), after.into()],
    )
    .await?;
    save_accounts(tx, vec![&book.account]).await?;
    record_arrears_events(tx, &events).await?;
    Ok(after)
}

/// Operator top-up (`billrun topup`).
pub async fn topup(db: &Db, account_id: &str, amount: Decimal, at: i64) -> Result<Decimal> {
    let mut tx = db.begin().await?;
    let after = post_topup(&mut tx, account_id, amount, at).await?;
    tx.commit().await?;
    Ok(after)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    /// Balances saved many at a time (SQLite: the C API) and one at a time (sqlx) are stored
    /// alike: the amount as `Decimal`'s text, arrears as an integer or NULL; accounts not saved
    /// keep theirs.
    #[tokio::test]
    async fn saved_balances_read_back_exactly_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::connect(&format!("sqlite://{}", dir.path().join("t.db").display()))
            .await
            .unwrap();
        crate::store::schema::migrate(&db).await.unwrap();
        let n = super::super::db::DIRECT_FROM_ROWS + 5;
        let mut tx = db.begin().await.unwrap();
        for i in 0..n + 1 {
            tx.exec(
                "INSERT INTO accounts (id, currency, opening_balance, balance, grace_days, retention_days) VALUES ($1, 'USD', '0', '1.00', 15, 15)",
                vec![format!("a'{i}").into()],
            )
            .await
            .unwrap();
        }
        tx.commit().await.unwrap();
        let account = |i: usize| Account {
            id: format!("a'{i}"),
            currency: "USD".into(),
            balance: Decimal::from_str(["-0.01", "1234567890.12", "0.00", "-7.5"][i % 4]).unwrap(),
            in_arrears_since: i.is_multiple_of(3).then_some(1_704_880_800 + i as i64),
            grace_days: 15,
            retention_days: 15,
        };
        let many: Vec<Account> = (0..n).map(account).collect();
        let mut tx = db.begin().await.unwrap();
        save_accounts(&mut tx, many.iter().collect()).await.unwrap();
        tx.commit().await.unwrap();
        let one = Account {
            balance: Decimal::from_str("-1122.80").unwrap(),
            ..account(1)
        };
        let mut tx = db.begin().await.unwrap();
        save_accounts(&mut tx, vec![&one]).await.unwrap();
        tx.commit().await.unwrap();
        let rows = db
            .rows(
                "SELECT id, quote(balance) || typeof(balance), in_arrears_since FROM accounts ORDER BY rowid",
                vec![],
                &[Kind::Text, Kind::Text, Kind::Int],
            )
            .await
            .unwrap();
        assert_eq!(rows.len(), n + 1);
        for (i, r) in rows.iter().enumerate() {
            let (balance, since) = match i {
                1 => ("'-1122.80'text".to_string(), account(1).in_arrears_since),
                i if i == n => ("'1.00'text".to_string(), None),
                i => (format!("'{}'text", account(i).balance), account(i).in_arrears_since),
            };
            assert_eq!(
                (r.text(0), r.text(1), r.opt_int(2)),
                (format!("a'{i}"), balance, since),
                "account {i}"
            );
        }
    }
}
