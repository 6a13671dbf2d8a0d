//! The stage loop: each stage of the plan in order, on one shared context, with the held-out
//! evaluation before the first RL stage.

use std::sync::Arc;

use chorus_orchestrator::config::StageKind;
use chorus_orchestrator::scheduler::{StageContext, run_rl_stage, run_sft_stage};
use tracing::Instrument;

use super::evaluation::Evaluator;
use crate::error::Result;
use crate::plan::RunPlan;

/// Runs every stage of `plan`; `ctx.stage_index` follows the stage being run.
pub(crate) async fn run_stages(
    plan: &RunPlan,
    ctx: &mut StageContext,
    evaluator: &mut Evaluator,
) -> Result<()> {
    for (i, stage) in plan.config.stages.iter().enumerate() {
        ctx.stage_index = i;
        let shared = Arc::new(ctx.clone());
        if stage.kind == StageKind::Rlvr {
            evaluator.before_rl(&shared).await?;
        }
        let completions = if stage.kind == StageKind::Rlvr {
            stage.group_size
        } else {
            1
        };
        let span = tracing::info_span!(
            "stage",
            stage = stage.name,
            stage_index = i,
            kind = ?stage.kind
        );
        tracing::info!(
            parent: &span,
            steps = stage.steps,
            prompts_per_step = stage.prompts_per_step,
            completions,
            "stage {} ({:?}): {} steps x {} prompts x {completions}",
            stage.name,
            stage.kind,
            stage.steps,
            stage.prompts_per_step,
        );
        let st = Arc::new(stage.clone());
        match stage.kind {
            StageKind::Sft => run_sft_stage(shared, st).instrument(span).await?,
            StageKind::Rlvr => run_rl_stage(shared, st).instrument(span).await?,
        }
    }
    Ok(())
}
