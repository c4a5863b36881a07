//! Prepaid package cycles and count records in the database: the cycles a purchase or renewal
//! pays for, the quota a settlement chunk draws from, and the hours that late changes re-open.

use super::db::{Kind, Tx, Val};
use super::settle::{range_sql, ChunkRange};
use crate::billing::lifecycle::{add_months, cycle_end};
use crate::billing::model::Plan;
use crate::billing::packages::CycleQuota;
use crate::billing::prepaid::Subscription;
use crate::billing::zone::BillingZone;
use anyhow::{anyhow, Result};
use std::collections::{BTreeSet, HashMap};

/// Records the cycles `periods` periods of a package pay for, after the `months_before` months
/// already paid: each holds the package's quota and may be drawn from `paid_at` on (or from its
/// start, if paid before it). Returns the resource the package serves and the span [from, to)
/// its new cycles may be drawn in: settled hours with count records there must be re-settled
/// (`counted_hours`). Does nothing for a subscription that is not a package.
pub(crate) async fn add_cycles(
    tx: &mut Tx,
    zone: &BillingZone,
    plan: &Plan,
    sub: &Subscription,
    months_before: u32,
    periods: i64,
    paid_at: i64,
) -> Result<Option<(String, i64, i64)>> {
    let (Some(kind), Some(serves)) = (&sub.package, &sub.serves) else {
        return Ok(None);
    };
    let terms = plan
        .packages
        .get(kind)
        .ok_or_else(|| anyhow!("plan {} has no package {kind:?}", plan.id))?;
    let m = terms.months;
    let first = months_before / m;
    let mut rows = Vec::new();
    let mut span = (i64::MAX, i64::MIN);
    for k in first..first + periods as u32 {
        let start = if k == 0 {
            sub.purchased_at
        } else {
            cycle_end(zone, add_months(sub.anchor, k * m))
        };
        let end = cycle_end(zone, add_months(sub.anchor, (k + 1) * m));
        let valid_from = start.max(paid_at);
        span = (span.0.min(valid_from), span.1.max(end));
        rows.push(vec![
            Val::from(sub.id.clone()),
            (k as i64).into(),
            start.into(),
            end.into(),
            valid_from.into(),
            terms.quantity.into(),
        ]);
    }
    tx.insert_rows(
        "package_cycles",
        &["package_id", "cycle", "start_at", "end_at", "valid_from", "quota"],
        rows,
        "",
    )
    .await?;
    Ok(Some((serves.clone(), span.0, span.1)))
}

/// The hours up to the settle horizon `horizon` (see `world::dirty_horizon`) in [from, to) in
/// which `resource` has count records: what they may draw from packages changed.
pub(crate) async fn counted_hours(
    tx: &mut Tx,
    zone: &BillingZone,
    resource: &str,
    from: i64,
    to: i64,
    horizon: Option<i64>,
) -> Result<BTreeSet<i64>> {
    let Some(w) = horizon else {
        return Ok(BTreeSet::new());
    };
    let to = to.min(zone.next_hour(w));
    Ok(tx
        .rows(
            "SELECT at FROM usage_counts WHERE resource_id = $1 AND at >= $2 AND at < $3 AND superseded = 0",
            vec![resource.into(), from.into(), to.into()],
            &[Kind::Int],
        )
        .await?
        .iter()
        .map(|r| zone.hour_start(r.int(0)))
        .collect())
}

/// The package cycles of the accounts in `range` that overlap [from, to), by (resource served,
/// item): what a settlement chunk draws from.
pub(crate) async fn chunk_cycles(
    tx: &mut Tx,
    plans: &HashMap<String, Plan>,
    range: ChunkRange<'_>,
    from: i64,
    to: i64,
) -> Result<HashMap<(String, String), Vec<CycleQuota>>> {
    let (cond, extra) = range_sql(tx.backend(), "p.account_id", range, 3);
    let rows = tx
        .rows(
            sqlx::AssertSqlSafe(format!(
                "SELECT c.package_id, p.serves, p.plan_id, p.package, c.cycle, c.start_at, c.end_at, c.valid_from, c.quota, c.used \
                 FROM package_cycles c JOIN resources p ON p.id = c.package_id WHERE c.end_at > $1 AND c.start_at < $2{cond} \
                 ORDER BY c.package_id, c.cycle"
            )),
            [vec![from.into(), to.into()], extra].concat(),
            &[
                Kind::Text,
                Kind::Text,
                Kind::Text,
                Kind::Text,
                Kind::Int,
                Kind::Int,
                Kind::Int,
                Kind::Int,
                Kind::Money,
                Kind::Money,
            ],
        )
        .await?;
    let mut out: HashMap<(String, String), Vec<CycleQuota>> = HashMap::new();
    for r in rows {
        let (plan_id, kind) = (r.text(2), r.text(3));
        let item = plans
            .get(&plan_id)
            .and_then(|p| p.packages.get(&kind))
            .map(|t| t.item.clone())
            .ok_or_else(|| anyhow!("plan {plan_id} has no package {kind:?}"))?;
        let c = CycleQuota {
            package_id: r.text(0),
            serves: r.text(1),
            item,
            cycle: r.int(4),
            start: r.int(5),
            end: r.int(6),
            valid_from: r.int(7),
            quota: r.money(8),
            used: r.money(9),
        };
        out.entry((c.serves.clone(), c.item.clone())).or_default().push(c);
    }
    Ok(out)
}

/// Writes back what a chunk drew from each cycle.
pub(crate) async fn save_cycles<'a>(tx: &mut Tx, cycles: impl Iterator<Item = &'a CycleQuota>) -> Result<()> {
    for c in cycles {
        tx.exec(
            "UPDATE package_cycles SET used = $3 WHERE package_id = $1 AND cycle = $2",
            vec![c.package_id.clone().into(), c.cycle.into(), c.used.into()],
        )
        .await?;
    }
    Ok(())
}

/// The count records of the accounts in `range` in [hour, end): (resource, item, at, units).
pub(crate) async fn hour_counts(
    tx: &mut Tx,
    hour: i64,
    end: i64,
    range: ChunkRange<'_>,
) -> Result<Vec<(String, String, i64, rust_decimal::Decimal)>> {
    let (cond, extra) = range_sql(tx.backend(), "r.account_id", range, 3);
    Ok(tx
        .rows(
            sqlx::AssertSqlSafe(format!(
                "SELECT c.resource_id, c.item, c.at, c.quantity FROM usage_counts c JOIN resources r ON r.id = c.resource_id \
                 WHERE c.superseded = 0 AND c.at >= $1 AND c.at < $2{cond}"
            )),
            [vec![hour.into(), end.into()], extra].concat(),
            &[Kind::Text, Kind::Text, Kind::Int, Kind::Money],
        )
        .await?
        .iter()
        .map(|r| (r.text(0), r.text(1), r.int(2), r.money(3)))
        .collect())
}
