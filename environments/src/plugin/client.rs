//! [`RemoteEnvironment`]: an environment served by another process over the gRPC `Environment`
//! service (a plugin in any language, or a built-in behind `chorus serve environment`).

use chorus_proto::limits::ENVIRONMENT_MAX_MESSAGE_BYTES;
use std::future::Future;
use std::time::Duration;

use chorus_proto::auth::AttachToken;
use chorus_proto::tonic::service::interceptor::InterceptedService;
use chorus_proto::tonic::transport::Channel;
use chorus_proto::tonic::{Code, Request, Response, Status};
use chorus_proto::v1;
use chorus_proto::v1::environment_client::EnvironmentClient;

use super::convert;
use super::runtime::BlockingRuntime;
use crate::chat::Message;
use crate::env::{EnvInfo, Environment, Episode, StepOutcome};
use crate::error::EnvError;
use crate::task::{Score, Split, Task};

type Client = EnvironmentClient<InterceptedService<Channel, AttachToken>>;

/// Deadlines and retries of a [`RemoteEnvironment`].
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteOptions {
    /// Longest wait for the TCP connection.
    pub connect_timeout: Duration,
    /// Longest wait for one call's answer (the gRPC deadline).
    pub timeout: Duration,
    /// Further attempts after a call finds the server unavailable (all calls are idempotent).
    pub retries: u32,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            timeout: Duration::from_secs(60),
            retries: 2,
        }
    }
}

/// An [`Environment`] whose every method is a call to a server of the gRPC `Environment`
/// service, carrying the shared token as `authorization: Bearer …`.
///
/// It is registered under its address: [`info`](Environment::info)`().name` is the URL (the
/// key a run config's `{ url = "…" }` entry is looked up by), and its tasks name the URL as
/// their environment; [`RemoteEnvironment::plugin_info`] is how the server describes itself.
/// Tasks travel back to the server exactly as it made them.
///
/// Methods block the calling thread until the answer comes or the deadline passes; they run on
/// a private runtime, so they may be called from plain threads, `spawn_blocking` threads and
/// (blocking that worker for the call) async tasks.
///
/// ```no_run
/// use chorus_environments::{Environment, Split, plugin::RemoteEnvironment};
///
/// let env = RemoteEnvironment::connect("http://127.0.0.1:50051", "s3cret")?;
/// let task = env.sample(0, Split::Train, 0)?;
/// println!("{:?}", env.score(&task, "42")?);
/// # Ok::<(), chorus_environments::EnvError>(())
/// ```
pub struct RemoteEnvironment {
    url: String,
    info: EnvInfo,
    plugin_info: EnvInfo,
    client: Client,
    options: RemoteOptions,
    runtime: BlockingRuntime,
}

impl std::fmt::Debug for RemoteEnvironment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteEnvironment")
            .field("url", &self.url)
            .field("plugin", &self.plugin_info.name)
            .finish_non_exhaustive()
    }
}

impl RemoteEnvironment {
    /// Connects to the server at `url` (`http://host:port`, or `https://host:port` with the
    /// process's TLS settings from `chorus_proto::tls`) with default deadlines and asks it
    /// to describe itself; fails with the URL named when it is unreachable or refuses `token`.
    pub fn connect(url: &str, token: &str) -> Result<Self, EnvError> {
        Self::connect_with(url, token, RemoteOptions::default())
    }

    /// [`connect`](Self::connect) with explicit deadlines and retries.
    pub fn connect_with(url: &str, token: &str, options: RemoteOptions) -> Result<Self, EnvError> {
        let fail = |call: &str, message: String| EnvError::Remote {
            url: url.to_string(),
            call: call.to_string(),
            message,
        };
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(fail(
                "connecting",
                "not an address; allowed: http://host:port or https://host:port".into(),
            ));
        }
        let attach = AttachToken::new(token).map_err(|e| fail("connecting", e.to_string()))?;
        // `https://` with this process's TLS settings (`chorus_proto::tls`).
        let endpoint = chorus_proto::tls::endpoint(url)
            .map_err(|e| fail("connecting", e.to_string()))?
            .connect_timeout(options.connect_timeout)
            .timeout(options.timeout);
        let runtime = BlockingRuntime::new(url)?;
        let channel = runtime
            .run(async move { endpoint.connect().await })
            .map_err(|e| {
                fail(
                    "connecting",
                    format!("{} (is the environment server running?)", error_chain(&e)),
                )
            })?;
        let client = EnvironmentClient::with_interceptor(channel, attach)
            .max_decoding_message_size(ENVIRONMENT_MAX_MESSAGE_BYTES)
            .max_encoding_message_size(ENVIRONMENT_MAX_MESSAGE_BYTES);
        let mut env = Self {
            url: url.to_string(),
            info: placeholder_info(url),
            plugin_info: placeholder_info(url),
            client,
            options,
            runtime,
        };
        let described = env.call("Describe", v1::DescribeRequest {}, |mut c, r| async move {
            c.describe(r).await
        })?;
        env.plugin_info = convert::info_from_wire(&described);
        if env.plugin_info.name.is_empty() {
            return Err(fail("Describe", "the server gave an empty name".into()));
        }
        env.info = EnvInfo {
            name: url.to_string(),
            description: format!(
                "{} (plugin `{}` at {url})",
                env.plugin_info.description, env.plugin_info.name
            ),
            ..env.plugin_info.clone()
        };
        Ok(env)
    }

    /// The server's address.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// How the server describes itself (its own name, not the URL).
    pub fn plugin_info(&self) -> &EnvInfo {
        &self.plugin_info
    }

    fn error(&self, call: &str, message: impl Into<String>) -> EnvError {
        EnvError::Remote {
            url: self.url.clone(),
            call: call.to_string(),
            message: message.into(),
        }
    }

    fn status_error(&self, call: &str, status: &Status) -> EnvError {
        let message = match status.code() {
            Code::Unauthenticated => format!(
                "the server refused the token ({}); give the plugin's own token (chorus run and \
                 serve orchestrator: --plugin-token or CHORUS_PLUGIN_TOKEN; chorus env check: \
                 --token)",
                status.message()
            ),
            // tonic reports its own deadline as a cancellation ("Timeout expired"); any other
            // cancellation is the connection closing under the call, which is how a TLS
            // server refusing the client's certificate shows to the client.
            Code::DeadlineExceeded => format!(
                "no answer within {:?} ({})",
                self.options.timeout,
                status.message()
            ),
            Code::Cancelled if status.message().contains("Timeout expired") => format!(
                "no answer within {:?} ({})",
                self.options.timeout,
                status.message()
            ),
            Code::Cancelled => format!(
                "transport error: the connection closed under the call ({}); a TLS server \
                 closes it on a client without a certificate it accepts",
                status.message()
            ),
            code => format!("{code:?}: {}", status.message()),
        };
        self.error(call, message)
    }

    /// One call with the deadline, retried while the server is unavailable.
    fn call_raw<Req, Resp, F, Fut>(&self, request: Req, f: F) -> Result<Resp, Status>
    where
        Req: Clone + Send + 'static,
        Resp: Send + 'static,
        F: Fn(Client, Request<Req>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Response<Resp>, Status>> + Send,
    {
        let client = self.client.clone();
        let timeout = self.options.timeout;
        let retries = self.options.retries;
        self.runtime.run(async move {
            let mut attempt = 0;
            loop {
                let mut req = Request::new(request.clone());
                req.set_timeout(timeout);
                // The transport's own deadline is the gRPC one; this bound also covers a
                // server that accepts the call and never answers.
                let answer = match tokio::time::timeout(
                    timeout + Duration::from_secs(1),
                    f(client.clone(), req),
                )
                .await
                {
                    Ok(answer) => answer,
                    Err(_) => Err(Status::deadline_exceeded("the call timed out")),
                };
                match answer {
                    Err(status) if status.code() == Code::Unavailable && attempt < retries => {
                        attempt += 1;
                        tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                    }
                    other => return other.map(Response::into_inner),
                }
            }
        })
    }

    fn call<Req, Resp, F, Fut>(&self, call: &str, request: Req, f: F) -> Result<Resp, EnvError>
    where
        Req: Clone + Send + 'static,
        Resp: Send + 'static,
        F: Fn(Client, Request<Req>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Response<Resp>, Status>> + Send,
    {
        self.call_raw(request, f)
            .map_err(|status| self.status_error(call, &status))
    }

    fn wire_task(&self, call: &str, task: &Task) -> Result<v1::Task, EnvError> {
        self.check_task(task)?;
        convert::plugin_task_to_wire(task).map_err(|m| self.error(call, m))
    }

    fn state_json(episode: &Episode) -> String {
        match &episode.state {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Null => String::new(),
            other => other.to_string(),
        }
    }
}

fn placeholder_info(url: &str) -> EnvInfo {
    EnvInfo {
        name: url.to_string(),
        category: crate::env::Category::Knowledge,
        turns: crate::env::Turns::Single,
        max_turns: 1,
        default_weight: 1.0,
        max_difficulty: 0,
        description: String::new(),
    }
}

/// An error and its causes on one line (tonic's transport errors hide the useful part).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

impl Environment for RemoteEnvironment {
    fn info(&self) -> EnvInfo {
        self.info.clone()
    }

    fn sample(&self, seed: u64, split: Split, difficulty: u32) -> Result<Task, EnvError> {
        let request = v1::SampleRequest {
            run_id: String::new(),
            prompt_id: format!("{seed}:{split}:{difficulty}"),
            seed,
            split: convert::split_to_wire(split),
            difficulty: Some(convert::level_fraction(
                difficulty,
                self.plugin_info.max_difficulty,
            )),
            level: Some(difficulty),
        };
        let answer = self.call(
            "Sample",
            request,
            |mut c, r| async move { c.sample(r).await },
        )?;
        let wire = answer
            .task
            .ok_or_else(|| self.error("Sample", "the answer has no task"))?;
        let mut task = convert::plugin_task_from_wire(&wire, &self.url)
            .map_err(|m| self.error("Sample", m))?;
        if task.split != split {
            return Err(self.error(
                "Sample",
                format!(
                    "asked for a {split} task, got task {} from {}",
                    task.id, task.split
                ),
            ));
        }
        if task.id.is_empty() {
            return Err(self.error("Sample", "the task has an empty task_id"));
        }
        // Plugins that do not echo the seed and level get the ones asked for.
        if wire.seed == 0 {
            task.seed = seed;
        }
        if wire.level == 0 {
            task.difficulty = difficulty;
        }
        Ok(task)
    }

    fn score(&self, task: &Task, completion: &str) -> Result<Score, EnvError> {
        let request = v1::ScoreRequest {
            task: Some(self.wire_task("Score", task)?),
            completion: completion.to_string(),
            ..Default::default()
        };
        let answer = self.call("Score", request, |mut c, r| async move { c.score(r).await })?;
        convert::score_from_wire(&answer).map_err(|m| self.error("Score", m))
    }

    fn reference(&self, task: &Task) -> Result<String, EnvError> {
        let request = v1::ReferenceRequest {
            task: Some(self.wire_task("Reference", task)?),
            ..Default::default()
        };
        self.reference_call(task, request)
    }

    fn wrong_completions(&self, task: &Task) -> Result<Vec<String>, EnvError> {
        let request = v1::WrongCompletionsRequest {
            task: Some(self.wire_task("WrongCompletions", task)?),
        };
        match self.call_raw(
            request,
            |mut c, r| async move { c.wrong_completions(r).await },
        ) {
            Ok(answer) => Ok(answer.completions),
            Err(status) if status.code() == Code::Unimplemented => Ok(Vec::new()),
            Err(status) => Err(self.status_error("WrongCompletions", &status)),
        }
    }

    fn start(&self, task: &Task) -> Result<Episode, EnvError> {
        let request = v1::StartRequest {
            task: Some(self.wire_task("Start", task)?),
        };
        match self.call_raw(request, |mut c, r| async move { c.start(r).await }) {
            Ok(answer) => {
                let mut episode =
                    Episode::new(task, serde_json::Value::String(answer.state_json.clone()));
                if !answer.messages.is_empty() {
                    episode.messages = convert::messages_from_wire(&answer.messages)
                        .map_err(|m| self.error("Start", m))?;
                }
                Ok(episode)
            }
            Err(status) if status.code() == Code::Unimplemented => {
                Ok(Episode::new(task, serde_json::Value::String(String::new())))
            }
            Err(status) => Err(self.status_error("Start", &status)),
        }
    }

    fn step(
        &self,
        task: &Task,
        episode: &mut Episode,
        action: &str,
    ) -> Result<StepOutcome, EnvError> {
        if episode.done {
            return Err(EnvError::EpisodeFinished {
                task_id: task.id.clone(),
            });
        }
        let request = v1::StepRequest {
            trajectory_id: String::new(),
            turn: episode.turn,
            task: Some(self.wire_task("Step", task)?),
            state_json: Self::state_json(episode),
            action: action.to_string(),
            ..Default::default()
        };
        let answer = self.call("Step", request, |mut c, r| async move { c.step(r).await })?;
        let outcome = convert::step_from_wire(&answer).map_err(|m| self.error("Step", m))?;
        episode.messages.push(Message::assistant(action));
        episode.turn += 1;
        if let Some(observation) = &outcome.observation {
            episode.messages.push(observation.clone());
        }
        episode.done = outcome.done;
        episode.state = serde_json::Value::String(answer.state_json);
        Ok(outcome)
    }

    fn reference_action(&self, task: &Task, episode: &Episode) -> Result<String, EnvError> {
        let request = v1::ReferenceRequest {
            task: Some(self.wire_task("Reference", task)?),
            in_episode: true,
            state_json: Self::state_json(episode),
            turn: episode.turn,
        };
        self.reference_call(task, request)
    }
}

impl RemoteEnvironment {
    fn reference_call(
        &self,
        task: &Task,
        request: v1::ReferenceRequest,
    ) -> Result<String, EnvError> {
        match self.call_raw(request, |mut c, r| async move { c.reference(r).await }) {
            Ok(answer) => Ok(answer.completion),
            Err(status)
                if matches!(
                    status.code(),
                    Code::Unimplemented | Code::FailedPrecondition | Code::NotFound
                ) =>
            {
                Err(EnvError::NoReference {
                    env: self.url.clone(),
                    task_id: task.id.clone(),
                    reason: format!("the plugin says: {}", status.message()),
                })
            }
            Err(status) => Err(self.status_error("Reference", &status)),
        }
    }
}
