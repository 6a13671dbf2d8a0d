//! `chat_rm` through the public API: the rubric by default, another reward model plugged in.

use std::sync::Arc;

use chorus_environments::builtin::{ChatRm, RewardRequest, RewardScorer, RubricScorer};
use chorus_environments::{CheckOptions, Score, Split, builtin_registry, check_environment};

#[test]
fn the_builtin_is_an_rlhf_environment_that_passes_its_self_check() {
    let env = builtin_registry().get("chat_rm").unwrap();
    let info = serde_json::to_value(env.info()).unwrap();
    assert_eq!(info["category"], "rlhf");
    assert_eq!(info["turns"], "single");
    let report = check_environment(
        env.as_ref(),
        &CheckOptions {
            tasks_per_split: 6,
            difficulties: Some((0..=5).collect()),
            base_seed: 100,
        },
    );
    assert!(report.passed, "{:#?}", report.failures);
}

/// A stand-in for a learned reward model that prefers shorter answers and reports the rubric's
/// verdict beside its own.
#[derive(Debug)]
struct Brevity;

impl RewardScorer for Brevity {
    fn name(&self) -> &str {
        "brevity"
    }

    fn score(&self, request: &RewardRequest<'_>) -> Score {
        let rubric = RubricScorer.score(request);
        let words = request.response.split_whitespace().count() as f64;
        Score {
            reward: 1.0 / (1.0 + words / 10.0),
            components: Vec::new(),
            reason: format!("{words} words"),
        }
        .with_component("rubric", rubric.reward)
    }
}

#[test]
fn a_registry_can_swap_in_another_reward_model() {
    let mut registry = builtin_registry();
    registry.replace(Arc::new(ChatRm::with_scorer(Arc::new(Brevity))));
    let env = registry.get("chat_rm").unwrap();
    assert!(env.info().description.contains("brevity"));
    let task = env.sample(4, Split::Train, 1).unwrap();
    let reference = env.reference(&task).unwrap();
    let short = env.score(&task, "Light scatters.").unwrap();
    let long = env.score(&task, &reference).unwrap();
    assert!(short.reward > long.reward, "{short:?} {long:?}");
    assert_eq!(long.component("rubric"), Some(1.0));
    assert!(short.component("rubric").unwrap() < 1.0);
}
