//! The ledger's invariants, checked over one run (`chorus audit`): what must hold however the
//! run's services died and came back.
//!
//! Each check counts the rows it looked at and the rows that breach it; a run is clean when no
//! check has a breach. The checks read committed rows only, on either backend.

use std::collections::BTreeMap;

use serde::Serialize;

use super::read::{Reader, RowError};
use super::sql::{Cols, Stmt};
use super::{Ledger, LedgerError};

/// One invariant over one run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditCheck {
    /// Short name (`prompts_final`, `trained_once`…).
    pub name: &'static str,
    /// What must hold, in words.
    pub invariant: &'static str,
    /// Rows (prompts, trajectories, steps, versions) looked at.
    pub checked: u64,
    /// Rows that breach it.
    pub breaches: u64,
    /// The first breaches, or a note on what was counted.
    pub detail: String,
}

/// Every check of one run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditReport {
    /// The run.
    pub run_id: String,
    /// Its status when audited (a running run may have prompts in flight).
    pub status: String,
    /// The checks, in a fixed order.
    pub checks: Vec<AuditCheck>,
}

impl AuditReport {
    /// Whether no check found a breach.
    pub fn clean(&self) -> bool {
        self.checks.iter().all(|c| c.breaches == 0)
    }
}

/// At most this many breaches are named in a check's detail.
const NAMED: usize = 5;

/// `(key, a, b)` rows: an identifier and two integers.
fn triple(row: &dyn Cols) -> Result<(String, i64, i64), RowError> {
    Ok((row.text("k")?, row.int("a")?, row.int("b")?))
}

/// A `COUNT(*) AS n` row.
fn count(row: &dyn Cols) -> Result<u64, RowError> {
    Reader::keyed(row, "audit", String::new()).u64("n")
}

fn named(items: &[String]) -> String {
    let mut out = items
        .iter()
        .take(NAMED)
        .cloned()
        .collect::<Vec<_>>()
        .join("; ");
    if items.len() > NAMED {
        out.push_str(&format!("; and {} more", items.len() - NAMED));
    }
    out
}

impl Ledger {
    /// Checks run `run_id`'s invariants. `staleness` maps a stage index to the most policy
    /// versions a trajectory trained in that stage may lag (its `max_staleness`); stages it
    /// does not name are not checked for lag. Fails if the run is not in the ledger.
    pub async fn audit(
        &self,
        run_id: &str,
        staleness: &BTreeMap<u64, u64>,
    ) -> Result<AuditReport, LedgerError> {
        let run = self
            .get_run(run_id)
            .await?
            .ok_or_else(|| LedgerError::UnknownRun(run_id.to_string()))?;
        let finished = run.status.is_terminal();
        let mut checks = Vec::new();

        // Every prompt reached consumed or dropped (with a reason) once the run ended.
        let stmt = Stmt::new(
            "SELECT id AS k, step_dispatched AS a, CAST(0 AS BIGINT) AS b FROM prompts \
             WHERE run_id = $1 AND state NOT IN ('consumed', 'dropped') ORDER BY id",
        )
        .bind(run_id);
        let open = self.fetch("audit prompts_final", stmt, triple).await?;
        let total = self.count_rows("prompts", run_id).await?;
        checks.push(AuditCheck {
            name: "prompts_final",
            invariant: "every prompt consumed or dropped once the run has ended",
            checked: total,
            breaches: if finished { open.len() as u64 } else { 0 },
            detail: if open.is_empty() {
                String::new()
            } else if finished {
                named(
                    &open
                        .iter()
                        .map(|(id, step, _)| format!("{id} (dispatched at step {step})"))
                        .collect::<Vec<_>>(),
                )
            } else {
                format!("{} in flight (the run is {})", open.len(), run.status)
            },
        });

        // A trajectory is consumed once: with its prompt, at its prompt's step.
        let stmt = Stmt::new(
            "SELECT t.id AS k, t.consumed_at_step AS a, COALESCE(p.consumed_at_step, -1) AS b \
             FROM trajectories t LEFT JOIN prompts p ON p.id = t.prompt_id \
             WHERE t.run_id = $1 AND t.consumed_at_step IS NOT NULL \
             AND (p.id IS NULL OR p.state <> 'consumed' OR p.consumed_at_step IS NULL \
                  OR p.consumed_at_step <> t.consumed_at_step) ORDER BY t.id",
        )
        .bind(run_id);
        let stray = self.fetch("audit consumed_once", stmt, triple).await?;
        let consumed = self.count_consumed(run_id).await?;
        checks.push(AuditCheck {
            name: "consumed_once",
            invariant: "every consumed trajectory's prompt was consumed once, at the same step",
            checked: consumed,
            breaches: stray.len() as u64,
            detail: named(
                &stray
                    .iter()
                    .map(|(id, at, p)| match p {
                        -1 => format!("{id} consumed at {at}, its prompt never was"),
                        p => format!("{id} consumed at {at}, its prompt at {p}"),
                    })
                    .collect::<Vec<_>>(),
            ),
        });

        // What the learner says it trained in step s is what the ledger consumed for it
        // (trajectories consumed at s - 1, the version step s trained from): a group trained
        // twice, or trained without being recorded, shows as a difference. `mtp_heal` steps
        // re-read rollouts that earlier stages trained on, by design, and consume nothing.
        let stmt = Stmt::new(
            "SELECT CAST(s.step AS TEXT) AS k, s.num_trajectories AS a, \
             CASE WHEN st.kind = 'mtp_heal' THEN -1 ELSE \
             (SELECT COUNT(*) FROM trajectories t WHERE t.run_id = s.run_id \
              AND t.consumed_at_step = s.step - 1) END AS b \
             FROM learner_steps s LEFT JOIN stages st \
             ON st.run_id = s.run_id AND st.stage_index = s.stage_index \
             WHERE s.run_id = $1 ORDER BY s.step",
        )
        .bind(run_id);
        let steps = self.fetch("audit trained_once", stmt, triple).await?;
        let healing = steps
            .iter()
            .filter(|(_, _, consumed)| *consumed < 0)
            .count();
        let differ: Vec<String> = steps
            .iter()
            .filter(|(_, trained, consumed)| *consumed >= 0 && trained != consumed)
            .map(|(step, trained, consumed)| {
                format!("step {step} trained {trained}, the ledger consumed {consumed} for it")
            })
            .collect();
        checks.push(AuditCheck {
            name: "trained_once",
            invariant: "each learner step trained exactly the trajectories consumed for it",
            checked: (steps.len() - healing) as u64,
            breaches: differ.len() as u64,
            detail: if differ.is_empty() && healing > 0 {
                format!(
                    "{healing} mtp_heal steps re-read trained rollouts by design and are not counted"
                )
            } else {
                named(&differ)
            },
        });

        // Learner steps are 1..=N with no gap, each publishing the version of its number.
        let numbers: Vec<i64> = steps
            .iter()
            .filter_map(|(step, _, _)| step.parse().ok())
            .collect();
        let mut gaps = Vec::new();
        for (expected, step) in (1..).zip(&numbers) {
            if *step != expected {
                gaps.push(format!("step {step} where {expected} belongs"));
            }
        }
        let stmt = Stmt::new(
            "SELECT CAST(step AS TEXT) AS k, policy_version AS a, CAST(0 AS BIGINT) AS b FROM learner_steps \
             WHERE run_id = $1 AND policy_version <> step ORDER BY step",
        )
        .bind(run_id);
        for (step, version, _) in self.fetch("audit steps_contiguous", stmt, triple).await? {
            gaps.push(format!("step {step} published version {version}"));
        }
        checks.push(AuditCheck {
            name: "steps_contiguous",
            invariant: "learner steps are 1..N without gaps, step s publishing version s",
            checked: numbers.len() as u64,
            breaches: gaps.len() as u64,
            detail: named(&gaps),
        });

        // Published versions increase with their steps and in time.
        let stmt = Stmt::new(
            "SELECT CAST(version AS TEXT) AS k, learner_step AS a, created_at_ms AS b \
             FROM policy_versions WHERE run_id = $1 ORDER BY version",
        )
        .bind(run_id);
        let versions = self.fetch("audit versions_monotone", stmt, triple).await?;
        let mut backwards = Vec::new();
        for pair in versions.windows(2) {
            let ((v0, s0, t0), (v1, s1, t1)) = (&pair[0], &pair[1]);
            if s1 <= s0 || t1 < t0 {
                backwards.push(format!(
                    "version {v1} (step {s1}, at {t1} ms) after version {v0} (step {s0}, at {t0} ms)"
                ));
            }
        }
        // A trajectory trained at step s + 1 (consumed at s) was trained from version s, so
        // none of its tokens can come from a later version. (The ledger's clocks cannot order
        // this: a worker may sample from a version before the orchestrator records it.)
        let stmt = Stmt::new(
            "SELECT t.id AS k, t.max_policy_version AS a, t.consumed_at_step AS b \
             FROM trajectories t WHERE t.run_id = $1 AND t.consumed_at_step IS NOT NULL \
             AND t.max_policy_version IS NOT NULL AND t.max_policy_version > t.consumed_at_step \
             ORDER BY t.id",
        )
        .bind(run_id);
        for (id, sampled, consumed) in self.fetch("audit versions_monotone", stmt, triple).await? {
            backwards.push(format!(
                "{id} has tokens of version {sampled} but was trained from version {consumed}"
            ));
        }
        checks.push(AuditCheck {
            name: "versions_monotone",
            invariant: "versions increase with learner steps and in time; no trained token comes from a version newer than the one it was trained from",
            checked: versions.len() as u64,
            breaches: backwards.len() as u64,
            detail: named(&backwards),
        });

        // Every trained trajectory's lag (the step that consumed it minus its oldest token's
        // version) is within its stage's bound.
        let stmt = Stmt::new(
            "SELECT t.id AS k, COALESCE(t.stage_index, -1) AS a, \
             t.consumed_at_step - t.min_policy_version AS b FROM trajectories t \
             WHERE t.run_id = $1 AND t.consumed_at_step IS NOT NULL \
             AND t.min_policy_version IS NOT NULL ORDER BY t.id",
        )
        .bind(run_id);
        let lags = self.fetch("audit lag_bounded", stmt, triple).await?;
        let mut late = Vec::new();
        let mut checked = 0;
        for (id, stage, lag) in &lags {
            let Some(bound) = u64::try_from(*stage).ok().and_then(|s| staleness.get(&s)) else {
                continue;
            };
            checked += 1;
            if *lag < 0 || *lag as u64 > *bound {
                late.push(format!(
                    "{id} lagged {lag} versions in stage {stage} (bound {bound})"
                ));
            }
        }
        checks.push(AuditCheck {
            name: "lag_bounded",
            invariant: "every trained trajectory lags at most its stage's max_staleness versions",
            checked,
            breaches: late.len() as u64,
            detail: named(&late),
        });

        Ok(AuditReport {
            run_id: run_id.to_string(),
            status: run.status.to_string(),
            checks,
        })
    }

    async fn count_rows(&self, table: &'static str, run_id: &str) -> Result<u64, LedgerError> {
        let stmt = Stmt::new(format!(
            "SELECT COUNT(*) AS n FROM {table} WHERE run_id = $1"
        ))
        .bind(run_id);
        let n = self.fetch("audit count", stmt, count).await?;
        Ok(n.first().copied().unwrap_or(0))
    }
}
