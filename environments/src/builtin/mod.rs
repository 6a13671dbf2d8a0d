//! The built-in environments, one per file.

mod arithmetic;
mod bfcl;
mod calendar;
mod chat_rm;
mod code_output;
mod code_python;
mod competitive;
mod countdown;
mod datasets;
mod expr;
mod function_calling;
mod game;
mod instruction_following;
mod judge;
mod knights_knaves;
mod math_word;
mod mcqa;
mod multi_hop;
mod needle;
mod numeric;
mod safety;
mod script;
mod sql;
mod structured_output;
mod sudoku;
mod swe;
#[cfg(test)]
mod testkit;
mod tool_agent;

pub use arithmetic::Arithmetic;
pub use bfcl::Bfcl;
pub use calendar::Calendar;
pub use chat_rm::{ChatRm, FormatRule, RewardRequest, RewardScorer, Rubric, RubricScorer};
pub use code_output::CodeOutput;
pub use code_python::CodePython;
pub use competitive::Competitive;
pub use countdown::Countdown;
pub use function_calling::FunctionCalling;
pub use game::Game;
pub use instruction_following::InstructionFollowing;
pub use knights_knaves::KnightsKnaves;
pub use math_word::MathWord;
pub use mcqa::Mcqa;
pub use multi_hop::MultiHop;
pub use needle::{Needle, NeedleConfig};
pub use safety::Safety;
pub use sql::Sql;
pub use structured_output::StructuredOutput;
pub use sudoku::Sudoku;
pub use swe::Swe;
pub use tool_agent::ToolAgent;

use std::sync::Arc;

use crate::env::Environment;
use crate::registry::Registry;

/// A registry holding every built-in environment with its default settings.
pub fn builtin_registry() -> Registry {
    let mut registry = Registry::new();
    let builtins: Vec<Arc<dyn Environment>> = vec![
        Arc::new(Arithmetic),
        Arc::new(Countdown),
        Arc::new(MathWord::generated()),
        Arc::new(MultiHop),
        Arc::new(Needle::default()),
        Arc::new(KnightsKnaves),
        Arc::new(Sudoku),
        Arc::new(Mcqa::generated()),
        Arc::new(InstructionFollowing::generated()),
        Arc::new(StructuredOutput),
        Arc::new(ToolAgent),
        Arc::new(FunctionCalling),
        Arc::new(Game),
        Arc::new(Calendar),
        Arc::new(Safety),
        Arc::new(ChatRm::default()),
        Arc::new(Sql),
        Arc::new(Swe),
        Arc::new(CodePython::generated()),
        Arc::new(CodeOutput),
        Arc::new(Competitive),
    ];
    for env in builtins {
        // Built-in names are distinct constants, so this never replaces anything.
        registry.replace(env);
    }
    registry
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_lists_builtins_and_names_them_in_lookup_errors() {
        let registry = builtin_registry();
        assert_eq!(
            registry
                .get("arithmetic")
                .map(|env| env.info().name)
                .ok()
                .as_deref(),
            Some("arithmetic")
        );
        let err = registry
            .get("nope")
            .err()
            .expect("unknown name must fail")
            .to_string();
        assert!(
            err.contains("arithmetic") && err.contains("countdown"),
            "{err}"
        );
        let listed = serde_json::to_value(registry.list()).unwrap();
        assert_eq!(listed[0]["name"], "arithmetic");
        assert_eq!(listed[0]["category"], "math");
        assert_eq!(listed[0]["turns"], "single");
    }

    #[test]
    fn every_builtin_passes_the_self_check_at_default_settings() {
        let registry = builtin_registry();
        assert_eq!(registry.len(), 21);
        let options = crate::CheckOptions {
            tasks_per_split: 4,
            ..crate::CheckOptions::default()
        };
        for env in registry.iter() {
            let report = crate::check_environment(env.as_ref(), &options);
            assert!(report.passed, "{}: {:#?}", report.env, report.failures);
            let level_zero = &report.prompt_stats[0];
            assert_eq!(level_zero.difficulty, 0);
            // Level 0 is for tiny models with a few hundred tokens of context.
            assert!(
                level_zero.max_prompt_bytes <= 200,
                "{}: {level_zero:?}",
                report.env
            );
        }
    }

    /// Model output that has tripped parsers elsewhere: odd Unicode (whose lowercase changes
    /// length), unbalanced markup, huge numbers, deep nesting, stray control characters.
    const NASTY: [&str; 14] = [
        "İİİ answer is Q",
        "\\boxed{\\boxed{\\frac{1}{0}}",
        "<tool_call>{\"name\": \"lookup\", \"arguments\": 5}</tool_call>",
        "<tool_call><tool_call></tool_call>",
        "99999999999999999999999999999999999999999999",
        "-0/0 = 1/0",
        "((((((((((((((((((((((((((((((((((((((((1",
        "</think></think><think>",
        "#### ####",
        "\u{0}\u{1b}[31m\u{202e}",
        "A=knight A=knave",
        "{\"a\": [[[[[[[[[[[[]]]]]]]]]]]]}",
        "25:99 pm",
        "ǅǅǅ ß ﬁ 10",
    ];

    #[test]
    fn no_scorer_or_step_panics_on_nasty_output() {
        let registry = builtin_registry();
        for env in registry.iter() {
            let info = env.info();
            for difficulty in [0, info.max_difficulty] {
                let task = env.sample(5, crate::Split::Train, difficulty).unwrap();
                for nasty in NASTY {
                    let score = env.score(&task, nasty).unwrap();
                    assert!(
                        score.reward.is_finite() && !score.is_full(),
                        "{}: {nasty:?} -> {score:?}",
                        info.name
                    );
                    let mut episode = env.start(&task).unwrap();
                    let outcome = env.step(&task, &mut episode, nasty).unwrap();
                    assert!(
                        outcome.score.is_none_or(|s| !s.is_full()),
                        "{}: {nasty:?}",
                        info.name
                    );
                }
            }
        }
    }

    #[test]
    fn duplicate_registration_is_an_error() {
        let mut registry = Registry::new();
        registry.register(Arithmetic).unwrap();
        assert!(matches!(
            registry.register(Arithmetic),
            Err(crate::EnvError::DuplicateEnvironment(_))
        ));
    }
}
