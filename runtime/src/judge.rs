//! An `rlhf` stage's environments: each of the stage's environments with its reward replaced by
//! a trained reward model's judgement. The environment still gives the prompts, and its verifier
//! still runs: its reward is kept as the score component `verifier`, and a completion counts as
//! solved when the verifier says so, so the held-out accuracy of an RLHF'd policy stays
//! measurable beside its reward-model score.
//!
//! Two judges, one per kind of `reward_model` stage:
//!
//! - [`RewardModelJudge`] (Bradley–Terry): the model's scalar score of each completion alone.
//! - [`GenRmJudge`] (a generative judge, `rm = "genrm"`): verdicts `[[score_1, score_2,
//!   ranking]]` on pairs of responses. A training group is scored together
//!   ([`Environment::score_group`], which the scheduler calls before advantages): the pairs of
//!   [`comparison_pairs`] (`comparisons = "circular"` or `"all_pairs"`) are judged, malformed
//!   verdicts dropped, and each completion's reward is the mean helpfulness it was given, a tie
//!   broken by the ranking ([`aggregate_scores`]). A completion scored alone
//!   ([`Environment::score`]: held-out evaluation, and each rollout before its group is) is
//!   compared with the environment's reference answer instead, in both orders so that neither
//!   position is favoured, and gets its own aggregated score; without a reference it gets the
//!   neutral [`UNJUDGED_SCORE`]. So the held-out `heldout_rm_score` of an rlhf stage judged by a
//!   GenRM is the mean helpfulness the judge gives the policy's answers next to the references.
//!   The group score keeps that reference comparison as the component [`VS_REFERENCE`].
//!
//! The GenRM judges greedily (deterministic: the same completions get the same verdicts) with
//! an in-process engine of the genrm stage's checkpoint ([`EngineJudge`]); the judge's
//! completions run up to the genrm stage's `max_new_tokens`. Only the response after a
//! completion's think block is shown to the judge; a multi-turn episode is judged on its final
//! action.

use std::path::Path;
use std::sync::Arc;

use chorus_environments::chat::Message;
use chorus_environments::preference::{
    Comparisons, Judgement, UNJUDGED_SCORE, aggregate_scores, comparison_pairs, genrm_prompt,
    parse_judgement,
};
use chorus_environments::{
    EnvError, EnvInfo, Environment, Episode, Score, Split, StepOutcome, Task, chat,
};
use chorus_learner::RewardModel;
use chorus_model::engine::{Engine, GenerationRequest};
use chorus_model::sampling::SamplingParams;
use chorus_model::tokenizer::Tokenizer;
use chorus_orchestrator::config::{RewardModelKind, Stage};

use crate::error::RunError;
use crate::plan::RunPlan;

/// The score component holding the environment's own reward.
pub const VERIFIER: &str = "verifier";
/// The score component that is 1 when the environment's verifier counts the completion solved.
pub const VERIFIED: &str = "verified";

/// An environment whose reward is replaced by a judge's, registered as `<inner>@<judge>`: the
/// prompts, references and episodes stay the inner environment's, and its verifier still runs
/// (components [`VERIFIER`] and [`VERIFIED`]). Only the scoring differs between judges
/// ([`Scoring`]).
pub struct Judged<S> {
    inner: Arc<dyn Environment>,
    scoring: S,
    name: String,
}

/// How a [`Judged`] environment turns a completion the inner verifier has scored into its
/// reward.
pub trait Scoring: Send + Sync + Sized {
    /// The reward of `completion` on `task` (an inner task) and why.
    fn reward(
        &self,
        env: &Judged<Self>,
        task: &Task,
        completion: &str,
    ) -> Result<(f64, String), EnvError>;

    /// A group's scores judged together, when this judge compares completions
    /// ([`Environment::score_group`]); `None` keeps the scores made alone.
    fn score_group(
        &self,
        _env: &Judged<Self>,
        _task: &Task,
        _completions: &[String],
        _scores: &[Score],
    ) -> Result<Option<Vec<Score>>, EnvError> {
        Ok(None)
    }
}

/// `inner` judged by a Bradley–Terry reward model.
pub type RewardModelJudge = Judged<BradleyTerry>;

/// `inner` judged by a generative reward model.
pub type GenRmJudge = Judged<GenRmScoring>;

impl<S: Scoring> Judged<S> {
    fn with(inner: Arc<dyn Environment>, scoring: S, judge_stage: &str) -> Self {
        let name = judged_name(&inner.info().name, judge_stage);
        Self {
            inner,
            scoring,
            name,
        }
    }

    /// The task as the inner environment made it.
    fn inner_task(&self, task: &Task) -> Task {
        Task {
            env: self.inner.info().name,
            ..task.clone()
        }
    }

    /// An error of this judge, naming the judged environment.
    fn judge_error(&self, message: String) -> EnvError {
        EnvError::InvalidConfig {
            env: self.name.clone(),
            message,
        }
    }

    /// The judged score of a completion the verifier scored `verified`.
    fn judged(&self, task: &Task, completion: &str, verified: &Score) -> Result<Score, EnvError> {
        let solved = self.inner.is_solved(verified);
        let (reward, why) = self.scoring.reward(self, task, completion)?;
        Ok(Score {
            reward,
            components: vec![],
            reason: format!("{why}; verifier {} ({})", verified.reward, verified.reason),
        }
        .with_component(VERIFIER, verified.reward)
        .with_component(VERIFIED, f64::from(u8::from(solved))))
    }
}

impl RewardModelJudge {
    /// `inner` judged by `model` (trained by stage `judge`), reading text with `tokenizer`.
    pub fn new(
        inner: Arc<dyn Environment>,
        model: Arc<RewardModel>,
        tokenizer: Arc<Tokenizer>,
        judge: &str,
    ) -> Self {
        Self::with(inner, BradleyTerry { model, tokenizer }, judge)
    }
}

/// A Bradley–Terry model's scalar score of each completion alone.
pub struct BradleyTerry {
    model: Arc<RewardModel>,
    tokenizer: Arc<Tokenizer>,
}

impl Scoring for BradleyTerry {
    /// The reward model's score of `completion`'s response after the task's prompt, read as the
    /// model was trained: the rendered prompt, the response, the end of the turn.
    fn reward(
        &self,
        env: &Judged<Self>,
        task: &Task,
        completion: &str,
    ) -> Result<(f64, String), EnvError> {
        let response = chat::parse_completion(completion).response;
        let text = format!(
            "{}{response}{}",
            chat::render_prompt(&task.prompt),
            chat::END_OF_TURN
        );
        let ids = self.tokenizer.encode(&text).map_err(|e| {
            env.judge_error(format!("tokenizing a completion for the reward model: {e}"))
        })?;
        let scores = self
            .model
            .score(&[ids])
            .map_err(|e| env.judge_error(format!("the reward model: {e}")))?;
        let reward = f64::from(scores[0]);
        Ok((reward, format!("reward model {reward:.4}")))
    }
}

/// The judge of an `rlhf` stage, loaded from the checkpoint its `reward_model` stage saved.
pub(crate) enum Judging {
    /// A Bradley–Terry model: each completion's score.
    BradleyTerry {
        model: Arc<RewardModel>,
        tokenizer: Arc<Tokenizer>,
        stage: String,
    },
    /// A GenRM: comparisons within each group.
    GenRm {
        judge: Arc<dyn Judge>,
        comparisons: Comparisons,
        stage: String,
    },
}

impl Judging {
    /// The judge of rlhf stage `stage`: reward-model stage `judge` of `plan`, saved in `dir`.
    pub(crate) fn load(
        plan: &RunPlan,
        stage: &Stage,
        judge: usize,
        dir: &Path,
    ) -> Result<Self, RunError> {
        let judge_stage = &plan.config.stages[judge];
        let failed = |e: &dyn std::fmt::Display| {
            RunError::Invalid(format!(
                "stage {}: the reward model of stage {} at {}: {e}",
                stage.name,
                judge_stage.name,
                dir.display()
            ))
        };
        let kind = judge_stage.reward_model.as_ref().map(|spec| spec.rm);
        Ok(match kind {
            Some(RewardModelKind::Genrm) => {
                let engine =
                    Engine::from_checkpoint(dir, &Default::default()).map_err(|e| failed(&e))?;
                Judging::GenRm {
                    judge: Arc::new(EngineJudge::new(
                        engine,
                        plan.tokenizer.clone(),
                        judge_stage.max_new_tokens,
                    )),
                    comparisons: stage.comparisons.unwrap_or(Comparisons::Circular),
                    stage: judge_stage.name.clone(),
                }
            }
            _ => Judging::BradleyTerry {
                model: Arc::new(
                    RewardModel::load(dir, &candle_core::Device::Cpu).map_err(|e| failed(&e))?,
                ),
                tokenizer: plan.tokenizer.clone(),
                stage: judge_stage.name.clone(),
            },
        })
    }

    /// `inner` judged by this judge, registered as `<inner>@<judge stage>`.
    pub(crate) fn judge(&self, inner: Arc<dyn Environment>) -> Arc<dyn Environment> {
        match self {
            Judging::BradleyTerry {
                model,
                tokenizer,
                stage,
            } => Arc::new(RewardModelJudge::new(
                inner,
                model.clone(),
                tokenizer.clone(),
                stage,
            )),
            Judging::GenRm {
                judge,
                comparisons,
                stage,
            } => Arc::new(GenRmJudge::new(inner, judge.clone(), *comparisons, stage)),
        }
    }
}

/// The name an environment judged by a reward-model stage is registered under.
pub fn judged_name(env: &str, judge: &str) -> String {
    format!("{env}@{judge}")
}

/// The score component of a [`GenRmJudge`]'s group score holding the completion's score against
/// the environment's reference.
pub const VS_REFERENCE: &str = "vs_reference";

/// Sequences a judge's engine advances together.
const JUDGE_BATCH: usize = 32;

/// Where a generative judge's completions come from: the trained GenRM ([`EngineJudge`]), or
/// anything else that answers judge prompts (tests).
pub trait Judge: Send + Sync {
    /// The judge's completion for each conversation of `prompts` (made by [`genrm_prompt`]), in
    /// order.
    fn complete(&self, prompts: &[Vec<Message>]) -> Result<Vec<String>, String>;
}

/// The trained GenRM, decoding greedily on an in-process engine.
pub struct EngineJudge {
    engine: Engine,
    tokenizer: Arc<Tokenizer>,
    max_new_tokens: usize,
    stop: Vec<u32>,
}

impl EngineJudge {
    /// A judge running `engine`, reading and writing text with `tokenizer`, writing at most
    /// `max_new_tokens` per verdict.
    pub fn new(engine: Engine, tokenizer: Arc<Tokenizer>, max_new_tokens: usize) -> Self {
        let stop = stop_tokens(&tokenizer);
        Self {
            engine,
            tokenizer,
            max_new_tokens,
            stop,
        }
    }
}

/// The tokens that end a turn.
pub(crate) fn stop_tokens(tokenizer: &Tokenizer) -> Vec<u32> {
    chat::STOP_SEQUENCES
        .iter()
        .filter_map(|s| tokenizer.token_id(s))
        .collect()
}

impl Judge for EngineJudge {
    fn complete(&self, prompts: &[Vec<Message>]) -> Result<Vec<String>, String> {
        let requests = prompts
            .iter()
            .map(|messages| {
                let prompt = self
                    .tokenizer
                    .encode(&chat::render_prompt(messages))
                    .map_err(|e| format!("tokenizing a judge prompt: {e}"))?;
                Ok(GenerationRequest {
                    prompt,
                    max_new_tokens: self.max_new_tokens,
                    sampling: SamplingParams::greedy(),
                    seed: 0,
                    stop_tokens: self.stop.clone(),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let generations = self
            .engine
            .generate_batch(&requests, JUDGE_BATCH)
            .map_err(|e| format!("the judge's engine: {e}"))?;
        generations
            .iter()
            .map(|g| {
                self.tokenizer
                    .decode(&g.tokens, false)
                    .map_err(|e| format!("decoding a verdict: {e}"))
            })
            .collect()
    }
}

/// A generative judge's comparisons: a group judged together, a completion alone against the
/// environment's reference.
pub struct GenRmScoring {
    judge: Arc<dyn Judge>,
    comparisons: Comparisons,
}

/// What a set of comparisons gave: each response's aggregated score, and how many verdicts
/// were malformed (and dropped).
struct Verdicts {
    scores: Vec<f64>,
    compared: usize,
    malformed: usize,
}

impl GenRmJudge {
    /// `inner` judged by `judge` (trained by stage `judge_stage`), a group compared by
    /// `comparisons`.
    pub fn new(
        inner: Arc<dyn Environment>,
        judge: Arc<dyn Judge>,
        comparisons: Comparisons,
        judge_stage: &str,
    ) -> Self {
        Self::with(inner, GenRmScoring { judge, comparisons }, judge_stage)
    }
}

impl GenRmScoring {
    /// Judges `pairs` of `responses` (response `i` shown first) and aggregates the verdicts.
    fn compare(
        &self,
        env: &GenRmJudge,
        task: &Task,
        responses: &[String],
        pairs: &[(usize, usize)],
    ) -> Result<Verdicts, EnvError> {
        let judge_error = |message: String| env.judge_error(format!("the GenRM judge: {message}"));
        let prompts: Vec<Vec<Message>> = pairs
            .iter()
            .map(|&(i, j)| genrm_prompt(&task.prompt, &responses[i], &responses[j]))
            .collect();
        let completions = self.judge.complete(&prompts).map_err(judge_error)?;
        if completions.len() != pairs.len() {
            return Err(judge_error(format!(
                "{} verdicts for {} comparisons",
                completions.len(),
                pairs.len()
            )));
        }
        let judgements: Vec<(usize, usize, Judgement)> = pairs
            .iter()
            .zip(&completions)
            .filter_map(|(&(i, j), text)| parse_judgement(text).ok().map(|v| (i, j, v)))
            .collect();
        Ok(Verdicts {
            scores: aggregate_scores(responses.len(), &judgements),
            compared: pairs.len(),
            malformed: pairs.len() - judgements.len(),
        })
    }
}

impl Scoring for GenRmScoring {
    /// `completion` against the environment's reference, in both orders.
    fn reward(
        &self,
        env: &GenRmJudge,
        task: &Task,
        completion: &str,
    ) -> Result<(f64, String), EnvError> {
        let reference = match env.inner.reference(&env.inner_task(task)) {
            Ok(r) => chat::parse_completion(&r).response,
            Err(e) => {
                return Ok((
                    UNJUDGED_SCORE,
                    format!("genrm {UNJUDGED_SCORE:.2}: no reference to compare with ({e})"),
                ));
            }
        };
        let responses = [chat::parse_completion(completion).response, reference];
        let verdicts = self.compare(
            env,
            task,
            &responses,
            &comparison_pairs(2, Comparisons::Circular),
        )?;
        let score = verdicts.scores[0];
        Ok((
            score,
            format!(
                "genrm {score:.2} against the reference ({} of 2 verdicts malformed)",
                verdicts.malformed
            ),
        ))
    }

    fn score_group(
        &self,
        env: &GenRmJudge,
        task: &Task,
        completions: &[String],
        scores: &[Score],
    ) -> Result<Option<Vec<Score>>, EnvError> {
        let responses: Vec<String> = completions
            .iter()
            .map(|c| chat::parse_completion(c).response)
            .collect();
        let pairs = comparison_pairs(responses.len(), self.comparisons);
        let verdicts = self.compare(env, task, &responses, &pairs)?;
        let rescored = verdicts
            .scores
            .iter()
            .zip(scores)
            .map(|(&reward, alone)| {
                let mut score = Score {
                    reward,
                    components: vec![],
                    reason: format!(
                        "genrm {reward:.2} from {} comparisons in the group ({} malformed); {}",
                        verdicts.compared, verdicts.malformed, alone.reason
                    ),
                };
                for name in [VERIFIER, VERIFIED] {
                    if let Some(v) = alone.component(name) {
                        score = score.with_component(name, v);
                    }
                }
                score.with_component(VS_REFERENCE, alone.reward)
            })
            .collect();
        Ok(Some(rescored))
    }
}

impl<S: Scoring> Environment for Judged<S> {
    fn info(&self) -> EnvInfo {
        EnvInfo {
            name: self.name.clone(),
            ..self.inner.info()
        }
    }

    fn sample(&self, seed: u64, split: Split, difficulty: u32) -> Result<Task, EnvError> {
        let task = self.inner.sample(seed, split, difficulty)?;
        Ok(Task {
            env: self.name.clone(),
            ..task
        })
    }

    fn score(&self, task: &Task, completion: &str) -> Result<Score, EnvError> {
        self.check_task(task)?;
        let verified = self.inner.score(&self.inner_task(task), completion)?;
        self.judged(task, completion, &verified)
    }

    fn score_group(
        &self,
        task: &Task,
        completions: &[String],
        scores: &[Score],
    ) -> Result<Option<Vec<Score>>, EnvError> {
        self.check_task(task)?;
        self.scoring.score_group(self, task, completions, scores)
    }

    fn is_solved(&self, score: &Score) -> bool {
        score.component(VERIFIED) == Some(1.0)
    }

    fn reference(&self, task: &Task) -> Result<String, EnvError> {
        self.check_task(task)?;
        self.inner.reference(&self.inner_task(task))
    }

    fn wrong_completions(&self, task: &Task) -> Result<Vec<String>, EnvError> {
        self.check_task(task)?;
        self.inner.wrong_completions(&self.inner_task(task))
    }

    fn start(&self, task: &Task) -> Result<Episode, EnvError> {
        self.check_task(task)?;
        self.inner.start(&self.inner_task(task))
    }

    fn step(
        &self,
        task: &Task,
        episode: &mut Episode,
        action: &str,
    ) -> Result<StepOutcome, EnvError> {
        self.check_task(task)?;
        let mut outcome = self.inner.step(&self.inner_task(task), episode, action)?;
        // A finished episode is judged on its final action.
        if let Some(verified) = outcome.score.take() {
            outcome.score = Some(self.judged(task, action, &verified)?);
        }
        Ok(outcome)
    }

    fn reference_action(&self, task: &Task, episode: &Episode) -> Result<String, EnvError> {
        self.inner.reference_action(&self.inner_task(task), episode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_environments::builtin_registry;

    /// A judge that reads each response as its helpfulness (a number, clamped to 1..=5) and
    /// ranks the higher one much better; equal ones get ranking 3 (response 1 slightly
    /// better), so ties show the tie-break; a response that is not a number makes the verdict
    /// malformed.
    struct Numbers;

    fn response(prompt: &str, n: u8) -> &str {
        let start = prompt
            .find(&format!("Response {n}:\n"))
            .expect("a judge prompt")
            + 12;
        let end = prompt[start..].find("\n\n").expect("a blank line after") + start;
        &prompt[start..end]
    }

    impl Judge for Numbers {
        fn complete(&self, prompts: &[Vec<Message>]) -> Result<Vec<String>, String> {
            Ok(prompts
                .iter()
                .map(|p| {
                    let text = &p[0].content;
                    let read = |n| response(text, n).trim().parse::<u8>().ok();
                    match (read(1), read(2)) {
                        (Some(a), Some(b)) => {
                            let (a, b) = (a.clamp(1, 5), b.clamp(1, 5));
                            let ranking = match a.cmp(&b) {
                                std::cmp::Ordering::Greater => 1,
                                std::cmp::Ordering::Less => 6,
                                std::cmp::Ordering::Equal => 3,
                            };
                            format!("<think>compare</think>[[{a}, {b}, {ranking}]]")
                        }
                        _ => "I cannot tell.".to_string(),
                    }
                })
                .collect())
        }
    }

    fn judged(comparisons: Comparisons) -> (GenRmJudge, Task) {
        let inner = builtin_registry().get("arithmetic").unwrap();
        let judge = GenRmJudge::new(inner, Arc::new(Numbers), comparisons, "judge");
        let task = judge.sample(3, Split::Train, 0).unwrap();
        (judge, task)
    }

    /// The group's rewards for `completions`, each first scored alone.
    fn group_rewards(comparisons: Comparisons, completions: &[&str]) -> Vec<Score> {
        let (judge, task) = judged(comparisons);
        let completions: Vec<String> = completions.iter().map(|c| c.to_string()).collect();
        let alone: Vec<Score> = completions
            .iter()
            .map(|c| judge.score(&task, c).unwrap())
            .collect();
        judge
            .score_group(&task, &completions, &alone)
            .unwrap()
            .expect("a GenRM scores groups together")
    }

    fn rewards(scores: &[Score]) -> Vec<f64> {
        scores.iter().map(|s| s.reward).collect()
    }

    #[test]
    fn circular_comparisons_average_each_responses_scores_and_break_ties_by_ranking() {
        // (0,1): 4 vs 2; (1,2): 2 vs 4; (2,0): 4 vs 4, ranking 3 gives the first +0.5.
        let scores = group_rewards(Comparisons::Circular, &["4", "2", "<think>x</think>4"]);
        assert_eq!(rewards(&scores), [3.75, 2.0, 4.25]);
        assert!(
            scores[0].reason.contains("from 3 comparisons"),
            "{scores:?}"
        );
    }

    #[test]
    fn all_pairs_compare_every_pair_once() {
        // (0,1): 4 vs 2; (0,2): 4 vs 4, ranking 3 (+0.5 to response 0); (1,2): 2 vs 4.
        let scores = group_rewards(Comparisons::AllPairs, &["4", "2", "4"]);
        assert_eq!(rewards(&scores), [4.25, 2.0, 3.75]);
        // Four responses: six comparisons.
        let four = group_rewards(Comparisons::AllPairs, &["1", "2", "3", "5"]);
        assert_eq!(rewards(&four), [1.0, 2.0, 3.0, 5.0]);
        assert!(four[0].reason.contains("from 6 comparisons"), "{four:?}");
    }

    #[test]
    fn malformed_verdicts_are_dropped_and_the_verifier_is_kept() {
        // Every verdict on "?" is malformed: it keeps the neutral score, the rest compare.
        let scores = group_rewards(Comparisons::AllPairs, &["5", "?", "1"]);
        assert_eq!(rewards(&scores), [5.0, UNJUDGED_SCORE, 1.0]);
        assert!(scores[1].reason.contains("(2 malformed)"), "{scores:?}");
        for score in &scores {
            assert!(score.component(VERIFIER).is_some() && score.component(VERIFIED).is_some());
            assert!(score.component(VS_REFERENCE).is_some());
        }
    }

    #[test]
    fn alone_a_completion_is_compared_with_the_reference_in_both_orders() {
        let (judge, task) = judged(Comparisons::Circular);
        let reference = judge.reference(&task).unwrap();
        // The reference is an arithmetic answer; as a helpfulness it clamps to 1..=5.
        let as_help = chat::parse_completion(&reference)
            .response
            .trim()
            .parse::<i64>()
            .map(|n| n.clamp(1, 5) as f64);
        let score = judge.score(&task, "2").unwrap();
        match as_help {
            // 2 against the reference's help, shown first and second: 2 both times unless tied,
            // when the rankings (3 either way) cancel out.
            Ok(_) => assert_eq!(score.reward, 2.0, "{score:?}"),
            Err(_) => assert_eq!(score.reward, UNJUDGED_SCORE, "{score:?}"),
        }
        assert!(score.reason.starts_with("genrm"), "{score:?}");
        let solved = judge.score(&task, &reference).unwrap();
        assert!(
            judge.is_solved(&solved),
            "the verifier decides solved: {solved:?}"
        );
        assert!(!judge.is_solved(&score));
    }
}
