//! Live progress of a run: one line per learner step with the scheduler's running counters
//! (the reward is the mean over the trajectories submitted since the previous line, so it
//! follows the policy rather than averaging the whole run),
//! logged as a `tracing` event (its numbers also as fields) and appended to the run's events (the
//! ledger's `events` table, and `WatchRun` clients when the run is served).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use chorus_orchestrator::Directory;
use chorus_orchestrator::scheduler::StageStats;
use chorus_proto::v1::{LearnerStepCompleted, StepReport, run_event};
use tokio::sync::broadcast;

/// Follows the learner's step reports until their stream closes.
pub(crate) fn spawn(
    mut steps: broadcast::Receiver<StepReport>,
    stats: Arc<StageStats>,
    events: Arc<Directory>,
) {
    let started = Instant::now();
    let (mut last_trajectories, mut last_reward_micros) = (0u64, 0u64);
    // In the run's span, so each step line carries the run id.
    tokio::spawn(tracing::Instrument::in_current_span(async move {
        while let Ok(r) = steps.recv().await {
            events.emit(run_event::Kind::LearnerStep(LearnerStepCompleted {
                step: r.step,
                loss: r.loss,
                trajectories: r.trajectories,
                skipped: !r.skip_reason.is_empty(),
            }));
            let groups = stats.groups_submitted.load(Ordering::Relaxed).max(1);
            let trajectories = stats.trajectories_submitted.load(Ordering::Relaxed);
            let reward_micros = stats.reward_micros.load(Ordering::Relaxed);
            let new = trajectories.saturating_sub(last_trajectories);
            let reward =
                (reward_micros.saturating_sub(last_reward_micros) as f64 / 1e6) / new.max(1) as f64;
            (last_trajectories, last_reward_micros) = (trajectories, reward_micros);
            // Supervised steps have references, not rewards.
            let reward_text = if r.supervised {
                "    -".to_string()
            } else {
                format!("{reward:.3}")
            };
            let max_lag = stats.max_lag.load(Ordering::Relaxed);
            let dropped = stats.prompts_dropped.load(Ordering::Relaxed);
            let failed = stats.trajectories_failed.load(Ordering::Relaxed);
            let seconds = started.elapsed().as_secs_f64();
            let skipped = if r.skip_reason.is_empty() {
                String::new()
            } else {
                format!("  skipped: {}", r.skip_reason)
            };
            tracing::info!(
                step = r.step,
                policy_version = r.policy_version,
                supervised = r.supervised,
                loss = r.loss,
                reward,
                trajectories,
                groups,
                max_lag,
                dropped,
                failed,
                seconds,
                "step {:>4} {} v{:<4} loss {:>8.4} reward {reward_text} traj {trajectories:>6} groups {groups:>5} lag<={max_lag} dropped {dropped} failed {failed} {seconds:.0}s{skipped}",
                r.step,
                if r.supervised { "sft" } else { "rl " },
                r.policy_version,
                r.loss,
            );
        }
    }));
}
