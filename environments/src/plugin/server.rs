//! [`serve_environment`]: any Rust [`Environment`] behind the gRPC `Environment` service.

use chorus_proto::limits::ENVIRONMENT_MAX_MESSAGE_BYTES;
use std::net::SocketAddr;
use std::sync::Arc;

use chorus_proto::auth::RequireToken;
use chorus_proto::tonic::{Request, Response, Status};
use chorus_proto::v1;
use chorus_proto::v1::environment_server::{self, EnvironmentServer};

use super::convert;
use crate::env::{Environment, Episode};
use crate::error::EnvError;

/// An environment being served; the server stops when this is dropped.
#[derive(Debug)]
pub struct ServedEnvironment {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl ServedEnvironment {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR` (`https://ADDR` when this process serves TLS, see `chorus_proto::tls`),
    /// what a client (or a run config's `url`) connects to.
    pub fn url(&self) -> String {
        format!("{}://{}", chorus_proto::tls::scheme(), self.addr)
    }
}

impl Drop for ServedEnvironment {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `env` on `listen` (e.g. `127.0.0.1:0`, port 0 picks a free port), admitting only calls
/// that carry `token`, over TLS when this process has a certificate installed
/// (`chorus_proto::tls::install`; mutual TLS with a CA). Must be called inside a tokio runtime, which runs the server; each call
/// to the environment runs on a blocking thread, so slow environments do not stall the server,
/// and a panic in one fails only that call (`INTERNAL`).
///
/// Tasks go out with their verification data as `task_json` and multi-turn state travels in
/// `state_json` as the whole [`Episode`], so the server itself keeps nothing between calls.
pub async fn serve_environment(
    env: Arc<dyn Environment>,
    listen: &str,
    token: &str,
) -> Result<ServedEnvironment, EnvError> {
    let name = env.info().name;
    let fail = |call: &str, message: String| EnvError::Remote {
        url: listen.to_string(),
        call: call.to_string(),
        message,
    };
    let guard = RequireToken::new(token).map_err(|e| fail("serving", e.to_string()))?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| fail("binding", e.to_string()))?;
    let addr = listener
        .local_addr()
        .map_err(|e| fail("binding", e.to_string()))?;
    let service = chorus_proto::tonic::service::interceptor::InterceptedService::new(
        EnvironmentServer::new(EnvironmentService { env })
            .max_decoding_message_size(ENVIRONMENT_MAX_MESSAGE_BYTES)
            .max_encoding_message_size(ENVIRONMENT_MAX_MESSAGE_BYTES),
        guard,
    );
    let mut server = chorus_proto::tls::server().map_err(|e| fail("serving", e.to_string()))?;
    let task = tokio::spawn(async move {
        let served = server
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
        if let Err(e) = served {
            tracing::error!(environment = %name, %addr, error = %e, "environment server stopped");
        }
    });
    Ok(ServedEnvironment { addr, task })
}

/// The service: each RPC decodes, runs the environment on a blocking thread, encodes.
struct EnvironmentService {
    env: Arc<dyn Environment>,
}

/// The gRPC status of an environment error: the caller's fault or the environment's.
fn status_of(error: EnvError) -> Status {
    let message = error.to_string();
    match error {
        EnvError::WrongEnvironment { .. }
        | EnvError::BadVerification { .. }
        | EnvError::BadEpisodeState { .. }
        | EnvError::UnknownSplit(_) => Status::invalid_argument(message),
        EnvError::EpisodeFinished { .. } | EnvError::NoReference { .. } => {
            Status::failed_precondition(message)
        }
        EnvError::SplitExhausted { .. } => Status::out_of_range(message),
        _ => Status::internal(message),
    }
}

impl EnvironmentService {
    /// Runs `f` with the environment on a blocking thread.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Environment) -> Result<T, Status> + Send + 'static,
    ) -> Result<Response<T>, Status> {
        let env = self.env.clone();
        match tokio::task::spawn_blocking(move || f(env.as_ref())).await {
            Ok(answer) => answer.map(Response::new),
            Err(join) => Err(Status::internal(format!(
                "the environment failed: {}",
                panic_message(join)
            ))),
        }
    }
}

fn panic_message(join: tokio::task::JoinError) -> String {
    match join.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<&str>()
            .map(|s| format!("panicked: {s}"))
            .or_else(|| {
                payload
                    .downcast_ref::<String>()
                    .map(|s| format!("panicked: {s}"))
            })
            .unwrap_or_else(|| "panicked".to_string()),
        Err(join) => join.to_string(),
    }
}

fn task_of(task: Option<v1::Task>) -> Result<crate::Task, Status> {
    let task = task.ok_or_else(|| Status::invalid_argument("the request has no task"))?;
    convert::owned_task_from_wire(&task).map_err(Status::invalid_argument)
}

/// The episode a step or a reference action continues: the state from the last answer, or a
/// fresh start before the first step.
fn episode_of(
    env: &dyn Environment,
    task: &crate::Task,
    state_json: &str,
) -> Result<Episode, Status> {
    if state_json.is_empty() {
        env.start(task).map_err(status_of)
    } else {
        serde_json::from_str(state_json).map_err(|e| {
            Status::invalid_argument(format!("state_json is not an episode of this server: {e}"))
        })
    }
}

fn episode_json(episode: &Episode) -> Result<String, Status> {
    serde_json::to_string(episode)
        .map_err(|e| Status::internal(format!("the episode cannot be serialised: {e}")))
}

#[chorus_proto::tonic::async_trait]
impl environment_server::Environment for EnvironmentService {
    async fn describe(
        &self,
        _: Request<v1::DescribeRequest>,
    ) -> Result<Response<v1::DescribeResponse>, Status> {
        self.run(|env| Ok(convert::info_to_wire(&env.info()))).await
    }

    async fn sample(
        &self,
        request: Request<v1::SampleRequest>,
    ) -> Result<Response<v1::SampleResponse>, Status> {
        let r = request.into_inner();
        self.run(move |env| {
            let split = convert::split_from_wire(r.split).map_err(Status::invalid_argument)?;
            let max_level = env.info().max_difficulty;
            let level = match (r.level, r.difficulty) {
                (Some(level), _) => level,
                (None, Some(d)) if d.is_finite() => {
                    (d.clamp(0.0, 1.0) * max_level as f32).round() as u32
                }
                _ => 0,
            };
            let task = env.sample(r.seed, split, level).map_err(status_of)?;
            let task = convert::owned_task_to_wire(&task, max_level).map_err(Status::internal)?;
            Ok(v1::SampleResponse { task: Some(task) })
        })
        .await
    }

    async fn step(
        &self,
        request: Request<v1::StepRequest>,
    ) -> Result<Response<v1::StepResponse>, Status> {
        let r = request.into_inner();
        self.run(move |env| {
            let task = task_of(r.task)?;
            let mut episode = episode_of(env, &task, &r.state_json)?;
            let outcome = env
                .step(&task, &mut episode, &r.action)
                .map_err(status_of)?;
            Ok(convert::step_to_wire(&outcome, episode_json(&episode)?))
        })
        .await
    }

    async fn score(
        &self,
        request: Request<v1::ScoreRequest>,
    ) -> Result<Response<v1::ScoreResponse>, Status> {
        let r = request.into_inner();
        self.run(move |env| {
            let task = task_of(r.task)?;
            let score = env.score(&task, &r.completion).map_err(status_of)?;
            Ok(convert::score_to_wire(&score))
        })
        .await
    }

    async fn reference(
        &self,
        request: Request<v1::ReferenceRequest>,
    ) -> Result<Response<v1::ReferenceResponse>, Status> {
        let r = request.into_inner();
        self.run(move |env| {
            let task = task_of(r.task)?;
            let completion = if r.in_episode {
                let episode = episode_of(env, &task, &r.state_json)?;
                env.reference_action(&task, &episode)
            } else {
                env.reference(&task)
            }
            .map_err(status_of)?;
            Ok(v1::ReferenceResponse { completion })
        })
        .await
    }

    async fn wrong_completions(
        &self,
        request: Request<v1::WrongCompletionsRequest>,
    ) -> Result<Response<v1::WrongCompletionsResponse>, Status> {
        let r = request.into_inner();
        self.run(move |env| {
            let task = task_of(r.task)?;
            let completions = env.wrong_completions(&task).map_err(status_of)?;
            Ok(v1::WrongCompletionsResponse { completions })
        })
        .await
    }

    async fn start(
        &self,
        request: Request<v1::StartRequest>,
    ) -> Result<Response<v1::StartResponse>, Status> {
        let r = request.into_inner();
        self.run(move |env| {
            let task = task_of(r.task)?;
            let episode = env.start(&task).map_err(status_of)?;
            Ok(v1::StartResponse {
                messages: episode
                    .messages
                    .iter()
                    .map(convert::message_to_wire)
                    .collect(),
                state_json: episode_json(&episode)?,
            })
        })
        .await
    }
}
