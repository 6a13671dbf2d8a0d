//! Property tests of how Chorus reads an environment plugin's replies (`RemoteEnvironment`):
//! a plugin answering `Describe`, `Sample`, `Score`, `Step`, `Start`, `Reference` and
//! `WrongCompletions` with any values (no task, unknown splits and roles, non-finite rewards
//! and components, `task_json` that is not JSON, absurd sizes and levels) or with an error
//! status. Every call returns a value Chorus can use (finite rewards) or an error that names
//! the call; no reply makes the client panic.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use chorus_environments::plugin::RemoteEnvironment;
use chorus_environments::{Environment, Split};
use chorus_proto::auth::RequireToken;
use chorus_proto::tonic::{self, Request, Response, Status};
use chorus_proto::v1::environment_server::{Environment as Plugin, EnvironmentServer};
use chorus_proto::v1::{self, ChatMessage, RewardComponent};
use proptest::prelude::*;

const TOKEN: &str = "props";

/// What the fake plugin answers, set by each case.
#[derive(Clone, Debug, Default)]
struct Replies {
    describe: v1::DescribeResponse,
    sample: Option<v1::SampleResponse>,
    score: Option<v1::ScoreResponse>,
    step: Option<v1::StepResponse>,
    start: Option<v1::StartResponse>,
    reference: Option<v1::ReferenceResponse>,
    wrong: Option<v1::WrongCompletionsResponse>,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<Replies>>);

fn answer<T: Clone>(r: &Option<T>, call: &str) -> Result<Response<T>, Status> {
    r.clone()
        .map(Response::new)
        .ok_or_else(|| Status::invalid_argument(format!("{call}: the plugin refuses")))
}

#[tonic::async_trait]
impl Plugin for Fake {
    async fn describe(
        &self,
        _: Request<v1::DescribeRequest>,
    ) -> Result<Response<v1::DescribeResponse>, Status> {
        Ok(Response::new(self.0.lock().unwrap().describe.clone()))
    }
    async fn sample(
        &self,
        _: Request<v1::SampleRequest>,
    ) -> Result<Response<v1::SampleResponse>, Status> {
        answer(&self.0.lock().unwrap().sample, "sample")
    }
    async fn step(
        &self,
        _: Request<v1::StepRequest>,
    ) -> Result<Response<v1::StepResponse>, Status> {
        answer(&self.0.lock().unwrap().step, "step")
    }
    async fn score(
        &self,
        _: Request<v1::ScoreRequest>,
    ) -> Result<Response<v1::ScoreResponse>, Status> {
        answer(&self.0.lock().unwrap().score, "score")
    }
    async fn reference(
        &self,
        _: Request<v1::ReferenceRequest>,
    ) -> Result<Response<v1::ReferenceResponse>, Status> {
        answer(&self.0.lock().unwrap().reference, "reference")
    }
    async fn wrong_completions(
        &self,
        _: Request<v1::WrongCompletionsRequest>,
    ) -> Result<Response<v1::WrongCompletionsResponse>, Status> {
        answer(&self.0.lock().unwrap().wrong, "wrong_completions")
    }
    async fn start(
        &self,
        _: Request<v1::StartRequest>,
    ) -> Result<Response<v1::StartResponse>, Status> {
        answer(&self.0.lock().unwrap().start, "start")
    }
}

/// The fake plugin, served once for every case.
fn plugin() -> &'static (tokio::runtime::Runtime, String, Fake) {
    static PLUGIN: OnceLock<(tokio::runtime::Runtime, String, Fake)> = OnceLock::new();
    PLUGIN.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let fake = Fake::default();
        let service =
            EnvironmentServer::with_interceptor(fake.clone(), RequireToken::new(TOKEN).unwrap());
        let url = runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
            );
            format!("http://{addr}")
        });
        (runtime, url, fake)
    })
}

fn float() -> impl Strategy<Value = f64> {
    prop_oneof![
        4 => -1.0f64..2.0,
        1 => Just(f64::NAN),
        1 => Just(f64::INFINITY),
        1 => Just(f64::NEG_INFINITY),
        1 => Just(1e308),
    ]
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), "[a-z]{1,6}", "\\PC{0,12}"]
}

fn message() -> impl Strategy<Value = ChatMessage> {
    (
        prop_oneof![
            Just("user".to_string()),
            Just("system".to_string()),
            Just("tool".to_string()),
            text()
        ],
        text(),
    )
        .prop_map(|(role, content)| ChatMessage { role, content })
}

fn components() -> impl Strategy<Value = (HashMap<String, f64>, Vec<RewardComponent>)> {
    (
        prop::collection::hash_map(text(), float(), 0..3),
        prop::collection::vec(
            (text(), float()).prop_map(|(name, value)| RewardComponent { name, value }),
            0..3,
        ),
    )
}

fn task() -> impl Strategy<Value = v1::Task> {
    (
        text(),
        text(),
        prop_oneof![0i32..3, Just(99), Just(-4)],
        text(),
        text(),
        prop_oneof![
            Just(String::new()),
            Just("{\"a\": 1}".to_string()),
            Just("[".to_string()),
            text()
        ],
        prop_oneof![
            Just(0.5f32),
            Just(f32::NAN),
            Just(-3.0),
            Just(f32::INFINITY)
        ],
        prop_oneof![0u32..4, Just(u32::MAX)],
        any::<u64>(),
        prop::collection::vec(message(), 0..3),
    )
        .prop_map(
            |(
                environment,
                task_id,
                split,
                system_prompt,
                prompt,
                task_json,
                difficulty,
                level,
                seed,
                messages,
            )| {
                v1::Task {
                    environment,
                    task_id,
                    split,
                    system_prompt,
                    prompt,
                    task_json,
                    difficulty,
                    level,
                    seed,
                    messages,
                }
            },
        )
}

fn replies() -> impl Strategy<Value = Replies> {
    let describe = (
        text(),
        any::<bool>(),
        prop_oneof![0u32..4, Just(u32::MAX)],
        any::<u64>(),
        text(),
        prop_oneof![0u32..4, Just(u32::MAX)],
    )
        .prop_map(
            |(name, multi_turn, max_turns, train_size, category, max_level)| v1::DescribeResponse {
                name,
                multi_turn,
                max_turns,
                train_size,
                heldout_size: train_size / 3,
                category,
                max_level,
                ..Default::default()
            },
        );
    let score = (float(), components(), text()).prop_map(
        |(reward, (components, ordered_components), reason)| v1::ScoreResponse {
            reward,
            components,
            reason,
            ordered_components,
        },
    );
    let step = (text(), any::<bool>(), float(), components(), text(), text()).prop_map(
        |(
            observation,
            done,
            reward,
            (reward_components, ordered_components),
            state_json,
            observation_role,
        )| {
            v1::StepResponse {
                observation,
                done,
                reward,
                reward_components,
                state_json,
                observation_role,
                ordered_components,
                ..Default::default()
            }
        },
    );
    (
        describe,
        prop::option::of(prop::option::of(task()).prop_map(|task| v1::SampleResponse { task })),
        prop::option::of(score),
        prop::option::of(step),
        prop::option::of((prop::collection::vec(message(), 0..3), text()).prop_map(
            |(messages, state_json)| v1::StartResponse {
                messages,
                state_json,
            },
        )),
        prop::option::of(text().prop_map(|completion| v1::ReferenceResponse { completion })),
        prop::option::of(
            prop::collection::vec(text(), 0..3)
                .prop_map(|completions| v1::WrongCompletionsResponse { completions }),
        ),
    )
        .prop_map(
            |(describe, sample, score, step, start, reference, wrong)| Replies {
                describe,
                sample,
                score,
                step,
                start,
                reference,
                wrong,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, .. ProptestConfig::default() })]

    #[test]
    fn any_plugin_reply_is_used_or_refused_without_a_panic(r in replies(), completion in text()) {
        let (_, url, fake) = plugin();
        *fake.0.lock().unwrap() = r.clone();
        // `connect` builds its own runtime: called from this plain thread.
        let env = match RemoteEnvironment::connect(url, TOKEN) {
            Ok(env) => env,
            Err(e) => {
                prop_assert!(e.to_string().contains(url.as_str()), "{e}");
                return Ok(());
            }
        };
        let task = match env.sample(7, Split::Train, 0) {
            Ok(t) => t,
            Err(e) => {
                prop_assert!(e.to_string().to_lowercase().contains("sample"), "{e}");
                return Ok(());
            }
        };
        match env.score(&task, &completion) {
            Ok(s) => {
                prop_assert!(s.reward.is_finite(), "{s:?}");
            }
            Err(e) => prop_assert!(e.to_string().to_lowercase().contains("score"), "{e}"),
        }
        if let Ok(mut episode) = env.start(&task)
            && let Ok(outcome) = env.step(&task, &mut episode, &completion)
            && let Some(score) = outcome.score
        {
            prop_assert!(score.reward.is_finite(), "{score:?}");
        }
        let _ = env.reference(&task);
        let _ = env.wrong_completions(&task);
    }
}
