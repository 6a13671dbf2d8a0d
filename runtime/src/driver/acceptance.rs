//! An `mtp_heal` stage's metric: how many of the MTP head's drafts the policy accepts when it
//! decodes held-out prompts speculatively. The policy of a version is fetched from the learner
//! and run on this process' own engine, greedily (so a draft is accepted when it is the
//! policy's own choice, and the measurement repeats exactly), drafting the model's
//! `mtp_depth` tokens per round, on the same held-out tasks the accuracy is measured on.
//!
//! Each environment's result is an [`Accuracy`] whose `solved` / `heldout_n` are accepted /
//! drafted tokens, so the stage summary's per-environment table reads the same as other
//! stages'. Drafts within one completion are not independent, so no interval is claimed.

use std::collections::BTreeMap;
use std::sync::Arc;

use chorus_environments::chat;
use chorus_model::engine::{Engine, GenerationRequest, MtpStats};
use chorus_model::sampling::SamplingParams;
use chorus_model::{NemotronHConfig, Params};
use chorus_orchestrator::config::Until;
use chorus_orchestrator::remote::RemoteLearner;
use chorus_orchestrator::scheduler::{
    Accuracy, BoxFuture, SchedulerError, StageContext, StageGoal, heldout_tasks, stop_tokens,
};

use super::stages::fetch_params;
use crate::error::{Result, RunError};
use crate::plan::EvalPlan;

/// Measures speculative acceptance of a run's policy versions on held-out prompts.
#[derive(Clone)]
pub(crate) struct AcceptanceProbe {
    learner: Arc<RemoteLearner>,
    model: NemotronHConfig,
    plan: EvalPlan,
    environments: Vec<(String, u32)>,
}

impl AcceptanceProbe {
    /// A probe over `environments` (name, difficulty) with `plan`'s task count and token
    /// limits, fetching weights from `learner`.
    pub(crate) fn new(
        learner: Arc<RemoteLearner>,
        model: NemotronHConfig,
        plan: EvalPlan,
        environments: Vec<(String, u32)>,
    ) -> Self {
        Self {
            learner,
            model,
            plan,
            environments,
        }
    }

    /// Acceptance of policy `version`'s drafts per environment.
    pub(crate) async fn at(
        &self,
        ctx: &Arc<StageContext>,
        version: u64,
    ) -> Result<BTreeMap<String, Accuracy>> {
        let mut prompts: Vec<(String, Vec<Vec<u32>>)> = vec![];
        for (name, difficulty) in &self.environments {
            let env = ctx
                .registry
                .get(name)
                .map_err(|e| RunError::Invalid(format!("measuring MTP acceptance: {e}")))?;
            let tasks = heldout_tasks(ctx, name, &env, *difficulty, self.plan.tasks).await;
            let mut ids = vec![];
            for (task, _) in tasks.into_iter().flatten() {
                let prompt = ctx
                    .tokenizer
                    .encode(&chat::render_prompt(&task.prompt))
                    .map_err(|e| RunError::Invalid(format!("tokenizing a held-out prompt: {e}")))?;
                if !prompt.is_empty() && prompt.len() <= self.plan.max_prompt_tokens {
                    ids.push(prompt);
                }
            }
            prompts.push((name.clone(), ids));
        }
        let params = fetch_params(&self.learner, &ctx.run_id, version).await?;
        let (model, max_new_tokens) = (self.model.clone(), self.plan.max_new_tokens);
        let stop = stop_tokens(&ctx.tokenizer);
        tokio::task::spawn_blocking(move || {
            speculate(&model, &params, &prompts, max_new_tokens, &stop)
        })
        .await
        .map_err(|source| RunError::Task {
            what: "measuring MTP acceptance",
            source,
        })?
    }

    /// A goal met once the pooled acceptance of a version is at least `until.at_least`.
    pub(crate) fn goal(&self, until: &Until) -> Arc<dyn StageGoal> {
        Arc::new(AcceptanceGoal {
            probe: self.clone(),
            at_least: until.at_least,
            every: until.every,
        })
    }
}

/// Greedy speculative decoding of every prompt; counts summed per environment.
fn speculate(
    model: &NemotronHConfig,
    params: &Params,
    prompts: &[(String, Vec<Vec<u32>>)],
    max_new_tokens: usize,
    stop: &[u32],
) -> Result<BTreeMap<String, Accuracy>> {
    let engine = Engine::from_params(model, params)?;
    let drafts = model.chorus.mtp_depth.max(1);
    let mut out = BTreeMap::new();
    for (name, list) in prompts {
        let mut total = MtpStats::default();
        for prompt in list {
            let request = GenerationRequest {
                prompt: prompt.clone(),
                max_new_tokens,
                sampling: SamplingParams::greedy(),
                seed: 0,
                stop_tokens: stop.to_vec(),
            };
            let stats = engine
                .generate_speculative(&request, drafts)?
                .mtp
                .unwrap_or_default();
            total.drafted += stats.drafted;
            total.accepted += stats.accepted;
            total.verify_passes += stats.verify_passes;
        }
        let rate = total.acceptance_rate();
        out.insert(
            name.clone(),
            Accuracy::new(total.accepted, total.drafted, rate),
        );
    }
    Ok(out)
}

/// Accepted over drafted, pooled over every environment's drafts.
pub(crate) fn pooled(acc: &BTreeMap<String, Accuracy>) -> f64 {
    let (accepted, drafted) = acc
        .values()
        .fold((0, 0), |(a, d), x| (a + x.solved, d + x.heldout_n));
    if drafted == 0 {
        0.0
    } else {
        accepted as f64 / drafted as f64
    }
}

/// `env 95.8% (115/120 drafts), ...` for the log.
pub(crate) fn acceptance_line(acc: &BTreeMap<String, Accuracy>) -> String {
    acc.iter()
        .map(|(name, a)| {
            format!(
                "{name} {:.1}% ({}/{} drafts)",
                100.0 * a.accuracy,
                a.solved,
                a.heldout_n
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// An `mtp_heal` stage's `until` on its acceptance rate.
struct AcceptanceGoal {
    probe: AcceptanceProbe,
    at_least: f64,
    every: u64,
}

impl StageGoal for AcceptanceGoal {
    fn every(&self) -> u64 {
        self.every
    }

    fn reached(
        &self,
        ctx: Arc<StageContext>,
        version: u64,
    ) -> BoxFuture<std::result::Result<bool, SchedulerError>> {
        let (probe, at_least) = (self.probe.clone(), self.at_least);
        Box::pin(async move {
            let acc = probe
                .at(&ctx, version)
                .await
                .map_err(|e| SchedulerError::Goal(e.to_string()))?;
            let rate = pooled(&acc);
            tracing::info!(
                version,
                goal = at_least,
                "stage goal check: MTP acceptance {:.1}% (goal {:.1}%)",
                100.0 * rate,
                100.0 * at_least
            );
            Ok(rate >= at_least)
        })
    }
}
