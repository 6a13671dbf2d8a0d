//! Property tests of the `Environment` service (`serve_environment`) over gRPC, in front of the
//! built-in environments whose verification needs no sandbox: any request — any seed, split,
//! level and difficulty; a sampled task whose `task_json` has values removed, replaced by
//! values of another type or absurd size, or is not JSON at all; any episode state; any
//! completion and action — is answered, and a refusal is never a panic of the environment
//! (which the server turns into `INTERNAL` "panicked").

use std::sync::OnceLock;

use chorus_environments::builtin_registry;
use chorus_environments::plugin::{ServedEnvironment, serve_environment};
use chorus_proto::auth::AttachToken;
use chorus_proto::tonic::Code;
use chorus_proto::tonic::transport::Channel;
use chorus_proto::v1::environment_client::EnvironmentClient;
use chorus_proto::v1::{
    ReferenceRequest, SampleRequest, ScoreRequest, StartRequest, StepRequest, Task,
    WrongCompletionsRequest,
};
use proptest::prelude::*;
use serde_json::{Value, json};

const TOKEN: &str = "props";

/// Built-ins that verify in-process (the code environments run a sandbox, the judges a model).
/// This test found `knights_knaves` and `mcqa` panicking in `wrong_completions` on a mutated
/// `task_json` (an empty list of islanders, of choices); they now refuse such a task.
const ENVIRONMENTS: &[&str] = &[
    "arithmetic",
    "countdown",
    "sudoku",
    "calendar",
    "multi_hop",
    "needle",
    "game",
    "expr",
    "structured_output",
    "function_calling",
    "instruction_following",
    "tool_agent",
    "math_word",
    "numeric",
    "safety",
    "bfcl",
    "knights_knaves",
    "mcqa",
];

struct Served {
    runtime: tokio::runtime::Runtime,
    servers: Vec<(String, ServedEnvironment)>,
}

fn served() -> &'static Served {
    static SERVED: OnceLock<Served> = OnceLock::new();
    SERVED.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let registry = builtin_registry();
        let servers = ENVIRONMENTS
            .iter()
            .filter_map(|name| registry.get(name).ok().map(|env| (name.to_string(), env)))
            .map(|(name, env)| {
                let server = runtime
                    .block_on(serve_environment(env, "127.0.0.1:0", TOKEN))
                    .unwrap();
                (name, server)
            })
            .collect::<Vec<_>>();
        assert!(servers.len() > 8, "too few built-ins served");
        Served { runtime, servers }
    })
}

type Client = EnvironmentClient<
    chorus_proto::tonic::service::interceptor::InterceptedService<Channel, AttachToken>,
>;

async fn client(url: &str) -> Client {
    let channel = chorus_proto::tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    EnvironmentClient::with_interceptor(channel, AttachToken::new(TOKEN).unwrap())
}

/// A change to a task's `task_json`.
#[derive(Clone, Debug)]
enum Mutation {
    /// Replace the `n`th value (depth first) with `v`.
    Set(usize, Value),
    /// Remove the `n`th key.
    Remove(usize),
    /// Replace the whole text.
    Text(String),
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        Just(json!(-1)),
        Just(json!(0)),
        Just(json!(u64::MAX)),
        Just(json!(i64::MIN)),
        Just(json!(1e308)),
        Just(json!("")),
        "\\PC{0,12}".prop_map(Value::String),
        Just(json!([])),
        Just(json!({})),
        Just(json!([1, "a", null])),
        any::<bool>().prop_map(Value::Bool),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        6 => (any::<usize>(), value()).prop_map(|(n, v)| Mutation::Set(n, v)),
        3 => any::<usize>().prop_map(Mutation::Remove),
        1 => prop_oneof![Just(String::new()), Just("null".to_string()), "\\PC{0,16}"]
            .prop_map(Mutation::Text),
    ]
}

/// Every value of `v`, depth first, as pointers (`/a/0/b`).
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let p = format!("{at}/{}", k.replace('~', "~0").replace('/', "~1"));
                out.push(p.clone());
                pointers(x, p, out);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                let p = format!("{at}/{i}");
                out.push(p.clone());
                pointers(x, p, out);
            }
        }
        _ => {}
    }
}

fn mutate(task_json: &str, mutations: &[Mutation]) -> String {
    let Ok(mut v) = serde_json::from_str::<Value>(task_json) else {
        return task_json.to_string();
    };
    for m in mutations {
        let mut all = vec![];
        pointers(&v, String::new(), &mut all);
        match m {
            Mutation::Text(t) => return t.clone(),
            Mutation::Set(n, x) if !all.is_empty() => {
                if let Some(slot) = v.pointer_mut(&all[n % all.len()]) {
                    *slot = x.clone();
                }
            }
            Mutation::Remove(n) if !all.is_empty() => {
                let p = &all[n % all.len()];
                let (parent, key) = p.rsplit_once('/').unwrap();
                let parent = if parent.is_empty() {
                    Some(&mut v)
                } else {
                    v.pointer_mut(parent)
                };
                if let Some(Value::Object(m)) = parent {
                    m.remove(&key.replace("~1", "/").replace("~0", "~"));
                }
            }
            _ => {}
        }
    }
    v.to_string()
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("<think>x</think>\\boxed{42}".to_string()),
        Just("<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>".to_string()),
        Just("```python\nprint(1)\n```".to_string()),
        "\\PC{0,40}",
    ]
}

/// Says what is wrong when `answer` is a panic of the environment.
fn no_panic<T>(call: &str, answer: &Result<T, chorus_proto::tonic::Status>) -> Result<(), String> {
    match answer {
        Err(s) if s.code() == Code::Internal && s.message().contains("panicked") => {
            Err(format!("{call}: {}", s.message()))
        }
        _ => Ok(()),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, .. ProptestConfig::default() })]

    #[test]
    fn any_request_to_a_served_builtin_is_answered_without_a_panic(
        which in any::<usize>(),
        seed in any::<u64>(),
        split in prop_oneof![0i32..4, Just(99), Just(-1)],
        level in prop::option::of(prop_oneof![0u32..6, Just(u32::MAX)]),
        difficulty in prop::option::of(prop_oneof![Just(f32::NAN), Just(f32::INFINITY), Just(-1.0f32), 0.0f32..1.0]),
        mutations in prop::collection::vec(mutation(), 0..3),
        state_json in prop_oneof![Just(String::new()), Just("{}".to_string()), "\\PC{0,16}"],
        completion in text(),
        in_episode in any::<bool>(),
    ) {
        let s = served();
        let (name, server) = &s.servers[which % s.servers.len()];
        let outcome: Result<(), String> = s.runtime.block_on(async {
            let mut c = client(&server.url()).await;
            let sampled = c
                .sample(SampleRequest {
                    seed,
                    split,
                    difficulty,
                    level,
                    ..Default::default()
                })
                .await;
            no_panic("sample", &sampled)?;
            // A task to mutate: the sampled one, or a good one when the request was refused.
            let task = match sampled {
                Ok(r) => r.into_inner().task.unwrap_or_default(),
                Err(_) => c
                    .sample(SampleRequest { seed, split: 1, ..Default::default() })
                    .await
                    .map_err(|e| format!("a plain sample failed: {e}"))?
                    .into_inner()
                    .task
                    .unwrap_or_default(),
            };
            let task = Task {
                task_json: mutate(&task.task_json, &mutations),
                ..task
            };
            let t = || Some(task.clone());
            no_panic(
                "score",
                &c.score(ScoreRequest { task: t(), completion: completion.clone(), ..Default::default() }).await,
            )?;
            no_panic(
                "step",
                &c.step(StepRequest {
                    task: t(),
                    state_json: state_json.clone(),
                    action: completion.clone(),
                    ..Default::default()
                })
                .await,
            )?;
            no_panic(
                "reference",
                &c.reference(ReferenceRequest { task: t(), in_episode, state_json: state_json.clone(), turn: 0 }).await,
            )?;
            no_panic("wrong_completions", &c.wrong_completions(WrongCompletionsRequest { task: t() }).await)?;
            no_panic("start", &c.start(StartRequest { task: t() }).await)?;
            Ok(())
        });
        prop_assert!(outcome.is_ok(), "{name}: {}", outcome.unwrap_err());
    }
}
