//! `chorus audit`: check a run's ledger invariants, a line per invariant.

use std::collections::BTreeMap;

use anyhow::{Context, bail};
use chorus_orchestrator::config::RunConfig;
use chorus_orchestrator::ledger::{AuditReport, Ledger};
use clap::Args;

/// Check the ledger's invariants over one run and exit non-zero on any breach: every prompt
/// consumed or dropped once the run has ended, every consumed trajectory consumed once with its
/// prompt, each learner step trained exactly the trajectories consumed for it (a group trained
/// twice shows here), learner steps 1..N without gaps, versions increasing with steps and in
/// time (no trained token from a version newer than the one it was trained from), and every
/// trained trajectory's lag within its stage's max_staleness. One line per invariant: rows checked, breaches, the first breaches.
/// Audit runs that have ended: on a running one, prompts in flight are reported (not counted)
/// and the newest step may be caught between its rows.
///
/// Examples:
///   chorus audit                                  (the newest run of the newest runs/*/ledger.sqlite)
///   chorus audit quickstart-20261204-011918-3fa2b1c0 --db sqlite://runs/quickstart/ledger.sqlite
///   chorus audit RUN --db postgres://chorus:chorus@127.0.0.1/chorus --json
///   chorus audit --all --db sqlite://runs/quickstart/ledger.sqlite
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct AuditArgs {
    /// Run id (see `chorus inspect runs`; default: the newest run in the ledger).
    #[arg(conflicts_with = "all")]
    run: Option<String>,
    /// Audit every run in the ledger.
    #[arg(long)]
    all: bool,
    /// Ledger database: sqlite://PATH or postgres://… (default: the newest runs/*/ledger.sqlite).
    #[arg(long)]
    db: Option<String>,
    /// Print the reports as JSON: a list of {run_id, status, checks: [{name, invariant, checked, breaches, detail}]}.
    #[arg(long)]
    json: bool,
}

pub fn run(a: AuditArgs) -> anyhow::Result<()> {
    let db = match a.db {
        Some(d) => d,
        None => super::inspect::default_db()?,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let reports = rt.block_on(async {
        let ledger = Ledger::open(&db)
            .await
            .with_context(|| format!("opening {db}"))?;
        let runs: Vec<String> = match a.run {
            Some(r) => vec![r],
            None => {
                let all = ledger.list_runs(if a.all { u32::MAX } else { 1 }).await?;
                if all.is_empty() {
                    bail!("{db} holds no run");
                }
                all.into_iter().map(|r| r.id).collect()
            }
        };
        let mut reports = Vec::new();
        for run_id in runs {
            reports.push(audit_one(&ledger, &db, &run_id).await?);
        }
        anyhow::Ok(reports)
    })?;
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        for report in &reports {
            outln!("run {} ({})", report.run_id, report.status);
            for c in &report.checks {
                outln!(
                    "  {:<4} {:<18} {:>8} checked {:>6} breaches  {}",
                    if c.breaches == 0 { "ok" } else { "FAIL" },
                    c.name,
                    c.checked,
                    c.breaches,
                    if c.detail.is_empty() {
                        c.invariant
                    } else {
                        c.detail.as_str()
                    }
                );
            }
        }
    }
    let breached: Vec<String> = reports
        .iter()
        .flat_map(|r| {
            r.checks
                .iter()
                .filter(|c| c.breaches > 0)
                .map(move |c| format!("{} {}", r.run_id, c.name))
        })
        .collect();
    if !breached.is_empty() {
        bail!("breaches: {}", breached.join(", "));
    }
    Ok(())
}

async fn audit_one(ledger: &Ledger, db: &str, run_id: &str) -> anyhow::Result<AuditReport> {
    let record = ledger
        .get_run(run_id)
        .await?
        .with_context(|| format!("no run `{run_id}` in {db} (chorus inspect runs lists them)"))?;
    // The staleness bound of each stage, from the config the run was started with.
    let config = RunConfig::from_toml_str(&record.config_toml, &format!("the config of {run_id}"))
        .with_context(|| format!("reading the config recorded for {run_id}"))?;
    let staleness: BTreeMap<u64, u64> = config
        .stages
        .iter()
        .enumerate()
        .map(|(i, s)| (i as u64, s.max_staleness))
        .collect();
    Ok(ledger.audit(run_id, &staleness).await?)
}
