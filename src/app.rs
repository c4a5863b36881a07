//! What each command does, as library functions over an open database: the CLI and the tests call
//! these, so the tests drive exactly what an operator runs.

use crate::billing::lifecycle::{expiry_transitions, resource_arrears_transitions, state_at, State};
use crate::billing::model::LedgerLine;
use crate::billing::money::{fmt_amount, fmt_cents};
use crate::billing::zone::{parse_instant, BillingZone};
use crate::config::Config;
use crate::error::InputError;
use crate::fixture::parse_document;
use crate::jobs::settle::{self as settle_job, Schedule};
use crate::jobs::{self, JobRun, Step};
use crate::store::db::{Db, Kind};
use crate::store::settle::{Limits, Progress, SettleOutcome, SettleRun};
use crate::store::world::{self, LoadSummary, SETTLE_JOB};
use crate::store::{ledger, schema, subscriptions};
use anyhow::{Context, Result};
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::json;

/// An open, migrated database with its billing zone.
pub struct Billing {
    pub db: Db,
    pub zone: BillingZone,
    pub settle: Schedule,
    /// How long a claim on a run lasts without renewal.
    pub lease_seconds: i64,
    /// Where notifications are delivered.
    pub sinks: crate::delivery::Sinks,
}

impl Billing {
    pub async fn open(cfg: &Config) -> Result<Billing> {
        let db = Db::connect_with_lease(&cfg.database_url, cfg.lease_seconds).await?;
        schema::migrate(&db).await.context("migrating the schema")?;
        let zone = schema::billing_zone(&db, cfg.timezone.as_ref()).await?;
        Ok(Billing {
            db,
            zone,
            settle: cfg.settle.clone(),
            lease_seconds: cfg.lease_seconds,
            sinks: cfg.sinks.clone(),
        })
    }

    pub fn fmt(&self, t: i64) -> String {
        self.zone.format(t)
    }

    /// Loads fixture files, all or nothing.
    pub async fn load_files(&self, paths: &[std::path::PathBuf]) -> Result<LoadSummary> {
        let mut docs = Vec::new();
        for p in paths {
            let name = p.display().to_string();
            let text = std::fs::read_to_string(p).map_err(|e| InputError(format!("{name}: cannot read: {e}")))?;
            docs.push((name.clone(), parse_document(&name, &text)?));
        }
        self.load_texts(docs).await
    }

    pub async fn load_json(&self, name: &str, text: &str) -> Result<LoadSummary> {
        self.load_texts(vec![(name.to_string(), parse_document(name, text)?)]).await
    }

    async fn load_texts(&self, docs: Vec<(String, crate::fixture::Document)>) -> Result<LoadSummary> {
        world::load_documents(&self.db, &self.zone, &docs).await
    }

    /// Runs every job due up to `now`, oldest first across jobs, each at its own scheduled instant.
    pub async fn tick(&self, now: i64, mut on_run: impl FnMut(i64, &JobRun)) -> Result<CatchUp> {
        let mut total = CatchUp::default();
        while !crate::shutdown::requested() {
            match jobs::step(&self.db, &self.zone, &self.settle, self.lease_seconds, now).await? {
                Step::Ran(at, run) => {
                    total.add(&run);
                    on_run(at, &run);
                }
                Step::Held {
                    job,
                    at,
                    owner,
                    lease_until,
                } => {
                    // runs are done in order: wait for the holder to finish, or for its lease to expire
                    tracing::info!(job, run = %self.fmt(at), owner, lease_until = %self.fmt(lease_until), "waiting for another runner");
                    total.waited += 1;
                    crate::shutdown::pause(std::time::Duration::from_millis(100)).await;
                }
                Step::Interrupted | Step::Idle => break,
            }
        }
        total.interrupted = crate::shutdown::requested();
        let delivered = crate::delivery::deliver_pending(&self.db, &self.zone, &self.sinks).await?;
        total.delivered = delivered.delivered;
        total.delivery_failures = delivered.failed;
        self.record_caught_up_to(now).await?;
        Ok(total)
    }

    /// Remembers the instant the jobs were caught up to: what `status` describes.
    pub async fn record_caught_up_to(&self, now: i64) -> Result<()> {
        self.db
            .exec(
                "INSERT INTO meta (key, value) VALUES ('last_tick_now', $1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                vec![now.to_string().into()],
            )
            .await?;
        Ok(())
    }

    /// One-off (re)settlement of the hour starting at `hour`, posted at `at`.
    pub async fn settle_hour(&self, hour: i64, at: i64, dry_run: bool) -> Result<SettleOutcome> {
        if self.zone.hour_start(hour) != hour {
            return Err(InputError(format!(
                "--hour: {} is not the start of a billing hour in {}",
                self.fmt(hour),
                self.zone
            ))
            .into());
        }
        if self.zone.next_hour(hour) > at {
            return Err(InputError(format!("--hour: the hour {} has not ended by {}", self.fmt(hour), self.fmt(at))).into());
        }
        let run = SettleRun {
            job: format!("settle-hour:{}", self.fmt(hour)),
            at,
            hours: vec![hour],
            scheduled: false,
            dry_run,
        };
        let limits = Limits {
            chunk_resources: self.settle.chunk_resources,
            lease_seconds: self.lease_seconds,
            workers: self.settle.chunk_workers,
            parts: self.settle.chunk_parts,
        };
        loop {
            match crate::store::settle::run(&self.db, &self.zone, &run, limits).await? {
                Progress::Done(o) => return Ok(o),
                Progress::Interrupted(_) => anyhow::bail!("{} at {}: stopped by a signal; run it again to finish", run.job, self.fmt(at)),
                Progress::Held { job, owner, lease_until } => {
                    // another runner is on a part of it: wait for it, or for its lease to expire
                    tracing::info!(job, owner, lease_until = %self.fmt(lease_until), "waiting for another runner");
                    crate::shutdown::pause(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }

    pub async fn topup(&self, account: &str, amount: &str, at: i64) -> Result<Decimal> {
        let amount = crate::fixture::parse_decimal(amount, 2).map_err(|e| InputError(format!("AMOUNT: {e}")))?;
        if amount <= Decimal::ZERO {
            return Err(InputError("AMOUNT: a top-up must be positive".into()).into());
        }
        world::topup(&self.db, account, amount, at).await
    }

    pub async fn export<W: std::io::Write>(&self, filter: &ledger::ExportFilter, out: W) -> Result<u64> {
        crate::export::export(&self.db, &self.zone, filter, out).await
    }

    /// How one bill line came to be.
    pub async fn explain(&self, transaction_id: &str) -> Result<Explanation> {
        let line = ledger::line(&self.db, transaction_id)
            .await?
            .ok_or_else(|| InputError(format!("TRANSACTION_ID: no transaction {transaction_id:?}")))?;
        let stored: serde_json::Value = serde_json::from_str(&line.explain).context("stored explanation")?;
        let inputs = crate::billing::settle::expand_explain(&line, stored);
        Ok(Explanation {
            text: explain_text(self, &line, &inputs),
            json: explain_json(self, &line, inputs),
        })
    }

    /// The instant `status` describes: the last `tick --now`, else the wall clock.
    pub async fn as_of(&self) -> Result<i64> {
        let r = self
            .db
            .rows("SELECT value FROM meta WHERE key = 'last_tick_now'", vec![], &[Kind::Text])
            .await?;
        Ok(match r.first() {
            Some(r) => r.text(0).parse()?,
            None => crate::clock::wall_now(),
        })
    }

    pub async fn status(&self) -> Result<Status> {
        let as_of = self.as_of().await?;
        let accounts = self
            .db
            .rows(
                "SELECT id, balance, in_arrears_since FROM accounts ORDER BY id",
                vec![],
                &[Kind::Text, Kind::Money, Kind::Int],
            )
            .await?
            .iter()
            .map(|r| AccountStatus {
                id: r.text(0),
                balance: fmt_cents(r.money(1)),
                in_arrears_since: r.opt_int(2).map(|t| self.fmt(t)),
            })
            .collect();
        let resources = self.resource_states(as_of).await?;
        // chunk rows (`<job>#NNNNN`) are parts of a run, not jobs of their own
        let jobs = self
            .db
            .rows(
                "SELECT CASE WHEN job LIKE 'settle-hour:%' THEN 'settle-hour' ELSE job END AS j, MAX(scheduled_at), COUNT(*), \
                 SUM(CASE WHEN outcome = 'ok' THEN 0 ELSE 1 END) FROM job_runs WHERE job NOT LIKE '%#%' GROUP BY j ORDER BY j",
                vec![],
                &[Kind::Text, Kind::Int, Kind::Int, Kind::Int],
            )
            .await?;
        let mut job_status = Vec::new();
        for r in &jobs {
            let job = r.text(0);
            let last = r.int(1);
            let outcome = self
                .db
                .rows(
                    "SELECT outcome FROM job_runs WHERE (job = $1 OR ($1 = 'settle-hour' AND job LIKE 'settle-hour:%')) AND scheduled_at = $2 LIMIT 1",
                    vec![job.clone().into(), last.into()],
                    &[Kind::Text],
                )
                .await?
                .first()
                .map(|r| r.text(0))
                .unwrap_or_default();
            job_status.push(JobStatus {
                job,
                last_scheduled_at: Some(self.fmt(last)),
                last_outcome: Some(outcome),
                runs: r.int(2),
                failures: r.int(3),
            });
        }
        for job in [subscriptions::DAILY_JOB, SETTLE_JOB] {
            if !job_status.iter().any(|j| j.job == job) {
                job_status.insert(
                    0,
                    JobStatus {
                        job: job.into(),
                        last_scheduled_at: None,
                        last_outcome: None,
                        runs: 0,
                        failures: 0,
                    },
                );
            }
        }
        let st = settle_job::state(&self.db).await?;
        let dirty = self.db.rows("SELECT COUNT(*) FROM dirty_hours", vec![], &[Kind::Int]).await?[0].int(0);
        Ok(Status {
            as_of: self.fmt(as_of),
            timezone: self.zone.name(),
            accounts,
            resources,
            jobs: job_status,
            settle: SettleStatus {
                last_hour_settled: st.watermark.map(|t| self.fmt(t)),
                next_run: settle_job::next_run(&self.zone, &self.settle, &st).map(|t| self.fmt(t)),
                hours_awaiting_resettlement: dirty,
            },
        })
    }

    /// Every resource's state at `t`: states are functions of time, whichever run recorded them.
    pub async fn resource_states(&self, t: i64) -> Result<Vec<ResourceStatus>> {
        let accounts: std::collections::HashMap<String, (i64, i64)> = self
            .db
            .rows(
                "SELECT id, grace_days, retention_days FROM accounts",
                vec![],
                &[Kind::Text, Kind::Int, Kind::Int],
            )
            .await?
            .iter()
            .map(|r| (r.text(0), (r.int(1), r.int(2))))
            .collect();
        let mut tx = self.db.begin().await?;
        let periods = subscriptions::arrears_periods(&mut tx).await?;
        tx.rollback().await?;
        let rows = self
            .db
            .rows(
                "SELECT id, account_id, mode, created_at, deleted_at, expires_on, ppu_from, ppu_at_expiry, released_at, package, serves \
                 FROM resources ORDER BY id",
                vec![],
                &[
                    Kind::Text,
                    Kind::Text,
                    Kind::Text,
                    Kind::Int,
                    Kind::Int,
                    Kind::Text,
                    Kind::Int,
                    Kind::Int,
                    Kind::Int,
                    Kind::Text,
                    Kind::Text,
                ],
            )
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let (id, account_id, mode) = (r.text(0), r.text(1), r.text(2));
            let (grace, retention) = accounts.get(&account_id).copied().unwrap_or((15, 15));
            let expires_on = r.opt_text(5);
            let ppu_from = r.opt_int(6).filter(|p| *p <= t);
            let state = if r.opt_int(8).is_some_and(|x| x <= t) {
                State::Released
            } else if mode == "pay_per_use" || ppu_from.is_some() {
                if r.opt_int(4).is_some_and(|d| d <= t) {
                    State::Deleted
                } else {
                    let periods = periods.get(&account_id).map(|v| v.as_slice()).unwrap_or(&[]);
                    let start = ppu_from.unwrap_or(r.int(3)).max(r.int(3));
                    state_at(
                        &resource_arrears_transitions(&self.zone, periods, grace, retention, start, i64::MAX),
                        t,
                    )
                }
            } else {
                let date = chrono::NaiveDate::parse_from_str(expires_on.as_deref().unwrap_or_default(), "%Y-%m-%d")
                    .context("stored expires_on")?;
                state_at(&expiry_transitions(&self.zone, date, grace, retention), t)
            };
            out.push(ResourceStatus {
                id,
                account_id,
                mode: if ppu_from.is_some() { "pay_per_use".to_string() } else { mode },
                state: state.as_str().to_string(),
                expires_on: if ppu_from.is_some() { None } else { expires_on },
                package: r.opt_text(9),
                serves: r.opt_text(10),
            });
        }
        Ok(out)
    }

    pub async fn renew(&self, resource: &str, periods: i64, at: i64) -> Result<LedgerLine> {
        subscriptions::renew(&self.db, &self.zone, resource, periods, at).await
    }

    pub async fn unsubscribe(&self, resource: &str, at: i64) -> Result<Option<LedgerLine>> {
        subscriptions::unsubscribe(&self.db, &self.zone, resource, at).await
    }

    pub async fn to_ppu(&self, resource: &str, now: bool, at: i64) -> Result<(i64, Option<LedgerLine>)> {
        subscriptions::to_ppu(&self.db, &self.zone, resource, now, at).await
    }

    pub async fn notifications(&self, account: Option<&str>) -> Result<Vec<serde_json::Value>> {
        // one account's (an empty id names none, as an empty resource id does) or every one; plain
        // conditions, so that one account's are searched in its index
        const COLUMNS: &str = "SELECT kind, account_id, resource_id, at, days_before, expires_on, reason, delivery FROM notifications";
        const ORDER: &str = "ORDER BY at, kind, resource_id, event_key";
        let (sql, args) = match account {
            Some(a) => (format!("{COLUMNS} WHERE account_id = $1 {ORDER}"), vec![a.into()]),
            None => (format!("{COLUMNS} {ORDER}"), vec![]),
        };
        let rows = self
            .db
            .rows(
                sqlx::AssertSqlSafe(sql),
                args,
                &[
                    Kind::Text,
                    Kind::Text,
                    Kind::Text,
                    Kind::Int,
                    Kind::Int,
                    Kind::Text,
                    Kind::Text,
                    Kind::Text,
                ],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let mut j = crate::delivery::notification_json(&self.zone, r, 0);
                j["delivery"] = json!(r.text(7));
                j
            })
            .collect())
    }
}

/// Totals of a catch-up.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CatchUp {
    pub settle_runs: usize,
    pub daily_runs: usize,
    pub skipped: usize,
    pub lines: usize,
    pub amount_due: Decimal,
    pub renewals: usize,
    pub renewal_failures: usize,
    pub transitions: usize,
    pub alerts: usize,
    pub arrears_began: Vec<String>,
    /// Times the catch-up waited for a run held by another runner.
    pub waited: usize,
    /// Stopped early by SIGTERM/SIGINT (after a whole run).
    pub interrupted: bool,
    pub delivered: usize,
    pub delivery_failures: usize,
}

impl CatchUp {
    fn add(&mut self, run: &JobRun) {
        if run.skipped() {
            self.skipped += 1;
            return;
        }
        match run {
            JobRun::Settle(o) => {
                self.settle_runs += o.runs;
                self.lines += o.lines;
                self.amount_due += o.amount_due;
                self.arrears_began.extend(o.arrears_began.iter().cloned());
            }
            JobRun::Daily(o) => {
                self.daily_runs += 1;
                self.lines += o.lines;
                self.amount_due += o.amount_due;
                self.renewals += o.renewals;
                self.renewal_failures += o.renewal_failures;
                self.transitions += o.transitions;
                self.alerts += o.alerts;
            }
        }
    }
}

/// Parses an instant given on the command line, naming the flag on error.
pub fn cli_instant(flag: &str, s: &str) -> Result<i64, InputError> {
    parse_instant(s).map_err(|e| InputError(format!("{flag}: {e}")))
}

#[derive(Debug, Serialize)]
pub struct AccountStatus {
    pub id: String,
    pub balance: String,
    pub in_arrears_since: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ResourceStatus {
    pub id: String,
    pub account_id: String,
    pub mode: String,
    pub state: String,
    pub expires_on: Option<String>,
    /// For a prepaid package: its kind and the resource whose units it covers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub package: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serves: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct JobStatus {
    pub job: String,
    pub last_scheduled_at: Option<String>,
    pub last_outcome: Option<String>,
    pub runs: i64,
    pub failures: i64,
}

#[derive(Debug, Serialize)]
pub struct SettleStatus {
    pub last_hour_settled: Option<String>,
    pub next_run: Option<String>,
    pub hours_awaiting_resettlement: i64,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub as_of: String,
    pub timezone: String,
    pub accounts: Vec<AccountStatus>,
    pub resources: Vec<ResourceStatus>,
    pub jobs: Vec<JobStatus>,
    pub settle: SettleStatus,
}

pub struct Explanation {
    pub text: String,
    pub json: serde_json::Value,
}

fn run_label(b: &Billing, l: &LedgerLine) -> String {
    match l.run_job.strip_prefix("settle-hour:") {
        Some(hour) => format!("settle --hour {hour} --at {}", b.fmt(l.run_at)),
        None => format!("{} run scheduled at {}", l.run_job, b.fmt(l.run_at)),
    }
}

fn explain_text(b: &Billing, l: &LedgerLine, inputs: &serde_json::Value) -> String {
    let mut s = String::new();
    let hour = l
        .hour_start
        .map(|h| format!(", billing hour {} to {}", b.fmt(h), b.fmt(b.zone.next_hour(h))))
        .unwrap_or_default();
    s.push_str(&format!(
        "{} — {} line of {} posted at {}\n",
        l.transaction_id,
        l.transaction_type.as_str(),
        l.account_id,
        b.fmt(l.transaction_time)
    ));
    s.push_str(&format!(
        "resource {} ({} plan {}, {}), item {}{}\n",
        l.resource_id,
        l.product,
        l.plan_id,
        l.billing_mode.as_str(),
        l.billing_item.as_deref().unwrap_or("-"),
        hour
    ));
    let corrected = inputs.get("corrected");
    if let Some(posted) = inputs.get("posted") {
        let used = match posted.get("units") {
            Some(u) => format!("{} units", u.as_str().unwrap_or("")),
            None => format!("{} s", posted["seconds"]),
        };
        s.push_str(&format!(
            "already posted for this hour: {} line(s), {used}, list {}, due {}\n",
            posted["lines"],
            posted["list_amount"].as_str().unwrap_or(""),
            posted["amount_due"].as_str().unwrap_or("")
        ));
    }
    let usage = corrected.unwrap_or(inputs);
    if let Some(intervals) = usage.get("intervals").and_then(|v| v.as_array()) {
        s.push_str(if corrected.is_some() {
            "use inside the hour, corrected data:\n"
        } else {
            "use inside the hour:\n"
        });
        for i in intervals {
            s.push_str(&format!(
                "  {} to {}: {} s ({})\n",
                b.fmt(i["from"].as_i64().unwrap_or(0)),
                b.fmt(i["to"].as_i64().unwrap_or(0)),
                i["seconds"],
                i["source"].as_str().unwrap_or("")
            ));
        }
        let label = if corrected.is_some() {
            "a first settlement of the corrected data"
        } else {
            "formula"
        };
        s.push_str(&format!("{label}: {}\n", usage["formula"].as_str().unwrap_or("")));
    }
    if let Some(records) = inputs.get("records").and_then(|v| v.as_array()) {
        s.push_str("count records inside the hour:\n");
        for r in records {
            s.push_str(&format!(
                "  {}: {} units\n",
                b.fmt(r["at"].as_i64().unwrap_or(0)),
                r["units"].as_str().unwrap_or("")
            ));
        }
        if inputs.get("posted").is_none() {
            s.push_str(&format!("formula: {}\n", inputs["formula"].as_str().unwrap_or("")));
        }
    } else if usage.get("intervals").is_none() && inputs.get("posted").is_none() {
        if let Some(f) = inputs.get("formula").and_then(|v| v.as_str()) {
            s.push_str(&format!("formula: {f}\n"));
        }
    }
    if corrected.is_some() || inputs.get("posted").is_some() {
        s.push_str(&format!("list amount: {}\n", inputs["formula"].as_str().unwrap_or("")));
        if let Some(f) = inputs.get("due_formula").and_then(|v| v.as_str()) {
            s.push_str(&format!("amount due: {f}\n"));
        }
    }
    s.push_str(&format!(
        "list amount {} (rounded half-up to 8 places); amount due {} (truncated toward zero to cents); truncated {} stays on the bill\n",
        fmt_amount(l.list_amount),
        fmt_cents(l.amount_due),
        fmt_amount(l.truncated_amount)
    ));
    s.push_str(&format!(
        "paid {} from the balance, arrears {}, balance after {} {}\n",
        fmt_cents(l.paid_amount),
        fmt_cents(l.arrears_amount),
        fmt_cents(l.balance_after),
        l.currency
    ));
    s.push_str(&format!("posted by: {}\n", run_label(b, l)));
    s
}

fn explain_json(b: &Billing, l: &LedgerLine, inputs: serde_json::Value) -> serde_json::Value {
    // the CSV's fields, without the spreadsheet guard: JSON is not opened by a spreadsheet
    let record = crate::export::fields(&b.zone, l, |s| s.to_string());
    let line: serde_json::Map<String, serde_json::Value> = crate::export::COLUMNS
        .iter()
        .zip(record.iter())
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    json!({
        "transaction_id": l.transaction_id,
        "line": line,
        "inputs": inputs,
        "run": {"job": l.run_job, "scheduled_at": b.fmt(l.run_at), "label": run_label(b, l)},
    })
}
