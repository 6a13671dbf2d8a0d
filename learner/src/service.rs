//! The learner as a service: a training thread that consumes scored groups and publishes each
//! new policy version, and the gRPC `Learner` service in front of it.
//!
//! Every group is logged with its `run_id` and `group_id` (whose prefix is the orchestrator's
//! prompt id, and so the prefix of its request ids), and every step with its `step` and
//! `policy_version`, so one rollout can be followed from the orchestrator's logs into these.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use chorus_proto::limits::{
    MAX_GROUP_SIZE, MAX_NEW_TOKENS, MAX_PROMPT_TOKENS, MAX_STEP_GROUPS, MAX_STEPS_AHEAD,
};
use chorus_proto::v1::learner_server::Learner;
use chorus_proto::v1::{
    LearnerStatus, LearnerStatusRequest, RejectedGroup, StepReport as StepReportMsg,
    StreamStepsRequest, StreamWeightsRequest, SubmitTrajectoriesResponse, TrajectoryGroup,
    WeightChunk, WeightTransfer,
};
use chorus_proto::weights::{HostTensor, encode};
use tokio::sync::{broadcast, watch};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::checkpoints::{self, CheckpointPolicy};
use crate::loss::{RlSequence, SftSequence};
use crate::metrics as names;
use crate::objective::Objective;
use crate::trainer::{StepReport, Trainer};

/// A published policy version, ready to stream.
pub struct Published {
    /// Its version number.
    pub version: u64,
    /// Its weights, as `StreamWeights` sends them (the last chunk carries the checksum).
    pub chunks: Vec<WeightChunk>,
}

impl Published {
    /// The stream's digest and its algorithm, from its last chunk.
    fn digest(&self) -> (Vec<u8>, i32) {
        self.chunks
            .last()
            .map(|c| (c.digest.clone(), c.digest_algorithm))
            .unwrap_or_default()
    }

    /// Bytes of tensor data in the stream.
    fn num_bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.data.len() as u64).sum()
    }
}

/// Why a group was not queued for training.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The group cannot be trained on (no trajectories, lengths that disagree, …).
    #[error("run `{run_id}`, group `{group_id}`: {reason}")]
    Invalid {
        /// Run the group names.
        run_id: String,
        /// The group.
        group_id: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The training thread has stopped; nothing more is trained.
    #[error("run `{run_id}`, group `{group_id}`: the learner thread has stopped")]
    Stopped {
        /// Run the group names.
        run_id: String,
        /// The group.
        group_id: String,
    },
}

impl SubmitError {
    /// What is wrong, without the ids (a `RejectedGroup` names its group already).
    pub fn reason(&self) -> &str {
        match self {
            Self::Invalid { reason, .. } => reason,
            Self::Stopped { .. } => "the learner thread has stopped",
        }
    }
}

/// Settings of the learner service.
#[derive(Clone, Debug)]
pub struct LearnerServiceConfig {
    /// The run it trains.
    pub run_id: String,
    /// Trajectory groups per optimizer step (prompts per step).
    pub groups_per_step: usize,
    /// Largest data payload of one weight chunk.
    pub max_chunk_bytes: usize,
    /// Most recent policy versions kept to stream exactly (`StreamWeights` with `exact`), for
    /// workers serving requests pinned to an older version; at least 1 (the newest).
    pub keep_versions: usize,
    /// Rolling checkpoints for resuming after a crash (`None`: none).
    pub checkpoints: Option<CheckpointPolicy>,
}

/// Saves a rolling checkpoint and says whether it was saved; a failure is logged and training
/// goes on (a run that cannot save loses only its ability to resume from this version).
fn save_checkpoint(
    trainer: &Trainer,
    policy: &CheckpointPolicy,
    reports: &[StepReportMsg],
    why: &str,
) -> bool {
    match checkpoints::save(trainer, policy, reports) {
        Ok(dir) => {
            tracing::info!(
                policy_version = trainer.version(),
                dir = %dir.display(),
                "learner checkpoint ({why}) at version {}",
                trainer.version()
            );
            true
        }
        Err(e) => {
            tracing::error!(
                policy_version = trainer.version(),
                error = %e,
                "the learner checkpoint at version {} was not saved",
                trainer.version()
            );
            false
        }
    }
}

/// The newest step reports a checkpoint keeps, copied out so that the history is not locked
/// while the checkpoint is written.
fn newest_reports(history: &Mutex<Vec<StepReportMsg>>) -> Vec<StepReportMsg> {
    let history = history.lock().expect("not poisoned");
    history[history.len().saturating_sub(checkpoints::KEPT_REPORTS)..].to_vec()
}

/// What the training thread is handed.
enum Work {
    /// A group to train.
    Group(Box<TrajectoryGroup>),
    /// Drop the groups held for steps not yet trained, then answer.
    DiscardPending(std::sync::mpsc::SyncSender<()>),
}

/// Handle to the training thread.
#[derive(Clone)]
pub struct LearnerHandle {
    work: std::sync::mpsc::Sender<Work>,
    published: watch::Receiver<Arc<Published>>,
    reports: broadcast::Sender<StepReport>,
    step_msgs: broadcast::Sender<StepReportMsg>,
    history: Arc<Mutex<Vec<StepReportMsg>>>,
    seen_groups: Arc<Mutex<HashSet<String>>>,
    /// Weight transfers served since the last step report, which carries them to the
    /// orchestrator (and its ledger).
    transfers: Arc<Mutex<Vec<WeightTransfer>>>,
    /// The newest version saved in a checkpoint (a restart resumes from it).
    checkpoint_version: Arc<Mutex<Option<u64>>>,
    /// The newest `keep_versions` published versions, oldest first.
    recent: Arc<Mutex<VecDeque<Arc<Published>>>>,
    keep: usize,
    /// The policy's vocabulary size: token ids of submitted groups are below it.
    vocab: usize,
    /// The run it trains.
    run_id: String,
    /// The version it started at.
    start_version: u64,
}

/// Remembers `p` among the newest `keep` versions.
fn remember(recent: &Mutex<VecDeque<Arc<Published>>>, p: Arc<Published>, keep: usize) {
    let mut r = recent.lock().expect("not poisoned");
    r.push_back(p);
    while r.len() > keep.max(1) {
        r.pop_front();
    }
}

fn publish(run_id: &str, trainer: &Trainer, max_chunk_bytes: usize) -> Published {
    let mut tensors = BTreeMap::new();
    for (name, t) in trainer
        .params()
        .snapshot()
        .expect("snapshot of live parameters")
    {
        let data = t
            .flatten_all()
            .and_then(|f| f.to_dtype(candle_core::DType::F32))
            .and_then(|f| f.to_vec1::<f32>())
            .expect("f32 parameters");
        tensors.insert(
            name,
            HostTensor {
                shape: t.dims().to_vec(),
                data,
            },
        );
    }
    Published {
        version: trainer.version(),
        chunks: encode(run_id, trainer.version(), &tensors, max_chunk_bytes),
    }
}

/// Turns a supervised group into SFT examples, or says why it cannot be used.
pub fn group_sft(g: &TrajectoryGroup) -> Result<Vec<SftSequence>, String> {
    if g.trajectories.is_empty() {
        return Err("the group has no trajectories".into());
    }
    check_sizes(g)?;
    g.trajectories
        .iter()
        .map(|t| {
            if t.prompt_token_ids.is_empty() || t.completion_token_ids.is_empty() {
                return Err(format!(
                    "trajectory {} needs prompt and completion tokens",
                    t.trajectory_id
                ));
            }
            Ok(SftSequence {
                tokens: t
                    .prompt_token_ids
                    .iter()
                    .chain(&t.completion_token_ids)
                    .copied()
                    .collect(),
                prompt_len: t.prompt_token_ids.len(),
                loss_mask: completion_mask(t)?,
            })
        })
        .collect()
}

/// A trajectory's loss mask: `None` when every completion token is the policy's own.
fn completion_mask(t: &chorus_proto::v1::Trajectory) -> Result<Option<Vec<bool>>, String> {
    let n = t.completion_token_ids.len();
    match t.completion_mask.len() {
        0 => Ok(None),
        m if m == n => {
            if t.completion_mask.iter().any(|&x| x) {
                Ok(Some(t.completion_mask.clone()))
            } else {
                Err(format!(
                    "trajectory {}: the completion mask selects no token",
                    t.trajectory_id
                ))
            }
        }
        m => Err(format!(
            "trajectory {}: {n} completion tokens but a completion mask of {m}",
            t.trajectory_id
        )),
    }
}

/// Turns a scored group into training sequences, or says why it cannot be used.
pub fn group_sequences(g: &TrajectoryGroup) -> Result<Vec<RlSequence>, String> {
    if g.supervised {
        return Err("a supervised group has no RL sequences".into());
    }
    if g.trajectories.is_empty() {
        return Err("the group has no trajectories".into());
    }
    check_sizes(g)?;
    g.trajectories
        .iter()
        .map(|t| {
            let n = t.completion_token_ids.len();
            if t.prompt_token_ids.is_empty() || n == 0 {
                return Err(format!(
                    "trajectory {} needs prompt and completion tokens",
                    t.trajectory_id
                ));
            }
            if t.logprobs.len() != n || t.policy_versions.len() != n {
                return Err(format!(
                    "trajectory {}: {n} tokens but {} logprobs and {} versions",
                    t.trajectory_id,
                    t.logprobs.len(),
                    t.policy_versions.len()
                ));
            }
            if !t.advantage.is_finite() {
                return Err(format!(
                    "trajectory {}: advantage is not finite",
                    t.trajectory_id
                ));
            }
            if let Some(i) = t.logprobs.iter().position(|lp| !lp.is_finite()) {
                return Err(format!(
                    "trajectory {}: logprobs[{i}] is {}; allowed: finite log-probabilities",
                    t.trajectory_id, t.logprobs[i]
                ));
            }
            Ok(RlSequence {
                tokens: t
                    .prompt_token_ids
                    .iter()
                    .chain(&t.completion_token_ids)
                    .copied()
                    .collect(),
                prompt_len: t.prompt_token_ids.len(),
                behavior_logprobs: t.logprobs.clone(),
                advantage: t.advantage as f32,
                ref_logprobs: None,
                // Observations between a multi-turn episode's turns are not the policy's.
                loss_mask: completion_mask(t)?,
            })
        })
        .collect()
}

/// Checks the counts of a group against the limits of `chorus_proto::limits` and its settings
/// (before anything is copied out of it), naming the field that is out of bounds.
fn check_sizes(g: &TrajectoryGroup) -> Result<(), String> {
    if g.trajectories.len() > MAX_GROUP_SIZE {
        return Err(format!(
            "trajectories: {} in one group; allowed: at most {MAX_GROUP_SIZE}",
            g.trajectories.len()
        ));
    }
    if g.step_groups as usize > MAX_STEP_GROUPS {
        return Err(format!(
            "step_groups is {}; allowed: at most {MAX_STEP_GROUPS} (0: the learner's own)",
            g.step_groups
        ));
    }
    if !(g.learning_rate.is_finite() && g.learning_rate >= 0.0) {
        return Err(format!(
            "learning_rate is {}; allowed: a finite rate > 0 (0: the learner's own schedule)",
            g.learning_rate
        ));
    }
    for t in &g.trajectories {
        let (p, c) = (t.prompt_token_ids.len(), t.completion_token_ids.len());
        if p > MAX_PROMPT_TOKENS {
            return Err(format!(
                "trajectory {}: prompt_token_ids has {p} tokens; allowed: at most \
                 {MAX_PROMPT_TOKENS}",
                t.trajectory_id
            ));
        }
        if c > MAX_NEW_TOKENS {
            return Err(format!(
                "trajectory {}: completion_token_ids has {c} tokens; allowed: at most \
                 {MAX_NEW_TOKENS}",
                t.trajectory_id
            ));
        }
    }
    Ok(())
}

/// Checks that every token id of the group is in the policy's vocabulary of `vocab` tokens.
fn check_vocabulary(g: &TrajectoryGroup, vocab: usize) -> Result<(), String> {
    for t in &g.trajectories {
        for (field, ids) in [
            ("prompt_token_ids", &t.prompt_token_ids),
            ("completion_token_ids", &t.completion_token_ids),
        ] {
            if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                return Err(format!(
                    "trajectory {}: {field}: token id {bad} is outside the vocabulary (size \
                     {vocab})",
                    t.trajectory_id
                ));
            }
        }
    }
    Ok(())
}

/// The objective a scored group names, or `None` for the learner's own.
pub fn group_objective(g: &TrajectoryGroup) -> Result<Option<Objective>, String> {
    g.objective
        .as_ref()
        .map(|o| Objective::from_proto(o).map_err(|e| format!("objective: {e}")))
        .transpose()
}

fn report_msg(
    run_id: &str,
    r: &StepReport,
    trajectories: usize,
    supervised: bool,
    published: &Published,
) -> StepReportMsg {
    let (weights_digest, weights_digest_algorithm) = published.digest();
    StepReportMsg {
        weights_digest,
        weights_digest_algorithm,
        weights_bytes: published.num_bytes(),
        run_id: run_id.to_string(),
        step: r.step,
        policy_version: r.version,
        loss: r.stats.loss,
        kl: r.stats.kl,
        entropy: r.stats.entropy,
        grad_norm: r.grad_norm,
        learning_rate: r.lr,
        clip_fraction: r.stats.clip_fraction,
        tokens: r.stats.tokens as u64,
        trajectories: trajectories as u32,
        skip_reason: r.skipped.clone().unwrap_or_default(),
        mean_abs_logprob_diff: r.stats.mean_abs_logprob_diff,
        supervised,
        transfers: Vec::new(),
        checkpoint_version: None,
        group_ids: Vec::new(),
    }
}

/// Starts the training thread over `trainer` and publishes its current weights as the first
/// version.
pub fn spawn_learner(mut trainer: Trainer, cfg: LearnerServiceConfig) -> LearnerHandle {
    let (work_tx, work_rx) = std::sync::mpsc::channel::<Work>();
    let start_version = trainer.version();
    let vocab = trainer.model_config().vocab_size;
    let first = Arc::new(publish(&cfg.run_id, &trainer, cfg.max_chunk_bytes));
    let recent = Arc::new(Mutex::new(VecDeque::new()));
    remember(&recent, first.clone(), cfg.keep_versions);
    let (pub_tx, pub_rx) = watch::channel(first);
    let kept = recent.clone();
    let cfg_keep = cfg.keep_versions.max(1);
    let (reports, _) = broadcast::channel(1024);
    let (step_msgs, _) = broadcast::channel(1024);
    let transfers: Arc<Mutex<Vec<WeightTransfer>>> = Arc::default();
    let served = transfers.clone();
    // A learner resumed from a checkpoint starts out saved at its version, and with the step
    // reports saved there (some may never have reached the orchestrator).
    let latest = cfg
        .checkpoints
        .as_ref()
        .and_then(|p| checkpoints::latest(&p.dir).ok().flatten())
        .filter(|(v, _)| *v <= trainer.version());
    let saved_at_start = latest.as_ref().map(|(v, _)| *v);
    let replayed = match &latest {
        Some((v, dir)) if *v == trainer.version() => match checkpoints::load_reports(dir) {
            Ok(reports) => reports,
            Err(e) => {
                tracing::warn!(error = %e, "the checkpoint's step reports are not replayed");
                vec![]
            }
        },
        _ => vec![],
    };
    let history: Arc<Mutex<Vec<StepReportMsg>>> = Arc::new(Mutex::new(replayed));
    let (reports_tx, msgs_tx, hist) = (reports.clone(), step_msgs.clone(), history.clone());
    let checkpoint_version = Arc::new(Mutex::new(saved_at_start));
    let saved = checkpoint_version.clone();
    let run_id = cfg.run_id.clone();
    std::thread::Builder::new()
        .name("chorus-learner".into())
        .spawn(move || {
            // A step's groups arrive in whatever order their slots finish; they are trained in
            // the order of their ids, so that the step's sums do not depend on timing. Groups
            // are gathered by the step they name, so a group of a later step (an orchestrator
            // sending again after this learner restarted, while its new groups also arrive)
            // never counts towards an earlier one.
            let mut waiting: BTreeMap<u64, Vec<TrajectoryGroup>> = BTreeMap::new();
            let mut stage = None;
            let mut checkpointed = saved_at_start;
            while let Ok(work) = work_rx.recv() {
                let g = match work {
                    Work::Group(g) => *g,
                    Work::DiscardPending(done) => {
                        let dropped: usize = waiting.values().map(Vec::len).sum();
                        waiting.clear();
                        if dropped > 0 {
                            tracing::warn!(
                                groups = dropped,
                                "dropped the groups held for steps not yet trained (a restarted \
                                 orchestrator sends them anew)"
                            );
                        }
                        let _ = done.send(());
                        continue;
                    }
                };
                let step = g.step.unwrap_or_else(|| trainer.version());
                if step < trainer.version() {
                    tracing::debug!(group_id = %g.group_id, step, "group of a step already trained: ignored");
                    continue;
                }
                waiting.entry(step).or_default().push(g);
                metrics::gauge!(names::QUEUED_GROUPS)
                    .set(waiting.values().map(Vec::len).sum::<usize>() as f64);
                // Every step whose groups are all here trains: the one just completed, then any
                // later one whose groups came first (new groups that overtook the ones an
                // orchestrator sent again after this learner restarted).
                loop {
                let version = trainer.version();
                let ready = waiting.get(&version).is_some_and(|gathered| {
                    let target = match gathered[0].step_groups {
                        0 => cfg.groups_per_step.max(1),
                        n => n as usize,
                    };
                    gathered.len() >= target
                });
                if !ready {
                    break;
                }
                let mut groups = waiting.remove(&version).unwrap_or_default();
                let groups = in_id_order(&mut groups);
                let g_stage = groups.iter().map(|g| g.stage).max().unwrap_or_default();
                // The first step of a new stage: the weights are the last stage's final ones,
                // saved so a crash in the new stage never has to repeat the finished one.
                if let Some(policy) = &cfg.checkpoints
                    && stage.is_some_and(|s| s != g_stage)
                    && save_checkpoint(&trainer, policy, &newest_reports(&hist), "stage boundary")
                {
                    checkpointed = Some(trainer.version());
                }
                stage = Some(g_stage);
                let _step_span = tracing::info_span!(
                    "step",
                    run_id = %cfg.run_id,
                    step = trainer.step(),
                    groups = %groups.iter().map(|g| g.group_id.as_str()).collect::<Vec<_>>().join(",")
                )
                .entered();
                let first_lr = groups.first().map(|g| g.learning_rate).unwrap_or_default();
                trainer.set_peak_lr((first_lr > 0.0).then_some(first_lr));
                let started = std::time::Instant::now();
                // A step's groups come from one stage, so they are all supervised or all not.
                let result = if groups.iter().all(|g| g.supervised) {
                    let batch: Vec<SftSequence> = groups
                        .iter()
                        .flat_map(|g| group_sft(g).unwrap_or_default())
                        .collect();
                    // A step trains the MTP head alone when its groups ask.
                    let mtp_head = groups.iter().any(|g| g.mtp_head);
                    let stepped = prepare_step(&mut trainer, &groups, false).and_then(|()| {
                        if mtp_head {
                            trainer.mtp_step(&batch)
                        } else {
                            trainer.sft_step(&batch)
                        }
                    });
                    (stepped, batch.len(), true)
                } else {
                    // Groups that name the same objective train together; parts keep the order
                    // of their first group id.
                    let mut parts: Vec<(Objective, Vec<RlSequence>)> = vec![];
                    for g in &groups {
                        let objective = group_objective(g)
                            .ok()
                            .flatten()
                            .unwrap_or_else(|| trainer.default_objective().clone());
                        let sequences = if g.supervised {
                            vec![]
                        } else {
                            group_sequences(g).unwrap_or_default()
                        };
                        match parts.iter_mut().find(|(o, _)| *o == objective) {
                            Some((_, part)) => part.extend(sequences),
                            None => parts.push((objective, sequences)),
                        }
                    }
                    let parts_ref: Vec<(&Objective, &[RlSequence])> =
                        parts.iter().map(|(o, s)| (o, s.as_slice())).collect();
                    let n = parts.iter().map(|(_, s)| s.len()).sum();
                    // Empty groups count: they carry their stage's objective all the same.
                    let kl_penalty = parts.iter().any(|(o, _)| o.kl_coef > 0.0);
                    let stepped = prepare_step(&mut trainer, &groups, kl_penalty)
                        .and_then(|()| trainer.rl_step_mixed(&parts_ref));
                    (stepped, n, false)
                };
                let (report, n, supervised) = match result {
                    (Ok(r), n, sup) => (r, n, sup),
                    (Err(e), n, sup) => {
                        // No update, but the step counts: the orchestrator waits for its version.
                        trainer.skip_step();
                        (
                            StepReport {
                                step: trainer.step(),
                                version: trainer.version(),
                                lr: 0.0,
                                grad_norm: f64::NAN,
                                stats: Default::default(),
                                skipped: Some(e.to_string()),
                            },
                            n,
                            sup,
                        )
                    }
                };
                // Published after skipped steps too: the same weights under the next version.
                let published = Arc::new(publish(&cfg.run_id, &trainer, cfg.max_chunk_bytes));
                let mut msg = report_msg(&cfg.run_id, &report, n, supervised, &published);
                msg.group_ids = groups.iter().map(|g| g.group_id.clone()).collect();
                msg.transfers = std::mem::take(&mut *served.lock().expect("not poisoned"));
                let outcome = if report.skipped.is_some() {
                    "skipped"
                } else {
                    "trained"
                };
                metrics::counter!(names::STEPS, "outcome" => outcome).increment(1);
                metrics::histogram!(names::STEP_SECONDS).record(started.elapsed().as_secs_f64());
                metrics::counter!(names::TRAINED_SEQUENCES).increment(n as u64);
                metrics::counter!(names::TRAINED_TOKENS).increment(msg.tokens);
                metrics::counter!(names::PUBLISHED_BYTES).increment(msg.weights_bytes);
                metrics::gauge!(names::POLICY_VERSION).set(report.version as f64);
                metrics::gauge!(names::QUEUED_GROUPS).set(0.0);
                if report.stats.loss.is_finite() {
                    metrics::gauge!(names::LOSS).set(report.stats.loss);
                }
                if let Some(policy) = &cfg.checkpoints
                    && policy.every > 0
                    && report.version.is_multiple_of(policy.every)
                {
                    // This step's report goes into the checkpoint as it will be sent: a
                    // learner killed before sending it replays it once restarted.
                    let mut saved_msg = msg.clone();
                    saved_msg.checkpoint_version = Some(report.version);
                    let mut reports = newest_reports(&hist);
                    reports.push(saved_msg);
                    if save_checkpoint(&trainer, policy, &reports, "every") {
                        checkpointed = Some(report.version);
                    }
                }
                msg.checkpoint_version = checkpointed;
                *saved.lock().expect("not poisoned") = checkpointed;
                remember(&kept, published.clone(), cfg.keep_versions);
                let _ = pub_tx.send(published);
                match &report.skipped {
                    None => tracing::debug!(
                        step = report.step,
                        policy_version = report.version,
                        loss = report.stats.loss,
                        sequences = n,
                        supervised,
                        "step done"
                    ),
                    Some(why) => tracing::warn!(
                        step = report.step,
                        policy_version = report.version,
                        sequences = n,
                        reason = %why,
                        "step skipped"
                    ),
                }
                hist.lock().expect("not poisoned").push(msg.clone());
                let _ = msgs_tx.send(msg);
                let _ = reports_tx.send(report);
                }
            }
        })
        .expect("spawn the learner thread");
    LearnerHandle {
        work: work_tx,
        published: pub_rx,
        reports,
        step_msgs,
        history,
        seen_groups: Arc::new(Mutex::new(HashSet::new())),
        transfers,
        checkpoint_version,
        recent,
        keep: cfg_keep,
        vocab,
        run_id,
        start_version,
    }
}

/// Sets the trainer up for a step of `groups`: the step's stage (the newest its groups carry; a
/// step's groups share one) with its KL reference, and whether the routers are frozen (when any
/// group asks).
fn prepare_step(
    trainer: &mut Trainer,
    groups: &[TrajectoryGroup],
    kl_penalty: bool,
) -> crate::Result<()> {
    trainer.set_router_frozen(groups.iter().any(|g| g.router_frozen));
    let stage = groups.iter().map(|g| g.stage).max().unwrap_or_default();
    trainer.enter_stage(stage, kl_penalty)
}

/// Takes the gathered groups out of `groups`, sorted by id.
fn in_id_order(groups: &mut Vec<TrajectoryGroup>) -> Vec<TrajectoryGroup> {
    let mut taken = std::mem::take(groups);
    taken.sort_by(|a, b| a.group_id.cmp(&b.group_id));
    taken
}

impl LearnerHandle {
    /// Queues a scored group; a group id seen before is acknowledged and ignored. A group with
    /// no trajectories is accepted: the orchestrator sends one for a prompt slot whose every
    /// attempt failed, so that the step (which counts its groups) still completes; it adds
    /// nothing to the step, and a step of empty groups only is skipped.
    pub fn submit(&self, g: TrajectoryGroup) -> Result<(), SubmitError> {
        let checked = if g.trajectories.is_empty() {
            check_sizes(&g).and_then(|()| group_objective(&g).map(drop))
        } else if g.supervised {
            group_sft(&g).map(drop)
        } else {
            group_sequences(&g)
                .and_then(|_| group_objective(&g))
                .map(drop)
        }
        .and_then(|()| check_vocabulary(&g, self.vocab))
        .and_then(|()| self.check_step(&g));
        if let Err(reason) = checked {
            return Err(SubmitError::Invalid {
                run_id: g.run_id,
                group_id: g.group_id,
                reason,
            });
        }
        // Trained into a version this learner holds already: the orchestrator sent it again
        // after this learner restarted from a checkpoint at or past its step.
        if g.step.is_some_and(|s| s < self.version()) {
            tracing::debug!(run_id = %g.run_id, group_id = %g.group_id, step = g.step, "group of a step already trained: acknowledged, not trained again");
            return Ok(());
        }
        if !self
            .seen_groups
            .lock()
            .expect("not poisoned")
            .insert(g.group_id.clone())
        {
            tracing::debug!(run_id = %g.run_id, group_id = %g.group_id, "group seen before: acknowledged again");
            return Ok(());
        }
        let (run_id, group_id) = (g.run_id.clone(), g.group_id.clone());
        self.work
            .send(Work::Group(Box::new(g)))
            .map_err(|_| SubmitError::Stopped { run_id, group_id })
    }

    /// A group's `step` is at most [`MAX_STEPS_AHEAD`] past this learner's version.
    fn check_step(&self, g: &TrajectoryGroup) -> Result<(), String> {
        let version = self.version();
        match g.step {
            Some(step) if step > version.saturating_add(MAX_STEPS_AHEAD) => Err(format!(
                "step is {step}, but this learner is at version {version} and holds groups at \
                 most {MAX_STEPS_AHEAD} steps ahead (a learner restarted from an older \
                 checkpoint than the orchestrator kept groups for?)"
            )),
            _ => Ok(()),
        }
    }

    /// Where this learner stands, as `Status` answers.
    pub fn status(&self) -> LearnerStatus {
        LearnerStatus {
            run_id: self.run_id.clone(),
            policy_version: self.version(),
            checkpoint_version: *self.checkpoint_version.lock().expect("not poisoned"),
            start_version: self.start_version,
        }
    }

    /// Drops the groups held for steps not yet trained, once the step in training (if any) is
    /// done; returns when they are gone. Blocks: call it off the async runtime.
    pub fn discard_pending(&self) {
        let (done, wait) = std::sync::mpsc::sync_channel(1);
        if self.work.send(Work::DiscardPending(done)).is_ok() {
            let _ = wait.recv();
        }
    }

    /// Reports of every step from now on.
    pub fn reports(&self) -> broadcast::Receiver<StepReport> {
        self.reports.subscribe()
    }

    /// How many of the newest versions are kept to stream exactly.
    pub fn keep_versions(&self) -> usize {
        self.keep
    }

    /// The latest published version.
    pub fn version(&self) -> u64 {
        self.published.borrow().version
    }

    /// Waits until `version` is published and returns exactly it, or `None` when it is no
    /// longer kept (older than the newest `keep_versions`).
    pub async fn wait_for_exact(&self, version: u64) -> Option<Arc<Published>> {
        self.wait_for(version).await;
        self.recent
            .lock()
            .expect("not poisoned")
            .iter()
            .find(|p| p.version == version)
            .cloned()
    }

    /// Waits until a version of at least `version` is published and returns the latest.
    pub async fn wait_for(&self, version: u64) -> Arc<Published> {
        let mut rx = self.published.clone();
        loop {
            let p = rx.borrow_and_update().clone();
            if p.version >= version {
                return p;
            }
            if rx.changed().await.is_err() {
                return p;
            }
        }
    }
}

/// The gRPC `Learner` service.
#[derive(Clone)]
pub struct LearnerService {
    handle: LearnerHandle,
}

impl LearnerService {
    /// The service in front of the training thread behind `handle`.
    pub fn new(handle: LearnerHandle) -> Self {
        Self { handle }
    }
}

type WeightStream = Pin<Box<dyn Stream<Item = Result<WeightChunk, Status>> + Send>>;
type StepStream = Pin<Box<dyn Stream<Item = Result<StepReportMsg, Status>> + Send>>;

#[tonic::async_trait]
impl Learner for LearnerService {
    type StreamWeightsStream = WeightStream;
    type StreamStepsStream = StepStream;

    async fn stream_steps(
        &self,
        request: Request<StreamStepsRequest>,
    ) -> Result<Response<Self::StreamStepsStream>, Status> {
        let after = request.into_inner().after_step;
        // Subscribe before reading the history so that no step falls between the two.
        let mut live = self.handle.step_msgs.subscribe();
        let past: Vec<StepReportMsg> = self
            .handle
            .history
            .lock()
            .expect("not poisoned")
            .iter()
            .filter(|r| r.step > after)
            .cloned()
            .collect();
        let mut last = past.last().map(|r| r.step).unwrap_or(after);
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            for r in past {
                if tx.send(Ok(r)).await.is_err() {
                    return;
                }
            }
            while let Ok(r) = live.recv().await {
                if r.step <= last {
                    continue;
                }
                last = r.step;
                if tx.send(Ok(r)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn status(
        &self,
        request: Request<LearnerStatusRequest>,
    ) -> Result<Response<LearnerStatus>, Status> {
        let request = request.into_inner();
        let run_id = request.run_id;
        if !run_id.is_empty() && run_id != self.handle.run_id {
            return Err(Status::not_found(format!(
                "this learner trains run `{}`, not `{run_id}`",
                self.handle.run_id
            )));
        }
        if request.discard_pending {
            let handle = self.handle.clone();
            tokio::task::spawn_blocking(move || handle.discard_pending())
                .await
                .map_err(|e| Status::internal(format!("dropping the pending groups: {e}")))?;
        }
        let status = self.handle.status();
        if !run_id.is_empty() && run_id != status.run_id {
            return Err(Status::not_found(format!(
                "this learner trains run `{}`, not `{run_id}`",
                status.run_id
            )));
        }
        Ok(Response::new(status))
    }

    async fn submit_trajectories(
        &self,
        request: Request<Streaming<TrajectoryGroup>>,
    ) -> Result<Response<SubmitTrajectoriesResponse>, Status> {
        let mut inbound = request.into_inner();
        let mut resp = SubmitTrajectoriesResponse::default();
        while let Some(g) = inbound.next().await {
            let g = g?;
            let id = g.group_id.clone();
            let span = tracing::info_span!(
                "submit_trajectories",
                run_id = %g.run_id,
                group_id = %id,
                // Steps taken so far: every step, skipped or not, publishes one version.
                step = self.handle.version(),
                // The trajectories' request ids, so that a request id found in the orchestrator's
                // or a worker's log leads here.
                request_ids = %g
                    .trajectories
                    .iter()
                    .map(|t| t.request_id.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            );
            let _entered = span.enter();
            if !g.run_id.is_empty() && g.run_id != self.handle.run_id {
                let reason = format!(
                    "this learner trains run `{}`, not `{}`",
                    self.handle.run_id, g.run_id
                );
                tracing::warn!(reason, "group rejected");
                resp.rejected.push(RejectedGroup {
                    group_id: id,
                    reason,
                });
                continue;
            }
            match self.handle.submit(g) {
                Ok(()) => {
                    tracing::debug!("group accepted");
                    resp.accepted_group_ids.push(id)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "group rejected");
                    resp.rejected.push(RejectedGroup {
                        group_id: id,
                        reason: e.reason().to_string(),
                    })
                }
            }
        }
        Ok(Response::new(resp))
    }

    /// Streams the latest version once it is at least the requested one (waiting for it).
    async fn stream_weights(
        &self,
        request: Request<StreamWeightsRequest>,
    ) -> Result<Response<Self::StreamWeightsStream>, Status> {
        let req = request.into_inner();
        let published = if req.exact {
            self.handle
                .wait_for_exact(req.policy_version)
                .await
                .ok_or_else(|| {
                    Status::not_found(format!(
                        "policy version {} is no longer kept (the learner keeps its newest \
                         {}); it is at version {}",
                        req.policy_version,
                        self.handle.keep_versions(),
                        self.handle.version()
                    ))
                })?
        } else {
            self.handle.wait_for(req.policy_version).await
        };
        let start = req.start_chunk as usize;
        if start > published.chunks.len() {
            return Err(Status::out_of_range(format!(
                "start_chunk is {start}; version {} has {} chunks",
                published.version,
                published.chunks.len()
            )));
        }
        // Timed from here (the version is available) until the transport has taken the last
        // chunk, when the stream is polled past it; a transfer cut off before is not recorded.
        let bytes: u64 = published.chunks[start..]
            .iter()
            .map(|c| c.data.len() as u64)
            .sum();
        // Chunks are taken as the transport asks for them; their data is shared, not copied.
        let chunks = {
            let published = published.clone();
            tokio_stream::iter(start..published.chunks.len())
                .map(move |i| Ok::<_, Status>(published.chunks[i].clone()))
        };
        let started = std::time::Instant::now();
        let transfers = self.handle.transfers.clone();
        let (requester_id, policy_version) = (req.requester_id, published.version);
        let finished = tokio_stream::once(()).filter_map(move |()| {
            let finished_at_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            transfers
                .lock()
                .expect("not poisoned")
                .push(WeightTransfer {
                    requester_id: requester_id.clone(),
                    policy_version,
                    bytes,
                    seconds: started.elapsed().as_secs_f64(),
                    finished_at_ms,
                });
            None
        });
        Ok(Response::new(Box::pin(chunks.chain(finished))))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;
    use chorus_model::{NemotronHConfig, checkpoint::init_params};
    use chorus_proto::v1::Trajectory;
    use chorus_proto::weights::WeightAssembler;

    use super::*;
    use crate::trainer::LearnerConfig;

    fn learner() -> LearnerHandle {
        learner_saving_to(None)
    }

    fn learner_saving_to(checkpoints: Option<CheckpointPolicy>) -> LearnerHandle {
        let cfg = NemotronHConfig::from_json_str(
            r#"{"model_type": "nemotron_h", "vocab_size": 24, "hidden_size": 16,
            "hybrid_override_pattern": "*E", "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 8, "n_routed_experts": 4,
            "num_experts_per_tok": 2, "moe_intermediate_size": 8,
            "moe_shared_expert_intermediate_size": 8}"#,
        )
        .unwrap();
        let params = init_params(&cfg, 2, &Device::Cpu).unwrap();
        let config = LearnerConfig {
            schedule: chorus_proto::schedule::LrSchedule {
                peak_lr: 1e-2,
                ..Default::default()
            },
            ..Default::default()
        };
        serve_trainer(Trainer::new(cfg, params, config).unwrap(), checkpoints)
    }

    fn serve_trainer(trainer: Trainer, checkpoints: Option<CheckpointPolicy>) -> LearnerHandle {
        spawn_learner(
            trainer,
            LearnerServiceConfig {
                run_id: "run".into(),
                groups_per_step: 1,
                max_chunk_bytes: 1 << 16,
                keep_versions: 8,
                checkpoints,
            },
        )
    }

    fn group(id: &str, stage: u32, kl_coef: f64) -> TrajectoryGroup {
        let objective = Objective {
            kl_coef,
            ..Default::default()
        };
        let trajectory = |i: u32| Trajectory {
            trajectory_id: format!("{id}:t{i}"),
            prompt_token_ids: vec![3, 4 + i],
            completion_token_ids: vec![7, 9 + i, 7, 11],
            logprobs: vec![-2.0; 4],
            policy_versions: vec![0; 4],
            advantage: f64::from(i) - 0.5,
            ..Default::default()
        };
        TrajectoryGroup {
            run_id: "run".into(),
            group_id: id.into(),
            trajectories: vec![trajectory(0), trajectory(1)],
            objective: Some(objective.to_proto()),
            stage,
            ..Default::default()
        }
    }

    fn weights(p: &Published) -> BTreeMap<String, Vec<f32>> {
        let mut assembler = WeightAssembler::new();
        for c in &p.chunks {
            assembler.push(c).unwrap();
        }
        let (_, tensors) = assembler.finish().unwrap();
        tensors.into_iter().map(|(n, t)| (n, t.data)).collect()
    }

    #[test]
    fn each_stage_penalises_the_kl_to_its_own_start() {
        let handle = learner();
        let mut reports = handle.reports();
        for (i, stage) in [1, 1, 2, 2].into_iter().enumerate() {
            handle.submit(group(&format!("g{i}"), stage, 0.1)).unwrap();
        }
        let kls: Vec<f64> = (0..4)
            .map(|_| {
                let r = reports.blocking_recv().unwrap();
                assert!(r.skipped.is_none(), "{r:?}");
                r.stats.kl
            })
            .collect();
        // Exactly 0 at each stage's first step: the reference is the weights stage 2 began with,
        // not stage 1's (those had moved by then).
        assert_eq!(kls[0], 0.0);
        assert!(kls[1] > 0.0, "{kls:?}");
        assert_eq!(kls[2], 0.0, "{kls:?}");
        assert!(kls[3] > 0.0, "{kls:?}");
    }

    /// A learner killed after saving a checkpoint but before its report went out: started
    /// again from that checkpoint, it replays the reports saved there, that one included.
    #[test]
    fn a_learner_resumed_from_a_checkpoint_replays_the_reports_saved_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let policy = CheckpointPolicy {
            dir: dir.path().join("learner"),
            every: 2,
            keep: 2,
        };
        let handle = learner_saving_to(Some(policy.clone()));
        let mut reports = handle.reports();
        for i in 0..3 {
            handle.submit(group(&format!("g{i}"), 0, 0.0)).unwrap();
            reports.blocking_recv().unwrap();
        }
        let sent = handle.history.lock().unwrap().clone();
        assert_eq!(sent.len(), 3);
        assert_eq!(sent[1].checkpoint_version, Some(2), "{:?}", sent[1]);
        let (version, path) = checkpoints::latest(&policy.dir).unwrap().unwrap();
        assert_eq!(version, 2);
        drop(handle);

        let resumed = serve_trainer(Trainer::resume(&path, &Device::Cpu).unwrap(), Some(policy));
        assert_eq!(resumed.status().policy_version, 2);
        let replayed = resumed.history.lock().unwrap().clone();
        assert_eq!(
            replayed,
            sent[..2],
            "the reports up to the checkpoint, as sent"
        );
    }

    #[test]
    fn empty_groups_of_failed_slots_complete_their_step_and_add_nothing() {
        let handle = learner();
        let mut reports = handle.reports();
        let empty = |id: &str, supervised: bool| TrajectoryGroup {
            run_id: "run".into(),
            group_id: id.into(),
            supervised,
            step_groups: 2,
            ..Default::default()
        };
        // One slot failed, one delivered: the step trains on the one group.
        let mut delivered = group("a1", 0, 0.0);
        delivered.step_groups = 2;
        handle.submit(empty("a0:empty", false)).unwrap();
        handle.submit(delivered).unwrap();
        let first = reports.blocking_recv().unwrap();
        assert!(first.skipped.is_none(), "{first:?}");
        assert_eq!(first.version, 1);
        // Every slot failed: the step is skipped, and still publishes the next version.
        handle.submit(empty("b0:empty", false)).unwrap();
        handle.submit(empty("b1:empty", false)).unwrap();
        let second = reports.blocking_recv().unwrap();
        assert!(second.skipped.is_some(), "{second:?}");
        assert_eq!(second.version, 2);
        // The same for a supervised step.
        handle.submit(empty("c0:empty", true)).unwrap();
        handle.submit(empty("c1:empty", true)).unwrap();
        let third = reports.blocking_recv().unwrap();
        assert!(third.skipped.is_some(), "{third:?}");
        assert_eq!(third.version, 3);
        let history = handle.history.lock().unwrap().clone();
        let trained: Vec<u32> = history.iter().map(|m| m.trajectories).collect();
        assert_eq!(trained, [2, 0, 0]);
    }

    #[test]
    fn groups_train_at_the_step_they_name_whatever_order_they_arrive_in() {
        let handle = learner();
        let mut reports = handle.reports();
        let at = |id: &str, step: u64| TrajectoryGroup {
            step: Some(step),
            ..group(id, 0, 0.0)
        };
        // Step 1's group overtakes step 0's (as new groups overtake the ones an orchestrator
        // sends again after a restart): it waits, then trains right after step 0.
        handle.submit(at("b", 1)).unwrap();
        handle.submit(at("a", 0)).unwrap();
        let versions: Vec<u64> = (0..2)
            .map(|_| reports.blocking_recv().unwrap().version)
            .collect();
        assert_eq!(versions, [1, 2]);
        // A group of a step already trained is acknowledged and not trained again.
        handle.submit(at("c", 0)).unwrap();
        handle.submit(at("d", 2)).unwrap();
        assert_eq!(reports.blocking_recv().unwrap().version, 3);
        let history = handle.history.lock().unwrap().clone();
        assert_eq!(history.len(), 3);
        // A step far past the learner's version is refused, naming the limit.
        let err = handle.submit(at("e", 3 + MAX_STEPS_AHEAD + 1)).unwrap_err();
        assert!(err.reason().contains("steps ahead"), "{err}");
        assert_eq!(handle.status().policy_version, 3);
        assert_eq!(handle.status().checkpoint_version, None);
        assert_eq!(handle.status().start_version, 0);

        // A restarted orchestrator has the groups held for an untrained step dropped, and sends
        // that step anew: the step trains on the new groups only, and says which.
        let pair = |id: &str| TrajectoryGroup {
            step_groups: 2,
            ..at(id, 3)
        };
        handle.submit(pair("f")).unwrap();
        handle.discard_pending();
        handle.submit(pair("g")).unwrap();
        handle.submit(pair("h")).unwrap();
        assert_eq!(reports.blocking_recv().unwrap().version, 4);
        let last = handle.history.lock().unwrap().last().cloned().unwrap();
        assert_eq!(last.group_ids, ["g", "h"]);
        assert_eq!(last.trajectories, 4);
    }

    #[test]
    fn a_group_can_freeze_the_router_for_its_step() {
        let handle = learner();
        let mut reports = handle.reports();
        let mut frozen = group("g0", 0, 0.0);
        frozen.router_frozen = true;
        handle.submit(frozen).unwrap();
        handle.submit(group("g1", 0, 0.0)).unwrap();
        for _ in 0..2 {
            assert!(reports.blocking_recv().unwrap().skipped.is_none());
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let [v0, v1, v2] =
            [0, 1, 2].map(|v| weights(&runtime.block_on(handle.wait_for_exact(v)).expect("kept")));
        let gate = "backbone.layers.1.mixer.gate.weight";
        let bias = "backbone.layers.1.mixer.gate.e_score_correction_bias";
        assert_eq!(v1[gate], v0[gate], "the frozen step moved the router");
        assert_ne!(
            v1[bias], v0[bias],
            "the frozen step did not balance the router"
        );
        assert_ne!(v1["lm_head.weight"], v0["lm_head.weight"]);
        assert_ne!(v2[gate], v1[gate], "the next step's router stayed frozen");
    }
}
