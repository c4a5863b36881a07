//! One settlement run in one transaction: claim the run, read the hour's resources, usage and
//! posted lines, plan with the pure rules, post the lines and move the balances. A crash anywhere
//! leaves nothing behind; the run's row is the claim, so a second runner skips it.

use super::db::{Db, Kind, Tx};
use super::ledger;
use super::runs::{self, Claim};
use super::world::{account_of, all_plans, record_arrears_events, resource_of, save_accounts, ACCOUNT_KINDS, SETTLE_JOB};
use crate::billing::lifecycle::{arrears_transitions, unbillable_windows, ArrearsPeriod};
use crate::billing::model::{LedgerLine, MeteredResource, Plan, UsageSegment};
use crate::billing::settle::{desired_usage, post_drafts, reconcile, AccountBook, ArrearsEvent, PostedUsage, Unbillable};
use crate::billing::zone::BillingZone;
use crate::clock;
use crate::store::subscriptions::arrears_periods;
use anyhow::{anyhow, Result};
use rust_decimal::Decimal;
use std::collections::HashMap;

/// Which run this is: a scheduled run of the settle job, or an operator's `settle --hour`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SettleRun {
    pub job: String,
    /// The run's instant: the transaction time of every line it posts.
    pub at: i64,
    /// Hours this run settles (besides dirty hours, for scheduled runs).
    pub hours: Vec<i64>,
    /// Scheduled runs also re-settle every hour marked dirty and advance the watermark.
    pub scheduled: bool,
    pub dry_run: bool,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct SettleOutcome {
    /// Another runner had already done this run.
    pub skipped: bool,
    /// Runs recorded: 1, or more when a span of runs with nothing to settle was recorded at once.
    pub runs: usize,
    pub hours: Vec<i64>,
    pub lines: Vec<LedgerLine>,
    pub amount_due: Decimal,
    pub arrears_began: Vec<String>,
}

/// Settles a run's hours in one transaction. `claim` is the caller's hold on the run (None only
/// for a dry run, which changes nothing).
pub async fn settle(db: &Db, zone: &BillingZone, run: &SettleRun, claim: Option<&Claim>) -> Result<SettleOutcome> {
    let mut tx = db.begin().await?;
    let mut hours = run.hours.clone();
    let dirty: Vec<i64> = if run.scheduled {
        tx.rows("SELECT hour_start FROM dirty_hours ORDER BY hour_start", vec![], &[Kind::Int])
            .await?
            .iter()
            .map(|r| r.int(0))
            .collect()
    } else {
        vec![]
    };
    hours.extend(dirty.iter().copied());
    hours.sort_unstable();
    hours.dedup();

    let plans = all_plans(&mut tx).await?;
    let periods = arrears_periods(&mut tx).await?;
    let mut books: HashMap<String, AccountBook> = HashMap::new();
    let mut events: Vec<ArrearsEvent> = Vec::new();
    let mut out = SettleOutcome {
        hours: hours.clone(),
        runs: 1,
        ..Default::default()
    };
    for &hour in &hours {
        let lines = settle_hour(&mut tx, zone, hour, &plans, &mut books, &mut events, run, &periods).await?;
        out.amount_due += lines.iter().map(|l| l.amount_due).sum::<Decimal>();
        out.lines.extend(lines);
    }
    out.arrears_began = events
        .iter()
        .filter_map(|e| {
            if let ArrearsEvent::Began { account_id, .. } = e {
                Some(account_id.clone())
            } else {
                None
            }
        })
        .collect();
    if run.dry_run {
        tx.rollback().await?;
        return Ok(out);
    }
    ledger::post_lines(&mut tx, &out.lines).await?;
    let changed: Vec<_> = books.values().filter(|b| b.changed).map(|b| &b.account).collect();
    save_accounts(&mut tx, changed).await?;
    record_arrears_events(&mut tx, &events).await?;
    if run.scheduled {
        crate::store::subscriptions::ppu_arrears_transitions(&mut tx, zone, run.at).await?;
        for h in &dirty {
            tx.exec("DELETE FROM dirty_hours WHERE hour_start = $1", vec![(*h).into()]).await?;
        }
        if let Some(&last) = run.hours.iter().max() {
            tx.exec(
                "INSERT INTO job_state (job, watermark) VALUES ($1, $2) ON CONFLICT (job) DO UPDATE SET watermark = excluded.watermark WHERE job_state.watermark < excluded.watermark",
                vec![SETTLE_JOB.into(), last.into()],
            )
            .await?;
        }
    } else {
        for h in &run.hours {
            tx.exec("DELETE FROM dirty_hours WHERE hour_start = $1", vec![(*h).into()]).await?;
        }
    }
    let claim = claim.ok_or_else(|| anyhow!("a settle run that posts must hold its claim"))?;
    runs::finish(&mut tx, claim, out.lines.len(), out.amount_due, serde_json::json!({"hours": hours})).await?;
    tx.commit().await?;
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
async fn settle_hour(
    tx: &mut Tx,
    zone: &BillingZone,
    hour: i64,
    plans: &HashMap<String, Plan>,
    books: &mut HashMap<String, AccountBook>,
    events: &mut Vec<ArrearsEvent>,
    run: &SettleRun,
    periods: &HashMap<String, Vec<ArrearsPeriod>>,
) -> Result<Vec<LedgerLine>> {
    let end = zone.next_hour(hour);
    // pay-per-use from creation (or from a change to pay-per-use) until deletion or release
    let resources: HashMap<String, MeteredResource> = tx
        .rows(
            "SELECT id, account_id, plan_id, quantity, created_at, deleted_at, ppu_from, released_at FROM resources \
             WHERE (mode = 'pay_per_use' OR ppu_from IS NOT NULL) AND created_at < $2 AND (ppu_from IS NULL OR ppu_from < $2) \
             AND (deleted_at IS NULL OR deleted_at > $1) AND (released_at IS NULL OR released_at > $1)",
            vec![hour.into(), end.into()],
            &[
                Kind::Text,
                Kind::Text,
                Kind::Text,
                Kind::Int,
                Kind::Int,
                Kind::Int,
                Kind::Int,
                Kind::Int,
            ],
        )
        .await?
        .iter()
        .map(|r| {
            let mut m = resource_of(r);
            if let Some(from) = r.opt_int(6) {
                m.created_at = m.created_at.max(from);
            }
            if let Some(released) = r.opt_int(7) {
                m.deleted_at = Some(m.deleted_at.map_or(released, |d| d.min(released)));
            }
            (m.id.clone(), m)
        })
        .collect();
    let segments: Vec<UsageSegment> = tx
        .rows(
            "SELECT resource_id, item, quantity, from_at, to_at FROM usage_segments WHERE superseded = 0 AND from_at < $2 AND to_at > $1",
            vec![hour.into(), end.into()],
            &[Kind::Text, Kind::Text, Kind::Money, Kind::Int, Kind::Int],
        )
        .await?
        .iter()
        .map(|r| UsageSegment {
            resource_id: r.text(0),
            item: r.text(1),
            quantity: r.money(2),
            from: r.int(3),
            to: r.int(4),
        })
        .collect();
    let posted_lines = ledger::hour_lines(tx, hour).await?;
    // the accounts of the hour, read once per run; later hours of the run continue from their balance
    let mut account_ids: Vec<String> = resources
        .values()
        .map(|r| r.account_id.clone())
        .chain(posted_lines.iter().map(|l| l.account_id.clone()))
        .filter(|a| !books.contains_key(a))
        .collect();
    account_ids.sort();
    account_ids.dedup();
    for r in tx
        .rows_in(
            "SELECT id, currency, balance, in_arrears_since, grace_days, retention_days FROM accounts WHERE id IN",
            &account_ids,
            "",
            ACCOUNT_KINDS,
        )
        .await?
    {
        let a = account_of(&r);
        books.insert(a.id.clone(), AccountBook::new(a));
    }
    // an account in arrears past its grace days has its pay-per-use resources frozen, then released
    let mut unbillable = Unbillable::new();
    for (account_id, list) in periods {
        let Some(book) = books.get(account_id) else { continue };
        let windows = unbillable_windows(&arrears_transitions(
            zone,
            list,
            book.account.grace_days,
            book.account.retention_days,
        ));
        if windows.is_empty() {
            continue;
        }
        for r in resources.values().filter(|r| &r.account_id == account_id) {
            unbillable.insert(r.id.clone(), windows.clone());
        }
    }
    let desired =
        desired_usage(zone, hour, plans, &resources, &segments, &unbillable).map_err(|e| anyhow!("hour {}: {e}", zone.format(hour)))?;

    let mut posted: HashMap<String, PostedUsage> = HashMap::new();
    for l in posted_lines {
        let p = PostedUsage {
            resource_id: l.resource_id.clone(),
            item: l.billing_item.clone().unwrap_or_default(),
            hour_start: hour,
            quantity: l.quantity,
            unit_price: l.unit_price,
            period_start: l.period_start,
            period_end: l.period_end,
            seconds: l.usage_seconds.unwrap_or(0),
            list_amount: l.list_amount,
            amount_due: l.amount_due,
            lines: 1,
        };
        match posted.get_mut(&l.line_key) {
            Some(acc) => acc.add(&p),
            None => {
                posted.insert(l.line_key, p);
            }
        }
    }
    let drafts = reconcile(&desired, &posted);
    if drafts.is_empty() {
        return Ok(vec![]);
    }
    let context = |id: &str| resources.get(id).and_then(|r| plans.get(&r.plan_id).map(|p| (r, p)));
    post_drafts(drafts, context, books, run.at, &run.job, events).map_err(|e| anyhow!("hour {}: {e}", zone.format(hour)))
}

/// Records a span of consecutive scheduled runs that have nothing to settle in one transaction:
/// no pay-per-use resource or usage overlaps their hours, nothing is posted there and no hour
/// awaits re-settlement. Each run still gets its own row. Returns false (and changes nothing) if
/// the span is not empty after all or another runner got to one of the runs first.
pub async fn record_empty_runs(db: &Db, zone: &BillingZone, runs: &[(i64, Vec<i64>)]) -> Result<bool> {
    let hours: Vec<i64> = runs.iter().flat_map(|(_, h)| h.iter().copied()).collect();
    let (Some(&first), Some(&last)) = (hours.iter().min(), hours.iter().max()) else {
        return Ok(false);
    };
    let end = zone.next_hour(last);
    let mut tx = db.begin().await?;
    let busy = tx
        .rows(
            "SELECT (SELECT COUNT(*) FROM resources WHERE (mode = 'pay_per_use' OR ppu_from IS NOT NULL) AND created_at < $2 \
             AND (ppu_from IS NULL OR ppu_from < $2) AND (deleted_at IS NULL OR deleted_at > $1) AND (released_at IS NULL OR released_at > $1)) \
             + (SELECT COUNT(*) FROM usage_segments WHERE superseded = 0 AND from_at < $2 AND to_at > $1) \
             + (SELECT COUNT(*) FROM dirty_hours) + (SELECT COUNT(*) FROM ledger WHERE hour_start >= $1 AND hour_start < $2)",
            vec![first.into(), end.into()],
            &[Kind::Int],
        )
        .await?[0]
        .int(0);
    if busy > 0 {
        tx.rollback().await?;
        return Ok(false);
    }
    let now = clock::wall_now();
    let rows = runs
        .iter()
        .map(|(at, h)| {
            vec![
                SETTLE_JOB.into(),
                (*at).into(),
                "ok".into(),
                now.into(),
                now.into(),
                serde_json::json!({"hours": h, "empty": true}).to_string().into(),
            ]
        })
        .collect();
    let inserted = tx
        .insert_rows(
            "job_runs",
            &["job", "scheduled_at", "outcome", "started_at", "finished_at", "detail"],
            rows,
            "ON CONFLICT (job, scheduled_at) DO NOTHING",
        )
        .await?;
    if inserted != runs.len() as u64 {
        tx.rollback().await?;
        return Ok(false);
    }
    tx.exec(
        "INSERT INTO job_state (job, watermark) VALUES ($1, $2) ON CONFLICT (job) DO UPDATE SET watermark = excluded.watermark WHERE job_state.watermark < excluded.watermark",
        vec![SETTLE_JOB.into(), last.into()],
    )
    .await?;
    let last_run = runs.last().map(|(at, _)| *at).unwrap_or(end);
    crate::store::subscriptions::ppu_arrears_transitions(&mut tx, zone, last_run).await?;
    tx.commit().await?;
    Ok(true)
}
