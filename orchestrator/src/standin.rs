//! Stand-ins for the rollout workers and the learner, for tests and benchmarks of the
//! scheduler without models: [`FixedWorkers`] answers every request at once with the same
//! tokens, [`CountingLearner`] advances its version after every `groups_per_step` groups.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use chorus_proto::v1::{FinishReason, GenerateRequest, GenerateResponse, TrajectoryGroup};
use tokio::sync::watch;

use crate::scheduler::{BoxFuture, Learning, LearningError, Rollouts};

/// Answers every request with `tokens`, produced by the version the learner has published.
pub struct FixedWorkers {
    /// The completion every request gets.
    pub tokens: Vec<u32>,
    /// The learner's version, as workers would hold it.
    pub version: watch::Receiver<u64>,
}

impl Rollouts for FixedWorkers {
    fn generate(&self, r: GenerateRequest) -> BoxFuture<GenerateResponse> {
        let v = *self.version.borrow();
        let n = self.tokens.len();
        let resp = GenerateResponse {
            request_id: r.request_id,
            run_id: r.run_id,
            prompt_id: r.prompt_id,
            trajectory_id: r.trajectory_id,
            token_ids: self.tokens.clone(),
            logprobs: vec![-0.5; n],
            policy_versions: vec![v; n],
            finish_reason: FinishReason::Stop as i32,
            worker_id: "fixed".into(),
            ..Default::default()
        };
        Box::pin(async move { resp })
    }

    fn wait_version(&self, version: u64) -> BoxFuture<()> {
        let mut rx = self.version.clone();
        Box::pin(async move {
            let _ = rx.wait_for(|x| *x >= version).await;
        })
    }
}

/// Keeps what it is given and advances its version after every `groups_per_step` groups.
pub struct CountingLearner {
    groups_per_step: u64,
    groups: AtomicU64,
    version: watch::Sender<u64>,
    /// Groups received, when keeping them was asked for.
    pub kept: Mutex<Vec<TrajectoryGroup>>,
    keep: bool,
}

impl CountingLearner {
    /// A learner at version 0; `keep` stores every group (tests), otherwise they are dropped.
    pub fn new(groups_per_step: u64, keep: bool) -> Self {
        Self {
            groups_per_step: groups_per_step.max(1),
            groups: AtomicU64::new(0),
            version: watch::channel(0).0,
            kept: Mutex::new(vec![]),
            keep,
        }
    }

    /// The version as workers would see it.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }
}

impl Learning for CountingLearner {
    fn submit(&self, g: TrajectoryGroup) -> BoxFuture<Result<(), LearningError>> {
        if self.keep {
            self.kept.lock().expect("not poisoned").push(g);
        }
        let n = self.groups.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_multiple_of(self.groups_per_step) {
            self.version.send_modify(|v| *v += 1);
        }
        Box::pin(async { Ok(()) })
    }

    fn version(&self) -> u64 {
        *self.version.borrow()
    }

    fn wait_version(&self, version: u64) -> BoxFuture<Result<(), LearningError>> {
        let mut rx = self.version.subscribe();
        Box::pin(async move {
            rx.wait_for(|x| *x >= version)
                .await
                .map(|_| ())
                .map_err(|_| LearningError::Gone {
                    learner: "the stand-in learner".into(),
                    version,
                })
        })
    }
}
