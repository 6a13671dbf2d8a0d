//! A built-in environment served over gRPC (`serve_environment`) and used through
//! `RemoteEnvironment` behaves exactly like the built-in itself: same tasks, same scores, same
//! reference solutions and episodes, and the self-check passes through the wire. Wrong tokens
//! and absent servers are refused with the address named.

use std::sync::Arc;

use chorus_environments::plugin::{RemoteEnvironment, ServedEnvironment, serve_environment};
use chorus_environments::{
    CheckOptions, EnvError, Environment, Split, builtin_registry, check_environment,
    run_reference_episode,
};

const TOKEN: &str = "plugin-test-token";

/// A server runtime and one built-in served on it.
fn serve(
    name: &str,
) -> (
    tokio::runtime::Runtime,
    ServedEnvironment,
    Arc<dyn Environment>,
) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let env = builtin_registry().get(name).unwrap();
    let served = rt
        .block_on(serve_environment(env.clone(), "127.0.0.1:0", TOKEN))
        .unwrap();
    (rt, served, env)
}

#[test]
fn a_served_builtin_round_trips_sample_score_reference_and_wrong_completions() {
    let (_rt, served, local) = serve("countdown");
    let remote = RemoteEnvironment::connect(&served.url(), TOKEN).unwrap();
    assert_eq!(remote.info().name, served.url());
    assert_eq!(remote.plugin_info(), &local.info());
    for split in Split::ALL {
        for difficulty in [0, 2] {
            let mine = local.sample(11, split, difficulty).unwrap();
            let theirs = remote.sample(11, split, difficulty).unwrap();
            assert_eq!(theirs.env, served.url());
            assert_eq!(
                (
                    &theirs.id,
                    theirs.split,
                    theirs.difficulty,
                    theirs.seed,
                    &theirs.prompt
                ),
                (
                    &mine.id,
                    mine.split,
                    mine.difficulty,
                    mine.seed,
                    &mine.prompt
                )
            );
            let reference = remote.reference(&theirs).unwrap();
            assert_eq!(reference, local.reference(&mine).unwrap());
            let full = remote.score(&theirs, &reference).unwrap();
            assert_eq!(full, local.score(&mine, &reference).unwrap());
            assert!(full.is_full());
            let wrong = remote.wrong_completions(&theirs).unwrap();
            assert_eq!(wrong, local.wrong_completions(&mine).unwrap());
            for w in wrong.iter().chain([&"garbage".to_string()]) {
                let score = remote.score(&theirs, w).unwrap();
                assert_eq!(score, local.score(&mine, w).unwrap());
                assert!(!score.is_full(), "{w}: {score:?}");
            }
        }
    }
}

#[test]
fn multi_turn_episodes_step_through_the_wire() {
    for name in ["game", "tool_agent"] {
        let (_rt, served, local) = serve(name);
        let remote = RemoteEnvironment::connect(&served.url(), TOKEN).unwrap();
        for seed in 0..3 {
            let task = remote.sample(seed, Split::Train, 0).unwrap();
            let score = run_reference_episode(&remote, &task).unwrap();
            let mine = local.sample(seed, Split::Train, 0).unwrap();
            assert_eq!(score, run_reference_episode(local.as_ref(), &mine).unwrap());
            assert!(score.is_full(), "{name}: {score:?}");
            // The conversation the client keeps matches the local episode's.
            let mut theirs = remote.start(&task).unwrap();
            let mut ours = local.start(&mine).unwrap();
            let action = local.reference_action(&mine, &ours).unwrap();
            assert_eq!(remote.reference_action(&task, &theirs).unwrap(), action);
            let a = remote.step(&task, &mut theirs, &action).unwrap();
            let b = local.step(&mine, &mut ours, &action).unwrap();
            assert_eq!(a, b);
            assert_eq!(
                (theirs.messages, theirs.turn, theirs.done),
                (ours.messages, ours.turn, ours.done)
            );
        }
    }
}

#[test]
fn the_self_check_passes_through_the_wire() {
    for name in ["arithmetic", "game"] {
        let (_rt, served, _) = serve(name);
        let remote = RemoteEnvironment::connect(&served.url(), TOKEN).unwrap();
        let report = check_environment(
            &remote,
            &CheckOptions {
                tasks_per_split: 2,
                ..CheckOptions::default()
            },
        );
        assert!(report.passed, "{name}: {:#?}", report.failures);
    }
}

#[test]
fn foreign_tasks_and_wrong_tokens_are_refused_with_the_address_named() {
    let (_rt, served, local) = serve("arithmetic");
    let err = RemoteEnvironment::connect(&served.url(), "not-the-token").unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, EnvError::Remote { .. })
            && text.contains(&served.url())
            && text.contains("refused the token"),
        "{text}"
    );
    // A task of another environment is refused before anything is sent.
    let remote = RemoteEnvironment::connect(&served.url(), TOKEN).unwrap();
    let foreign = local.sample(0, Split::Train, 0).unwrap();
    assert!(matches!(
        remote.score(&foreign, "1"),
        Err(EnvError::WrongEnvironment { .. })
    ));
    // Nobody listens on a port we just closed.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let err = RemoteEnvironment::connect(&url, TOKEN)
        .unwrap_err()
        .to_string();
    assert!(err.contains(&url) && err.contains("running"), "{err}");
}

#[test]
fn a_remote_environment_works_inside_async_code_and_is_dropped_there() {
    let (rt, served, _) = serve("arithmetic");
    let url = served.url();
    // The orchestrator calls environments from spawn_blocking threads and drops its registry
    // inside async code; neither may panic.
    let reward = rt.block_on(async move {
        let remote = tokio::task::spawn_blocking(move || RemoteEnvironment::connect(&url, TOKEN))
            .await
            .unwrap()
            .unwrap();
        let remote = Arc::new(remote);
        let r = remote.clone();
        let reward = tokio::task::spawn_blocking(move || {
            let task = r.sample(3, Split::Heldout, 1).unwrap();
            r.score(&task, &r.reference(&task).unwrap()).unwrap().reward
        })
        .await
        .unwrap();
        drop(remote);
        reward
    });
    assert_eq!(reward, 1.0);
}
