//! Yearly/monthly subscriptions in the database: the purchase posted at load, the daily job
//! (renewal attempts, then lifecycle transitions, then expiry alerts) and the operator actions
//! (renew, unsubscribe, to-ppu). Each is one transaction.

use super::db::{Backend, Db, Kind, Row, Tx, Val};
use super::ledger;
use super::runs::{self, Claim};
use super::world::{all_plans, notify_event, notify_events, plan_of, record_arrears_events, save_accounts, Notice};
use crate::billing::lifecycle::{
    alert_days, date_text, days_until, expiry_transitions, refund_at, renewal_due, resource_arrears_transitions, ArrearsPeriod, PaidCycle,
    State,
};
use crate::billing::model::{BillingMode, LedgerLine, Plan, TransactionType};
use crate::billing::money::{fmt_cents, fmt_plain};
use crate::billing::prepaid::{
    charge_explain, period_months, periods_amount, post_prepaid, purchase_key, refund_key, renewal_key, unit_price, PrepaidCharge,
    Subscription,
};
use crate::billing::settle::{AccountBook, ArrearsEvent};
use crate::billing::zone::BillingZone;
use crate::error::InputError;
use anyhow::{anyhow, bail, Context, Result};
use chrono::NaiveDate;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::HashMap;

pub const DAILY_JOB: &str = "daily";

/// Days before expiry a prepaid package's alert is sent.
const PACKAGE_ALERT_DAYS: &[i64] = &[7];

const SUB_COLUMNS: &[&str] = &[
    "id",
    "account_id",
    "plan_id",
    "mode",
    "quantity",
    "created_at",
    "anchor_date",
    "months_paid",
    "auto_renew",
    "auto_renew_times",
    "renewals_done",
    "renew_days_before",
    "ppu_from",
    "ppu_at_expiry",
    "released_at",
    "package",
    "serves",
    "parts",
];
const SUB_KINDS: &[Kind] = &[
    Kind::Text,
    Kind::Text,
    Kind::Text,
    Kind::Text,
    Kind::Int,
    Kind::Int,
    Kind::Text,
    Kind::Int,
    Kind::Int,
    Kind::Int,
    Kind::Int,
    Kind::Int,
    Kind::Int,
    Kind::Int,
    Kind::Int,
    Kind::Text,
    Kind::Text,
    Kind::Text,
];

fn sub_of(r: &Row) -> Result<Subscription> {
    Ok(Subscription {
        id: r.text(0),
        account_id: r.text(1),
        plan_id: r.text(2),
        mode: BillingMode::parse(&r.text(3)).context("stored mode")?,
        quantity: r.int(4),
        purchased_at: r.int(5),
        anchor: NaiveDate::parse_from_str(&r.text(6), "%Y-%m-%d").context("stored anchor_date")?,
        months_paid: r.int(7) as u32,
        auto_renew: r.int(8) != 0,
        auto_renew_times: r.opt_int(9),
        renewals_done: r.int(10),
        renew_days_before: r.int(11),
        ppu_from: r.opt_int(12),
        ppu_at_expiry: r.int(13) != 0,
        released_at: r.opt_int(14),
        package: r.opt_text(15),
        serves: r.opt_text(16),
        parts: match r.opt_text(17) {
            Some(t) => serde_json::from_str(&t).context("stored parts")?,
            None => Default::default(),
        },
    })
}

/// Subscriptions: one, or those of the accounts in [first, last] not released by `live_at` (a
/// released one has nothing left to do). With `due_on`, only those the daily run on that local
/// date can act on: a renewal attempt (expiring within their `renew_days_before`, which also
/// takes in every expired one, whose transitions fall on or after the day after expiry) or an
/// expiry alert (expiring in exactly one of the alert days). The rest (most of a big book on most
/// days) is not read at all. That the filter keeps everything the run acts on is checked by every
/// daily story (tests/subscriptions.rs, packages.rs) and by the reference model (tests/model.rs).
async fn subscriptions(
    tx: &mut Tx,
    only: Option<&str>,
    live_at: Option<i64>,
    accounts: Option<(&str, &str)>,
    due_on: Option<NaiveDate>,
) -> Result<Vec<Subscription>> {
    let (rest, args) = subscriptions_select(tx.backend(), only, live_at, accounts, due_on);
    // only constant SQL and numbered placeholders are in the text; a day's due subscriptions are
    // hundreds of thousands
    let sql = sqlx::AssertSqlSafe(format!("SELECT {} {rest}", SUB_COLUMNS.join(", ")));
    let rows = tx.rows_bulk(sql, args, SUB_KINDS).await?;
    rows.iter().map(sub_of).collect()
}

/// The `FROM ... WHERE ... ORDER BY` of [`subscriptions`] and its arguments (public for the
/// plan's test).
pub fn subscriptions_select(
    backend: Backend,
    only: Option<&str>,
    live_at: Option<i64>,
    accounts: Option<(&str, &str)>,
    due_on: Option<NaiveDate>,
) -> (String, Vec<Val>) {
    // only the conditions that apply are written, each a plain comparison: a condition such as
    // `($3 = '' OR account_id >= $3 ...)` kept SQLite from searching the account index by range,
    // so each batch of the daily run walked the whole index (1M subscriptions: 20 batches, 4.7 s
    // of a 12.9 s run)
    let mut args: Vec<Val> = Vec::new();
    let mut arg = |v: Val| {
        args.push(v);
        format!("${}", args.len())
    };
    let mut conds = String::from("mode <> 'pay_per_use'");
    if let Some(id) = only {
        conds += &format!(" AND id = {}", arg(id.into()));
    }
    if let Some(live_at) = live_at {
        conds += &format!(" AND (released_at IS NULL OR released_at > {})", arg(live_at.into()));
    }
    if let Some((first, last)) = accounts {
        conds += &format!(" AND account_id >= {} AND account_id <= {}", arg(first.into()), arg(last.into()));
    }
    if let Some(today) = due_on {
        // PostgreSQL compares dates: formatting a window date for each of a million rows
        // (`to_char`) took half the read's time (1M subscriptions: 33 -> 18 ms a batch)
        let day = arg(date_text(today).into());
        let in_renewal_window = match backend {
            Backend::Sqlite => format!("expires_on <= date({day}, '+' || renew_days_before || ' days')"),
            Backend::Postgres => format!("CAST(expires_on AS date) - CAST({day} AS date) <= renew_days_before"),
        };
        let alert_dates: Vec<String> = ALERT_DAYS_ANY
            .iter()
            .map(|d| arg(date_text(today + chrono::Duration::days(*d)).into()))
            .collect();
        conds += &format!(
            " AND (expires_on IS NULL OR {in_renewal_window} OR expires_on IN ({}))",
            alert_dates.join(", ")
        );
    }
    (format!("FROM resources WHERE {conds} ORDER BY account_id, id"), args)
}

/// Every number of days before expiry on which some subscription is alerted (yearly and monthly
/// cycles, packages).
const ALERT_DAYS_ANY: [i64; 5] = [1, 3, 7, 15, 30];

fn subscription_row(s: &Subscription) -> Vec<Val> {
    vec![
        s.id.clone().into(),
        (s.months_paid as i64).into(),
        s.expires_on().to_string().into(),
        s.renewals_done.into(),
        s.ppu_from.into(),
        (s.ppu_at_expiry as i64).into(),
        s.released_at.into(),
        (s.auto_renew as i64).into(),
    ]
}

async fn save_subscription(tx: &mut Tx, s: &Subscription) -> Result<()> {
    tx.exec(
        "UPDATE resources SET months_paid = $2, expires_on = $3, renewals_done = $4, ppu_from = $5, ppu_at_expiry = $6, \
         released_at = $7, auto_renew = $8 WHERE id = $1",
        subscription_row(s),
    )
    .await?;
    Ok(())
}

/// Writes many subscriptions' state, many per statement (the daily run changes thousands).
async fn save_subscriptions(tx: &mut Tx, subs: &[&Subscription]) -> Result<()> {
    tx.values_statements(
        "WITH v(id, months_paid, expires_on, renewals_done, ppu_from, ppu_at_expiry, released_at, auto_renew) AS (VALUES ",
        8,
        subs.iter().map(|s| subscription_row(s)).collect(),
        ") UPDATE resources SET months_paid = v.months_paid, expires_on = v.expires_on, renewals_done = v.renewals_done, \
         ppu_from = v.ppu_from, ppu_at_expiry = v.ppu_at_expiry, released_at = v.released_at, auto_renew = v.auto_renew \
         FROM v WHERE resources.id = v.id",
    )
    .await?;
    Ok(())
}

async fn plan(tx: &mut Tx, id: &str) -> Result<Plan> {
    let rows = tx
        .rows("SELECT doc FROM plans WHERE id = $1", vec![id.into()], &[Kind::Text])
        .await?;
    plan_of(rows.first().ok_or_else(|| anyhow!("plan {id} is not loaded"))?)
}

async fn book(tx: &mut Tx, account_id: &str) -> Result<AccountBook> {
    let account = crate::store::world::account(tx, account_id).await?;
    Ok(AccountBook::new(
        account.ok_or_else(|| anyhow!("account {account_id} is not loaded"))?,
    ))
}

/// Posts a subscription's purchase at load: price x periods x quantity at `purchased_at`. A
/// prepaid charge may not take the balance below zero; then the whole load is refused.
pub(crate) async fn post_purchase(tx: &mut Tx, zone: &BillingZone, sub: &Subscription, periods: i64, record: &str) -> Result<()> {
    let plan = plan(tx, &sub.plan_id).await?;
    let unit = unit_price(&plan, sub).map_err(|e| anyhow!(e))?;
    let list = periods_amount(unit, periods, sub.quantity)?;
    let mut book = book(tx, &sub.account_id).await?;
    let due = crate::billing::money::amount_due(list);
    if book.account.balance < due {
        return Err(InputError(format!(
            "{record}: field `purchased_at`: account {:?} has {} and the purchase costs {}; a prepaid charge may not take the balance below zero",
            sub.account_id,
            fmt_cents(book.account.balance),
            fmt_cents(due)
        ))
        .into());
    }
    let mut events = Vec::new();
    let line = post_prepaid(
        PrepaidCharge {
            kind: TransactionType::Purchase,
            sub,
            plan: &plan,
            periods,
            period_start: sub.purchased_at,
            period_end: sub.cycle_end(zone),
            list_amount: list,
            at: sub.purchased_at,
            run_job: "load",
            line_key: purchase_key(&sub.id),
            renews_to: None,
            explain: charge_explain(&plan, sub, unit, periods, sub.months_paid, list),
        },
        &mut book,
        &mut events,
    );
    ledger::post_lines(tx, &[line]).await?;
    save_accounts(tx, vec![&book.account]).await?;
    record_arrears_events(tx, &events).await?;
    Ok(())
}

/// What one daily run did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DailyOutcome {
    pub skipped: bool,
    pub renewals: usize,
    pub renewal_failures: usize,
    pub transitions: usize,
    pub alerts: usize,
    /// Renewal lines posted and their amount due.
    pub lines: usize,
    pub amount_due: Decimal,
}

impl DailyOutcome {
    fn add(&mut self, o: &DailyOutcome) {
        self.renewals += o.renewals;
        self.renewal_failures += o.renewal_failures;
        self.transitions += o.transitions;
        self.alerts += o.alerts;
        self.lines += o.lines;
        self.amount_due += o.amount_due;
    }

    /// What a run's (or a part's) row keeps besides its lines and amount.
    fn detail(&self) -> serde_json::Value {
        json!({"renewals": self.renewals, "renewal_failures": self.renewal_failures, "transitions": self.transitions, "alerts": self.alerts})
    }
}

fn transition_kind(s: State) -> Option<&'static str> {
    match s {
        State::Expired => Some("expired"),
        State::Frozen => Some("frozen"),
        State::Released => Some("released"),
        _ => None,
    }
}

/// How far a daily run got in this process.
#[derive(Clone, Debug, PartialEq)]
pub enum DailyProgress {
    /// The run is done (by this process, others, or both); what this process did.
    Done(DailyOutcome),
    /// Shutdown was requested between parts; what was done is committed.
    Interrupted,
    /// A part is held by another runner until its lease expires.
    Held { job: String, owner: String, lease_until: i64 },
}

/// The parts of a daily run over more accounts than one part takes, by account id: part k holds
/// the accounts from `bounds[k - 1]` up to, not including, `bounds[k]` (the first and the last
/// part are open-ended, so an account added since the plan still falls in one).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DailyPlan {
    pub bounds: Vec<String>,
}

impl DailyPlan {
    pub fn chunks(&self) -> usize {
        self.bounds.len() + 1
    }

    fn range(&self, k: usize) -> AccountRange<'_> {
        AccountRange {
            from: k.checked_sub(1).and_then(|i| self.bounds.get(i)).map(String::as_str),
            until: self.bounds.get(k).map(String::as_str),
        }
    }
}

/// Accounts with ids in [from, until), either end open.
#[derive(Clone, Copy, Debug, Default)]
struct AccountRange<'a> {
    from: Option<&'a str>,
    until: Option<&'a str>,
}

impl AccountRange<'_> {
    /// ` AND {col} >= $n AND {col} < $m` for the ends that are set, for each of `cols`, and the
    /// arguments (each end is one argument, however many columns compare with it).
    fn sql<const N: usize>(&self, cols: [&str; N]) -> ([String; N], Vec<Val>) {
        let mut conds = cols.map(|_| String::new());
        let mut args: Vec<Val> = Vec::new();
        for (end, op) in [(self.from, ">="), (self.until, "<")] {
            if let Some(id) = end {
                args.push(id.into());
                for (cond, col) in conds.iter_mut().zip(cols) {
                    *cond += &format!(" AND {col} {op} ${}", args.len());
                }
            }
        }
        (conds, args)
    }
}

/// What the daily run works with: every account that owns a subscription or has been in arrears.
const DAILY_ACCOUNTS: &str = "SELECT account_id FROM (SELECT account_id FROM resources WHERE mode <> 'pay_per_use' \
     UNION SELECT account_id FROM arrears_periods) o WHERE TRUE";

/// How a daily run is worked on: parts at once (PostgreSQL) and the lease of each part's claim.
#[derive(Clone, Copy, Debug)]
pub struct DailyLimits {
    pub workers: usize,
    pub lease_seconds: i64,
}

/// The daily job at `at` (00:03:00 local), claimed by this process: renewal attempts, then
/// lifecycle transitions, then expiry alerts, for every account's subscriptions.
///
/// Up to `daily_accounts_per_batch()` accounts it is one transaction that commits only while the
/// claim holds. Beyond that the run is planned in parts of that many accounts, each done in a
/// transaction of its own under a claim of its own (as a settle run's chunks: replicas share
/// them, and on PostgreSQL `limits.workers` of them run at once), and recorded as done once every
/// part is. The outcome does not depend on the parts: each account's renewals, transitions and
/// alerts are decided from its own balance and subscriptions alone.
pub async fn daily_run(db: &Db, zone: &BillingZone, claim: &Claim, limits: DailyLimits) -> Result<DailyProgress> {
    let at = claim.at;
    let keeper = (db.backend() == Backend::Postgres).then(|| runs::LeaseKeeper::start(db, claim, limits.lease_seconds));
    let mut tx = runs::begin_work(db, claim).await?;
    set_daily_work_mem(&mut tx).await?;
    let per = daily_accounts_per_batch();
    // the accounts in id order (unlocked: the plan only cuts the id space)
    let accounts: Vec<String> = tx
        .rows_bulk(
            sqlx::AssertSqlSafe(format!("{DAILY_ACCOUNTS} ORDER BY account_id")),
            vec![],
            &[Kind::Text],
        )
        .await?
        .iter()
        .map(|r| r.text(0))
        .collect();
    if accounts.len() <= per {
        let mut out = DailyOutcome::default();
        daily_part(&mut tx, zone, at, AccountRange::default(), &mut out).await?;
        out.transitions += ppu_arrears_transitions(&mut tx, zone, at).await?;
        runs::finish(&mut tx, claim, out.lines, out.amount_due, out.detail()).await?;
        tx.commit().await?;
        return Ok(DailyProgress::Done(out));
    }
    let plan = DailyPlan {
        bounds: accounts.into_iter().step_by(per).skip(1).collect(),
    };
    runs::open(&mut tx, claim, &serde_json::to_string(&plan)?).await?;
    tx.commit().await?;
    drop(keeper);
    tracing::debug!(run = %zone.format(at), parts = plan.chunks(), "planned a daily run in parts");
    daily_parts(db, zone, at, &plan, limits).await
}

/// The parts of an open daily run (planned by this process or another), then the run recorded as
/// done if every part is.
pub async fn daily_parts(db: &Db, zone: &BillingZone, at: i64, plan: &DailyPlan, limits: DailyLimits) -> Result<DailyProgress> {
    let workers = match db.backend() {
        Backend::Postgres => limits.workers.max(1),
        Backend::Sqlite => 1,
    };
    let mut out = DailyOutcome::default();
    // a part released by a failed runner can be claimed again at once: look a few times
    for _ in 0..3 {
        let ends = runs::run_chunks(db, DAILY_JOB, at, plan.chunks(), workers, limits.lease_seconds, async |k, c| {
            let mut part = DailyOutcome::default();
            let mut tx = runs::begin_work(db, c).await?;
            set_daily_work_mem(&mut tx).await?;
            daily_part(&mut tx, zone, at, plan.range(k), &mut part).await?;
            runs::finish(&mut tx, c, part.lines, part.amount_due, part.detail()).await?;
            tx.commit().await?;
            Ok(part)
        })
        .await;
        for (_, part) in ends.done {
            out.add(&part);
        }
        if let Some((k, e)) = ends.failed {
            return Err(e.context(format!("part {} of {}", k + 1, plan.chunks())));
        }
        if ends.interrupted {
            return Ok(DailyProgress::Interrupted);
        }
        if let Some((_, job, owner, lease_until)) = ends.held {
            return Ok(DailyProgress::Held { job, owner, lease_until });
        }
        if let Some(transitions) = finish_parts(db, zone, at, plan).await? {
            out.transitions += transitions;
            return Ok(DailyProgress::Done(out));
        }
        if runs::is_done(db, DAILY_JOB, at).await? {
            out.skipped = out == DailyOutcome::default();
            return Ok(DailyProgress::Done(out));
        }
    }
    bail!("{DAILY_JOB}@{at}: parts kept becoming free again; giving the run up for now")
}

/// Records a daily run in parts as done once every part is: exactly once (the guarded update
/// decides), with the parts' totals, after the pay-per-use arrears transitions due by then.
/// `Some(transitions recorded)`, or None if a part is not done or another runner did this.
async fn finish_parts(db: &Db, zone: &BillingZone, at: i64, plan: &DailyPlan) -> Result<Option<usize>> {
    let mut tx = db.begin().await?;
    let names: Vec<String> = (0..plan.chunks()).map(|k| runs::chunk_job(DAILY_JOB, k)).collect();
    let done = tx
        .rows_in(
            "SELECT lines, amount_due, detail FROM job_runs WHERE job IN",
            &names,
            &format!("AND scheduled_at = {at} AND outcome = 'ok'"),
            &[Kind::Int, Kind::Money, Kind::Text],
        )
        .await?;
    if done.len() != plan.chunks() {
        tx.rollback().await?;
        return Ok(None);
    }
    let mut total = DailyOutcome::default();
    for r in &done {
        let d: serde_json::Value = serde_json::from_str(&r.text(2)).context("a daily part's stored detail")?;
        let count = |k: &str| d[k].as_u64().unwrap_or(0) as usize;
        total.add(&DailyOutcome {
            renewals: count("renewals"),
            renewal_failures: count("renewal_failures"),
            transitions: count("transitions"),
            alerts: count("alerts"),
            lines: r.int(0) as usize,
            amount_due: r.money(1),
            skipped: false,
        });
    }
    let transitions = ppu_arrears_transitions(&mut tx, zone, at).await?;
    total.transitions += transitions;
    let mut detail = total.detail();
    detail["parts"] = json!(plan.chunks());
    let n = tx
        .exec(
            "UPDATE job_runs SET outcome = 'ok', finished_at = $3, lines = $4, amount_due = $5, detail = $6 \
             WHERE job = $1 AND scheduled_at = $2 AND outcome = 'chunked'",
            vec![
                DAILY_JOB.into(),
                at.into(),
                crate::clock::wall_now().into(),
                (total.lines as i64).into(),
                total.amount_due.into(),
                detail.to_string().into(),
            ],
        )
        .await?;
    if n == 0 {
        tx.rollback().await?;
        return Ok(None);
    }
    tx.commit().await?;
    Ok(Some(transitions))
}

/// The daily run over the accounts of `range`, in the caller's transaction: their balances locked
/// (in id order on PostgreSQL, until it commits), their due subscriptions acted on, the older
/// alerts of the resources alerted now superseded, balances and arrears events written.
async fn daily_part(tx: &mut Tx, zone: &BillingZone, at: i64, range: AccountRange<'_>, out: &mut DailyOutcome) -> Result<()> {
    let plans = all_plans(tx).await?;
    let ([owners, own], args) = range.sql(["account_id", "id"]);
    let books = crate::store::world::lock_books_in_order(tx, &format!("{DAILY_ACCOUNTS}{owners}"), &own, args).await?;
    let mut events: Vec<ArrearsEvent> = Vec::new();
    // the subscriptions of the accounts read, by the range of their ids (in the database's own
    // order of ids, which the range conditions compare in: the order the books were read in)
    let (Some(first), Some(last)) = (books.first(), books.last()) else {
        return Ok(());
    };
    let (first, last) = (first.account.id.clone(), last.account.id.clone());
    let mut books: HashMap<String, AccountBook> = books.into_iter().map(|b| (b.account.id.clone(), b)).collect();
    let due_on = zone.local_date(at);
    let mut subs = subscriptions(tx, None, Some(at), Some((&first, &last)), Some(due_on)).await?;
    let alerted = daily_batch(tx, zone, at, &plans, &mut books, &mut events, &mut subs, out).await?;
    // only the newest undelivered alert of a resource is sent: older ones are superseded
    supersede_alerts(tx, &alerted).await?;
    let changed_books: Vec<_> = books.values().filter(|b| b.changed).map(|b| &b.account).collect();
    save_accounts(tx, changed_books).await?;
    record_arrears_events(tx, &events).await?;
    Ok(())
}

/// On PostgreSQL, the daily run's memory for sorting and hashing, for its own transaction only:
/// the accounts it reads are the distinct owners of every subscription, which with the default
/// 4 MB the server sorted on disk (1M subscriptions: 1.6 s; 0.8 s in memory).
async fn set_daily_work_mem(tx: &mut Tx) -> Result<()> {
    if tx.backend() == Backend::Postgres {
        tx.exec("SET LOCAL work_mem = '64MB'", vec![]).await?;
    }
    Ok(())
}

/// Marks every undelivered expiry alert of `resources` that a newer alert of its resource follows
/// as superseded. Only a daily run writes expiry alerts, and each supersedes the older ones of
/// the resources it alerted, so these are the only ones with a newer alert not yet seen. The
/// newer alert is found through `notifications_resource`, which holds expiry alerts only
/// (migration 15): the statement names its condition, `kind = 'expiry_alert'`.
async fn supersede_alerts(tx: &mut Tx, resources: &[String]) -> Result<u64> {
    if resources.is_empty() {
        return Ok(0);
    }
    let sql = supersede_alerts_sql(tx.backend());
    tx.exec(sqlx::AssertSqlSafe(sql), vec![serde_json::to_string(resources)?.into()])
        .await
}

/// The statement of [`supersede_alerts`]; `$1` is the resources' ids as a JSON array (public for
/// the plan's test). The alerts are looked up from the ids (on SQLite a `CROSS JOIN` keeps that
/// order: left to itself it walked every pending notification by the delivery index instead).
pub fn supersede_alerts_sql(backend: Backend) -> String {
    let ids = match backend {
        Backend::Sqlite => "json_each($1) j CROSS JOIN notifications n",
        Backend::Postgres => "jsonb_array_elements_text(CAST($1 AS jsonb)) j(value) JOIN notifications n ON TRUE",
    };
    format!(
        "UPDATE notifications SET delivery = 'superseded' WHERE id IN (SELECT n.id FROM {ids} WHERE n.resource_id = j.value \
         AND n.kind = 'expiry_alert' AND n.delivery = 'pending' AND EXISTS (SELECT 1 FROM notifications n2 \
         WHERE n2.kind = 'expiry_alert' AND n2.resource_id = n.resource_id AND n2.at > n.at))"
    )
}

/// Accounts in one part of a daily run (their subscriptions are held in memory at once): 5,000,
/// or `BILLRUN_DAILY_BATCH_ACCOUNTS` (the outcome does not depend on it; tests set it small).
fn daily_accounts_per_batch() -> usize {
    std::env::var("BILLRUN_DAILY_BATCH_ACCOUNTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(5_000)
}

/// The daily run over one batch of subscriptions (all of some accounts'): renewal attempts, then
/// lifecycle transitions, then alerts; writes what changed.
#[allow(clippy::too_many_arguments)]
async fn daily_batch(
    tx: &mut Tx,
    zone: &BillingZone,
    at: i64,
    plans: &HashMap<String, Plan>,
    books: &mut HashMap<String, AccountBook>,
    events: &mut Vec<ArrearsEvent>,
    subs: &mut [Subscription],
    out: &mut DailyOutcome,
) -> Result<Vec<String>> {
    let today = zone.local_date(at);
    let mut changed = vec![false; subs.len()];
    let (mut renewal_notices, mut transitions, mut alerts) = (Vec::new(), Vec::new(), Vec::new());
    let mut lines = Vec::new();

    // 1. renewal attempts, in account then resource order (balances are shared)
    for (i, sub) in subs.iter_mut().enumerate() {
        let end = sub.cycle_end(zone);
        if !sub.renews_automatically() || end <= at || !renewal_due(today, sub.expires_on(), sub.renew_days_before) {
            continue;
        }
        let plan = plans
            .get(&sub.plan_id)
            .ok_or_else(|| anyhow!("plan {} is not loaded", sub.plan_id))?;
        let unit = unit_price(plan, sub).map_err(|e| anyhow!(e))?;
        let list = periods_amount(unit, 1, sub.quantity)?;
        let due = crate::billing::money::amount_due(list);
        let book = books
            .get_mut(&sub.account_id)
            .ok_or_else(|| anyhow!("account {} is not loaded", sub.account_id))?;
        let refusal = if book.account.in_arrears_since.is_some() {
            Some(format!(
                "account {} is in arrears (balance {})",
                sub.account_id,
                fmt_cents(book.account.balance)
            ))
        } else if book.account.balance < due {
            Some(format!(
                "balance {} is short of the renewal price {}",
                fmt_cents(book.account.balance),
                fmt_cents(due)
            ))
        } else {
            None
        };
        let old_expiry = sub.expires_on();
        if let Some(reason) = refusal {
            out.renewal_failures += 1;
            renewal_notices.push(Notice {
                key: json!(["renewal_failed", sub.id, old_expiry.to_string(), today.to_string()]).to_string(),
                kind: "renewal_failed",
                account_id: sub.account_id.clone(),
                resource_id: Some(sub.id.clone()),
                at,
                expires_on: Some(old_expiry.to_string()),
                reason: Some(reason),
                ..Default::default()
            });
            continue;
        }
        let months = period_months(plan, sub);
        // an auto-renewal is paid before its cycle begins: no settled hour can draw from it yet
        crate::store::packages::add_cycles(tx, zone, plan, sub, sub.months_paid, 1, at).await?;
        sub.months_paid += months;
        sub.renewals_done += 1;
        changed[i] = true;
        let new_expiry = sub.expires_on();
        lines.push(post_prepaid(
            PrepaidCharge {
                kind: TransactionType::Renewal,
                sub,
                plan,
                periods: 1,
                period_start: end,
                period_end: sub.cycle_end(zone),
                list_amount: list,
                at,
                run_job: DAILY_JOB,
                line_key: renewal_key(&sub.id, new_expiry),
                renews_to: Some(new_expiry),
                explain: charge_explain(plan, sub, unit, 1, months, list),
            },
            book,
            events,
        ));
        out.renewals += 1;
        renewal_notices.push(Notice {
            key: json!(["renewal_succeeded", sub.id, new_expiry.to_string()]).to_string(),
            kind: "renewal_succeeded",
            account_id: sub.account_id.clone(),
            resource_id: Some(sub.id.clone()),
            at,
            expires_on: Some(new_expiry.to_string()),
            ..Default::default()
        });
    }
    // notifications are written many per statement (a day of a million subscriptions has
    // hundreds of thousands)
    notify_events(tx, std::mem::take(&mut renewal_notices)).await?;

    // 2. lifecycle transitions at their exact instants, recorded once whichever run sees them
    for (i, sub) in subs.iter_mut().enumerate() {
        if sub.ppu_at_expiry || sub.ppu_from.is_some() || sub.released_at.is_some_and(|r| r <= at) {
            continue;
        }
        let account = &books[&sub.account_id].account;
        for tr in expiry_transitions(zone, sub.expires_on(), account.grace_days, account.retention_days) {
            if tr.at > at {
                break;
            }
            let kind = transition_kind(tr.state).expect("expiry transitions are named");
            transitions.push(Notice {
                key: json!([kind, sub.id, tr.at]).to_string(),
                kind,
                account_id: sub.account_id.clone(),
                resource_id: Some(sub.id.clone()),
                at: tr.at,
                expires_on: Some(sub.expires_on().to_string()),
                ..Default::default()
            });
            if tr.state == State::Released {
                sub.released_at = Some(tr.at);
                changed[i] = true;
            }
        }
    }
    out.transitions += notify_events(tx, transitions).await?;

    // 3. expiry alerts for the cycles still running
    for sub in subs.iter() {
        if sub.ppu_at_expiry || sub.ppu_from.is_some() || sub.released_at.is_some() || sub.cycle_end(zone) <= at {
            continue;
        }
        let days = days_until(today, sub.expires_on());
        // a package is reminded of once, 7 days before it expires
        let (days_before, kind) = match sub.package {
            Some(_) => (PACKAGE_ALERT_DAYS, "package_expiry_alert"),
            None => (alert_days(sub.mode), "expiry_alert"),
        };
        if days_before.contains(&days) {
            alerts.push(Notice {
                key: json!([kind, sub.id, sub.expires_on().to_string(), days]).to_string(),
                kind,
                account_id: sub.account_id.clone(),
                resource_id: Some(sub.id.clone()),
                at,
                days_before: Some(days),
                expires_on: Some(sub.expires_on().to_string()),
                ..Default::default()
            });
        }
    }
    let alerted: Vec<String> = alerts
        .iter()
        .filter(|n| n.kind == "expiry_alert")
        .filter_map(|n| n.resource_id.clone())
        .collect();
    out.alerts += notify_events(tx, alerts).await?;
    let changed_subs: Vec<&Subscription> = subs.iter().zip(&changed).filter(|(_, c)| **c).map(|(s, _)| s).collect();
    save_subscriptions(tx, &changed_subs).await?;
    ledger::post_lines(tx, &lines).await?;
    out.lines += lines.len();
    out.amount_due += lines.iter().map(|l| l.amount_due).sum::<Decimal>();
    Ok(alerted)
}

/// Arrears periods of every account that has had any, oldest first.
pub(crate) async fn arrears_periods(tx: &mut Tx) -> Result<HashMap<String, Vec<ArrearsPeriod>>> {
    let mut out: HashMap<String, Vec<ArrearsPeriod>> = HashMap::new();
    for r in tx
        .rows(
            "SELECT account_id, began_at, cleared_at FROM arrears_periods ORDER BY account_id, began_at",
            vec![],
            &[Kind::Text, Kind::Int, Kind::Int],
        )
        .await?
    {
        out.entry(r.text(0)).or_default().push(ArrearsPeriod {
            began: r.int(1),
            cleared: r.opt_int(2),
        });
    }
    Ok(out)
}

/// Records the frozen and released transitions (up to `at`) of pay-per-use resources whose account
/// is or was in arrears. Both jobs call it, so a transition is in the outbox by the first run after it.
pub(crate) async fn ppu_arrears_transitions(tx: &mut Tx, zone: &BillingZone, at: i64) -> Result<usize> {
    let periods = arrears_periods(tx).await?;
    if periods.is_empty() {
        return Ok(0);
    }
    let tiers: HashMap<String, (i64, i64)> = tx
        .rows(
            "SELECT id, grace_days, retention_days FROM accounts WHERE id IN (SELECT account_id FROM arrears_periods)",
            vec![],
            &[Kind::Text, Kind::Int, Kind::Int],
        )
        .await?
        .iter()
        .map(|r| (r.text(0), (r.int(1), r.int(2))))
        .collect();
    let rows = tx
        .rows(
            "SELECT id, account_id, created_at, deleted_at, ppu_from FROM resources WHERE (mode = 'pay_per_use' OR ppu_from IS NOT NULL) \
             AND released_at IS NULL AND account_id IN (SELECT account_id FROM arrears_periods) ORDER BY id",
            vec![],
            &[Kind::Text, Kind::Text, Kind::Int, Kind::Int, Kind::Int],
        )
        .await?;
    let mut n = 0;
    for r in rows {
        let (id, account_id) = (r.text(0), r.text(1));
        let start = r.opt_int(4).unwrap_or(r.int(2)).max(r.int(2));
        let end = r.opt_int(3).unwrap_or(i64::MAX);
        let Some(&(grace, retention)) = tiers.get(&account_id) else {
            continue;
        };
        let trs = resource_arrears_transitions(zone, &periods[&account_id], grace, retention, start, end);
        for tr in trs.iter().filter(|t| t.at <= at) {
            let Some(kind) = transition_kind(tr.state) else { continue };
            let notice = Notice {
                key: json!([kind, id, tr.at]).to_string(),
                kind,
                account_id: account_id.clone(),
                resource_id: Some(id.clone()),
                at: tr.at,
                ..Default::default()
            };
            n += notify_event(tx, notice).await? as usize;
            if tr.state == State::Released {
                tx.exec(
                    "UPDATE resources SET released_at = $2 WHERE id = $1 AND released_at IS NULL",
                    vec![id.clone().into(), tr.at.into()],
                )
                .await?;
            }
        }
    }
    Ok(n)
}

fn input(msg: String) -> anyhow::Error {
    InputError(msg).into()
}

async fn one_subscription(tx: &mut Tx, resource: &str) -> Result<Subscription> {
    let subs = subscriptions(tx, Some(resource), None, None, None).await?;
    match subs.into_iter().next() {
        Some(s) => Ok(s),
        None => {
            let exists = !tx
                .rows("SELECT id FROM resources WHERE id = $1", vec![resource.into()], &[Kind::Text])
                .await?
                .is_empty();
            Err(input(if exists {
                format!(
                    "RESOURCE: {resource:?} is pay_per_use; only yearly/monthly subscriptions can be renewed, unsubscribed or converted"
                )
            } else {
                format!("RESOURCE: no resource {resource:?}")
            }))
        }
    }
}

fn released_at(zone: &BillingZone, sub: &Subscription, account: &crate::billing::model::Account) -> i64 {
    sub.released_at
        .unwrap_or(expiry_transitions(zone, sub.expires_on(), account.grace_days, account.retention_days)[2].at)
}

/// `billrun renew RESOURCE --periods N --at T`: pays N periods from the old expiry; restores a
/// resource that is expired or frozen to running.
pub async fn renew(db: &Db, zone: &BillingZone, resource: &str, periods: i64, at: i64) -> Result<LedgerLine> {
    if !(1..=120).contains(&periods) {
        return Err(input(format!("--periods: {periods} is not between 1 and 120")));
    }
    let mut tx = db.begin().await?;
    // a package's renewal may re-open settled hours: the horizon lock comes before the account's
    let horizon = crate::store::world::dirty_horizon(&mut tx).await?;
    let mut sub = one_subscription(&mut tx, resource).await?;
    let plan = plan(&mut tx, &sub.plan_id).await?;
    let mut book = book(&mut tx, &sub.account_id).await?;
    if sub.ppu_from.is_some_and(|p| p <= at) || (sub.ppu_at_expiry && sub.cycle_end(zone) <= at) {
        return Err(input(format!("RESOURCE: {resource:?} has been changed to pay-per-use")));
    }
    if released_at(zone, &sub, &book.account) <= at {
        return Err(input(format!("RESOURCE: {resource:?} was released; it cannot be renewed")));
    }
    let unit = unit_price(&plan, &sub).map_err(|e| anyhow!(e))?;
    let list = periods_amount(unit, periods, sub.quantity)?;
    let due = crate::billing::money::amount_due(list);
    if book.account.in_arrears_since.is_some() {
        return Err(input(format!(
            "renew refused: account {} is in arrears (balance {})",
            sub.account_id,
            fmt_cents(book.account.balance)
        )));
    }
    if book.account.balance < due {
        return Err(input(format!(
            "renew refused: balance {} is short of the price {}",
            fmt_cents(book.account.balance),
            fmt_cents(due)
        )));
    }
    let start = sub.cycle_end(zone);
    let months = period_months(&plan, &sub) * periods as u32;
    // cycles renewed in hours already settled (a renewal while expired) cover their counts from now
    if let Some((serves, from, to)) = crate::store::packages::add_cycles(&mut tx, zone, &plan, &sub, sub.months_paid, periods, at).await? {
        let hours = crate::store::packages::counted_hours(&mut tx, zone, &serves, from, to, horizon).await?;
        crate::store::world::mark_hours(&mut tx, hours).await?;
    }
    sub.months_paid += months;
    sub.ppu_at_expiry = false;
    let new_expiry = sub.expires_on();
    let mut events = Vec::new();
    let line = post_prepaid(
        PrepaidCharge {
            kind: TransactionType::Renewal,
            sub: &sub,
            plan: &plan,
            periods,
            period_start: start,
            period_end: sub.cycle_end(zone),
            list_amount: list,
            at,
            run_job: "renew",
            line_key: renewal_key(&sub.id, new_expiry),
            renews_to: Some(new_expiry),
            explain: charge_explain(&plan, &sub, unit, periods, months, list),
        },
        &mut book,
        &mut events,
    );
    ledger::post_lines(&mut tx, std::slice::from_ref(&line)).await?;
    save_subscription(&mut tx, &sub).await?;
    save_accounts(&mut tx, vec![&book.account]).await?;
    record_arrears_events(&mut tx, &events).await?;
    tx.commit().await?;
    Ok(line)
}

/// The cycles a subscription paid for, in order: its purchase and renewal lines, searched in their
/// own index (migration 17), never the whole ledger.
pub const PAID_CYCLES_SQL: &str = "SELECT period_start, period_end, list_amount, explain FROM ledger \
     WHERE resource_id = $1 AND transaction_type IN ('purchase', 'renewal') ORDER BY period_start";

/// Refund for stopping a subscription at `at`, as a negative `refund` line (None if nothing is left).
async fn refund_line(
    tx: &mut Tx,
    sub: &Subscription,
    plan: &Plan,
    book: &mut AccountBook,
    at: i64,
    job: &str,
    events: &mut Vec<ArrearsEvent>,
) -> Result<Option<LedgerLine>> {
    let rows = tx
        .rows(
            PAID_CYCLES_SQL,
            vec![sub.id.clone().into()],
            &[Kind::Int, Kind::Int, Kind::Money, Kind::Text],
        )
        .await?;
    let cycles: Vec<PaidCycle> = rows
        .iter()
        .map(|r| {
            let e: serde_json::Value = serde_json::from_str(&r.text(3)).unwrap_or_default();
            PaidCycle {
                start: r.int(0),
                end: r.int(1),
                months: e["months"].as_u64().unwrap_or(1) as u32,
                price: r.money(2),
            }
        })
        .collect();
    let (refund, until) = refund_at(sub.mode, &cycles, at)?;
    if refund <= Decimal::ZERO {
        return Ok(None);
    }
    let current = cycles.iter().find(|c| c.start <= at && at < c.end);
    let explain = json!({
        "formula": match current {
            Some(c) => {
                let rate_days = if sub.mode == BillingMode::Yearly { 365 * (c.months / 12).max(1) } else { 30 * c.months };
                format!("current cycle {} - {} / {} days x {} whole days used, plus cycles not begun in full = {}", fmt_plain(c.price), fmt_plain(c.price), rate_days, (at - c.start) / 86_400, fmt_plain(refund))
            }
            None => format!("cycles not begun, in full = {}", fmt_plain(refund)),
        },
        "cycles": cycles.iter().map(|c| json!({"start": c.start, "end": c.end, "months": c.months, "price": fmt_plain(c.price)})).collect::<Vec<_>>(),
    });
    Ok(Some(post_prepaid(
        PrepaidCharge {
            kind: TransactionType::Refund,
            sub,
            plan,
            periods: 0,
            period_start: at,
            period_end: until,
            list_amount: -refund,
            at,
            run_job: job,
            line_key: refund_key(&sub.id, at),
            renews_to: None,
            explain,
        },
        book,
        events,
    )))
}

/// `billrun unsubscribe RESOURCE --at T`: refunds what is unused and releases the resource at T.
pub async fn unsubscribe(db: &Db, zone: &BillingZone, resource: &str, at: i64) -> Result<Option<LedgerLine>> {
    let mut tx = db.begin().await?;
    let mut sub = one_subscription(&mut tx, resource).await?;
    if sub.package.is_some() {
        return Err(input(format!(
            "RESOURCE: {resource:?} is a prepaid package; packages are non-refundable (let it expire, or turn auto-renewal off)"
        )));
    }
    let plan = plan(&mut tx, &sub.plan_id).await?;
    let mut book = book(&mut tx, &sub.account_id).await?;
    if released_at(zone, &sub, &book.account) <= at {
        return Err(input(format!("RESOURCE: {resource:?} is already released")));
    }
    if sub.ppu_from.is_some_and(|p| p <= at) {
        return Err(input(format!(
            "RESOURCE: {resource:?} is billed pay-per-use now; delete it instead"
        )));
    }
    let mut events = Vec::new();
    let line = refund_line(&mut tx, &sub, &plan, &mut book, at, "unsubscribe", &mut events).await?;
    if let Some(l) = &line {
        ledger::post_lines(&mut tx, std::slice::from_ref(l)).await?;
    }
    sub.released_at = Some(at);
    sub.auto_renew = false;
    save_subscription(&mut tx, &sub).await?;
    save_accounts(&mut tx, vec![&book.account]).await?;
    record_arrears_events(&mut tx, &events).await?;
    notify_event(
        &mut tx,
        Notice {
            key: json!(["released", sub.id, at]).to_string(),
            kind: "released",
            account_id: sub.account_id.clone(),
            resource_id: Some(sub.id.clone()),
            at,
            ..Default::default()
        },
    )
    .await?;
    tx.commit().await?;
    Ok(line)
}

/// `billrun to-ppu RESOURCE --now | --at-expiry`: billed pay-per-use from T (with the unused part
/// refunded) or from the cycle end instead of entering the grace period.
pub async fn to_ppu(db: &Db, zone: &BillingZone, resource: &str, now: bool, at: i64) -> Result<(i64, Option<LedgerLine>)> {
    let mut tx = db.begin().await?;
    let mut sub = one_subscription(&mut tx, resource).await?;
    if sub.package.is_some() {
        return Err(input(format!(
            "RESOURCE: {resource:?} is a prepaid package; what exceeds it is already billed pay-per-use"
        )));
    }
    // it re-opens settled hours: the horizon lock comes before the account's (as a load takes them)
    crate::store::world::dirty_horizon(&mut tx).await?;
    let plan = plan(&mut tx, &sub.plan_id).await?;
    if !plan.hourly.contains_key(crate::billing::settle::INSTANCE_ITEM) {
        return Err(input(format!(
            "RESOURCE: plan {:?} has no hourly instance price to bill pay-per-use",
            plan.id
        )));
    }
    let mut book = book(&mut tx, &sub.account_id).await?;
    if sub.ppu_from.is_some() {
        return Err(input(format!("RESOURCE: {resource:?} is already changed to pay-per-use")));
    }
    let end = sub.cycle_end(zone);
    if released_at(zone, &sub, &book.account) <= at || end <= at {
        return Err(input(format!("RESOURCE: {resource:?} is no longer in its subscription period")));
    }
    let mut events = Vec::new();
    let (from, line) = if now {
        let line = refund_line(&mut tx, &sub, &plan, &mut book, at, "to-ppu", &mut events).await?;
        (at, line)
    } else {
        (end, None)
    };
    if let Some(l) = &line {
        ledger::post_lines(&mut tx, std::slice::from_ref(l)).await?;
    }
    crate::store::world::mark_dirty_span(&mut tx, zone, from, i64::MAX).await?;
    sub.ppu_from = Some(from);
    sub.ppu_at_expiry = !now;
    sub.auto_renew = false;
    save_subscription(&mut tx, &sub).await?;
    save_accounts(&mut tx, vec![&book.account]).await?;
    record_arrears_events(&mut tx, &events).await?;
    tx.commit().await?;
    Ok((from, line))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_daily_filter_knows_every_alert_day() {
        for days in [
            alert_days(BillingMode::Yearly),
            alert_days(BillingMode::Monthly),
            PACKAGE_ALERT_DAYS,
        ] {
            assert!(days.iter().all(|d| ALERT_DAYS_ANY.contains(d)), "{days:?}");
        }
    }
}
