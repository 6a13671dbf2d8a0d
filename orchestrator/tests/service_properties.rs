//! Property tests of the `Orchestrator` service called in-process with arbitrary requests:
//! unknown, empty and foreign run ids, empty ids and bad endpoints, any capacity, sequence
//! and version numbers (`u64::MAX` included), any page token, limit, reward filter and
//! `after_sequence`, any launched configuration. Every call is answered (no panic), and every
//! refusal is a status whose message names the field or the run id it refuses.

use std::sync::Arc;

use chorus_orchestrator::directory::{Directory, Leases};
use chorus_orchestrator::fleet::Fleet;
use chorus_orchestrator::ledger::{Ledger, NewRun, RunStatus};
use chorus_orchestrator::service::OrchestratorService;
use chorus_proto::tonic::{Code, Request, Status};
use chorus_proto::v1::orchestrator_server::Orchestrator;
use chorus_proto::v1::{
    GetRunRequest, LaunchRunRequest, LearnerHeartbeatRequest, ListRolloutsRequest, ListRunsRequest,
    RegisterLearnerRequest, RegisterWorkerRequest, WatchRunRequest, WorkerHeartbeatRequest,
};
use proptest::prelude::*;

const SERVED: &str = "run-a";

const VALID_CONFIG: &str = r#"
name = "launched"
[model]
init_config = "m.json"
[[stages]]
name = "s"
kind = "sft"
steps = 1
environments = [{ name = "arithmetic" }]
"#;

fn run_id() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(SERVED.to_string()),
        Just(String::new()),
        Just("unknown-run".to_string()),
        "\\PC{0,16}",
    ]
}

fn id() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), "[a-z0-9]{1,8}", "\\PC{0,16}"]
}

fn endpoint() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("http://127.0.0.1:9".to_string()),
        Just("https://w:1".to_string()),
        Just(String::new()),
        "\\PC{0,20}",
    ]
}

fn big() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..4, Just(u64::MAX), Just(u64::MAX - 1), any::<u64>()]
}

fn small() -> impl Strategy<Value = u32> {
    prop_oneof![0u32..4, Just(u32::MAX), any::<u32>()]
}

/// One call of the service, with its request.
#[derive(Clone, Debug)]
enum Call {
    RegisterWorker(RegisterWorkerRequest),
    WorkerHeartbeat(WorkerHeartbeatRequest),
    RegisterLearner(RegisterLearnerRequest),
    LearnerHeartbeat(LearnerHeartbeatRequest),
    LaunchRun(LaunchRunRequest),
    GetRun(GetRunRequest),
    ListRuns(ListRunsRequest),
    GetRunSummary(GetRunRequest),
    ListRollouts(ListRolloutsRequest),
    WatchRun(WatchRunRequest),
}

fn call() -> impl Strategy<Value = Call> {
    prop_oneof![
        (id(), endpoint(), small(), big(), id(), run_id()).prop_map(
            |(worker_id, endpoint, capacity, policy_version, model, run_id)| {
                Call::RegisterWorker(RegisterWorkerRequest {
                    worker_id,
                    endpoint,
                    capacity,
                    policy_version,
                    model,
                    run_id,
                })
            }
        ),
        (id(), big(), small(), small(), big(), run_id(), run_id()).prop_map(
            |(worker_id, sequence, capacity, in_flight, policy_version, run_id, serving_run_id)| {
                Call::WorkerHeartbeat(WorkerHeartbeatRequest {
                    worker_id,
                    sequence,
                    capacity,
                    in_flight,
                    policy_version,
                    run_id,
                    serving_run_id,
                })
            }
        ),
        (id(), endpoint(), run_id(), big(), small()).prop_map(
            |(learner_id, endpoint, run_id, policy_version, devices)| {
                Call::RegisterLearner(RegisterLearnerRequest {
                    learner_id,
                    endpoint,
                    run_id,
                    policy_version,
                    devices,
                })
            }
        ),
        (id(), big(), run_id(), big(), big(), small(), run_id()).prop_map(
            |(
                learner_id,
                sequence,
                run_id,
                step,
                policy_version,
                queued_groups,
                serving_run_id,
            )| {
                Call::LearnerHeartbeat(LearnerHeartbeatRequest {
                    learner_id,
                    sequence,
                    run_id,
                    step,
                    policy_version,
                    queued_groups,
                    serving_run_id,
                })
            }
        ),
        (
            id(),
            prop_oneof![Just(String::new()), Just("../x".to_string()), "\\PC{0,10}"],
            prop_oneof![
                Just(VALID_CONFIG.to_string()),
                Just(String::new()),
                "\\PC{0,40}",
                Just(VALID_CONFIG.replace("steps = 1", "steps = -1")),
            ],
            prop::option::of(big()),
            prop::option::of(big()),
        )
            .prop_map(|(request_id, name, config_toml, eval_tasks, eval_every)| {
                Call::LaunchRun(LaunchRunRequest {
                    request_id,
                    name,
                    config_toml,
                    eval_tasks,
                    eval_every,
                })
            }),
        run_id().prop_map(|run_id| Call::GetRun(GetRunRequest { run_id })),
        (
            small(),
            prop::option::of(-2i32..8),
            prop_oneof![Just(String::new()), "\\PC{0,8}"]
        )
            .prop_map(|(limit, status, page_token)| {
                Call::ListRuns(ListRunsRequest {
                    limit,
                    status,
                    page_token,
                })
            }),
        run_id().prop_map(|run_id| Call::GetRunSummary(GetRunRequest { run_id })),
        (
            run_id(),
            id(),
            prop::option::of(prop_oneof![
                Just(f64::NAN),
                Just(f64::INFINITY),
                Just(f64::NEG_INFINITY),
                -2.0f64..2.0
            ]),
            small(),
        )
            .prop_map(|(run_id, environment, min_reward, limit)| {
                Call::ListRollouts(ListRolloutsRequest {
                    run_id,
                    environment,
                    min_reward,
                    limit,
                })
            }),
        (run_id(), big()).prop_map(|(run_id, after_sequence)| {
            Call::WatchRun(WatchRunRequest {
                run_id,
                after_sequence,
            })
        }),
    ]
}

/// Whether the service must refuse `c` (a call about a run the ledger does not hold, or a
/// reward filter that is not a number), and the word its refusal must then contain.
fn must_refuse(c: &Call) -> Option<String> {
    let unknown = |run_id: &str| (run_id != SERVED).then(|| format!("`{run_id}`"));
    match c {
        Call::GetRun(r) | Call::GetRunSummary(r) => unknown(&r.run_id),
        Call::WatchRun(r) => unknown(&r.run_id),
        Call::ListRollouts(r) => {
            if r.min_reward.is_some_and(|m| !m.is_finite()) {
                Some("min_reward".into())
            } else {
                unknown(&r.run_id)
            }
        }
        Call::RegisterLearner(r) if r.learner_id.is_empty() => Some("learner_id".into()),
        Call::RegisterLearner(r) if !r.run_id.is_empty() => unknown(&r.run_id),
        Call::RegisterWorker(r) if !r.run_id.is_empty() && r.run_id != SERVED => unknown(&r.run_id),
        Call::RegisterWorker(r) if r.worker_id.is_empty() => Some("worker_id".into()),
        _ => None,
    }
}

/// Runs `c`, returning the status it was refused with, if it was, and the words one of which
/// that status must contain (the fields it may refuse, or the run id it asked about).
async fn run(service: &OrchestratorService, c: Call) -> (Result<(), Status>, Vec<String>) {
    let asked = |run_id: &str| vec![format!("`{run_id}`")];
    let fields = |f: &[&str]| f.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    match c {
        Call::RegisterWorker(r) => {
            let mut words = asked(&r.run_id);
            words.extend(fields(&["worker_id", "endpoint", "capacity"]));
            let got = service.register_worker(Request::new(r)).await.map(drop);
            (got, words)
        }
        Call::WorkerHeartbeat(r) => (
            service.worker_heartbeat(Request::new(r)).await.map(drop),
            vec![],
        ),
        Call::RegisterLearner(r) => {
            let mut words = asked(&r.run_id);
            words.extend(fields(&["learner_id", "endpoint"]));
            let got = service.register_learner(Request::new(r)).await.map(drop);
            (got, words)
        }
        Call::LearnerHeartbeat(r) => (
            service.learner_heartbeat(Request::new(r)).await.map(drop),
            vec![],
        ),
        Call::LaunchRun(r) => (
            service.launch_run(Request::new(r)).await.map(drop),
            fields(&[
                "request_id",
                "name `",
                "eval_tasks",
                "eval_every",
                "the launched config: `",
            ]),
        ),
        Call::GetRun(r) => {
            let words = asked(&r.run_id);
            (service.get_run(Request::new(r)).await.map(drop), words)
        }
        Call::ListRuns(r) => (
            service.list_runs(Request::new(r)).await.map(drop),
            fields(&["page_token"]),
        ),
        Call::GetRunSummary(r) => {
            let words = asked(&r.run_id);
            (
                service.get_run_summary(Request::new(r)).await.map(drop),
                words,
            )
        }
        Call::ListRollouts(r) => {
            let mut words = asked(&r.run_id);
            words.push("min_reward".into());
            (
                service.list_rollouts(Request::new(r)).await.map(drop),
                words,
            )
        }
        Call::WatchRun(r) => {
            let words = asked(&r.run_id);
            // The stream is not read: a served run's live events never end.
            (service.watch_run(Request::new(r)).await.map(drop), words)
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, .. ProptestConfig::default() })]

    #[test]
    fn any_call_is_answered_and_refusals_name_what_they_refuse(calls in prop::collection::vec(call(), 1..12)) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let outcome: Result<(), TestCaseError> = runtime.block_on(async {
            let url = format!("sqlite://{}", tmp.path().join("ledger.sqlite").display());
            let ledger = Ledger::open(&url).await.unwrap();
            ledger
                .insert_run(NewRun {
                    id: SERVED.into(),
                    name: SERVED.into(),
                    config_toml: VALID_CONFIG.into(),
                    status: RunStatus::Running,
                })
                .await
                .unwrap();
            let fleet = Fleet::new(Leases::default(), Some("props".into()));
            fleet.serve_run(Directory::new(SERVED, Leases::default()), VALID_CONFIG.into());
            let service = OrchestratorService::new(Arc::clone(&fleet), ledger);
            for c in calls {
                let shown = format!("{c:?}");
                let must = must_refuse(&c);
                let (got, words) = run(&service, c).await;
                let Err(status) = got else {
                    prop_assert!(must.is_none(), "{shown} was not refused");
                    continue;
                };
                if let Some(word) = &must {
                    prop_assert!(status.message().contains(word.as_str()), "{shown}: {status:?}");
                }
                prop_assert!(
                    matches!(
                        status.code(),
                        Code::InvalidArgument | Code::NotFound | Code::FailedPrecondition
                    ),
                    "{shown}: {status:?}"
                );
                prop_assert!(
                    words.iter().any(|w| status.message().contains(w.as_str())),
                    "{shown}: `{}` names none of {words:?}",
                    status.message()
                );
            }
            Ok(())
        });
        outcome?;
    }
}
