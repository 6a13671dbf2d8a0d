//! `swe` through the public API: reference episodes, and episodes whose state crosses a wire.

use chorus_environments::{Episode, Split, builtin_registry, run_reference_episode};

#[test]
fn reference_episodes_fix_the_bug_at_every_level() {
    let env = builtin_registry().get("swe").unwrap();
    let info = env.info();
    assert_eq!(serde_json::to_value(&info).unwrap()["category"], "software");
    for level in 0..=info.max_difficulty {
        let task = env.sample(21, Split::Heldout, level).unwrap();
        let score = run_reference_episode(env.as_ref(), &task).unwrap();
        assert!(score.is_full(), "level {level}: {score:?}");
        let calls = score.component("tool_calls").unwrap();
        // Level 0 is one edit and a submit; higher levels look around and run the tests first.
        if level == 0 {
            assert_eq!(calls, 2.0);
        } else {
            assert!(calls >= 4.0, "level {level}: {calls}");
        }
    }
}

#[test]
fn the_repository_travels_in_the_episode_state() {
    let env = builtin_registry().get("swe").unwrap();
    let task = env.sample(3, Split::Train, 1).unwrap();
    let mut episode = env.start(&task).unwrap();
    while !episode.done {
        let action = env.reference_action(&task, &episode).unwrap();
        // Every step starts from a copy that went through JSON, as it would over the wire.
        let json = serde_json::to_string(&episode).unwrap();
        let mut copy: Episode = serde_json::from_str(&json).unwrap();
        let outcome = env.step(&task, &mut copy, &action).unwrap();
        episode = copy;
        if let Some(score) = outcome.score {
            assert!(score.is_full(), "{score:?}");
        }
    }
    let files = &episode.state["files"];
    assert!(files.as_object().is_some_and(|f| f.len() >= 2), "{files}");
}
