//! A worker or learner registering with the orchestrator (`--orchestrator URL`) and keeping its
//! registration alive with heartbeats. A lost orchestrator is retried, never fatal: the service
//! keeps serving, and registers again when the orchestrator answers that it does not know it.

use chorus_proto::limits::ORCHESTRATOR_MAX_MESSAGE_BYTES;
use std::sync::Arc;
use std::time::Duration;

use chorus_proto::auth::AttachToken;
use chorus_proto::tonic::codegen::InterceptedService;
use chorus_proto::tonic::transport::Channel;
use chorus_proto::v1::orchestrator_client::OrchestratorClient;
use chorus_proto::v1::{
    LearnerHeartbeatRequest, RegisterLearnerRequest, RegisterWorkerRequest, WorkerHeartbeatRequest,
};

use crate::error::{Result, RunError};

/// A client of the orchestrator's gRPC service, carrying the shared token.
pub type Client = OrchestratorClient<InterceptedService<Channel, AttachToken>>;

/// Connects to the orchestrator at `url` with the shared `token` (`https://` with the process's
/// TLS settings, see `chorus_proto::tls`).
pub async fn connect(url: &str, token: &str) -> Result<Client> {
    let channel = chorus_proto::tls::endpoint(url)
        .map_err(|e| RunError::Invalid(format!("the orchestrator's address: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(RunError::transport(format!(
            "connecting to the orchestrator at {url}"
        )))?;
    Ok(
        OrchestratorClient::with_interceptor(channel, AttachToken::new(token)?)
            .max_decoding_message_size(ORCHESTRATOR_MAX_MESSAGE_BYTES)
            .max_encoding_message_size(ORCHESTRATOR_MAX_MESSAGE_BYTES),
    )
}

/// What a registered service reports in its heartbeats.
pub enum Reporter {
    /// A rollout worker of `run_id`: its capacity and the version it holds.
    Worker {
        /// Its id at the orchestrator.
        id: String,
        /// Where it serves.
        endpoint: String,
        /// The run it serves.
        run_id: String,
        /// Sequences it generates at once.
        capacity: u32,
        /// The policy version it holds now.
        version: Arc<dyn Fn() -> u64 + Send + Sync>,
    },
    /// The learner: its run and latest published version (which is also its step count).
    Learner {
        /// Its id at the orchestrator.
        id: String,
        /// Where it serves.
        endpoint: String,
        /// The run it serves.
        run_id: String,
        /// Its latest published version.
        version: Arc<dyn Fn() -> u64 + Send + Sync>,
    },
}

impl Reporter {
    async fn register(&self, client: &mut Client) -> Result<Duration, chorus_proto::tonic::Status> {
        let interval_ms = match self {
            Reporter::Worker {
                id,
                endpoint,
                run_id,
                capacity,
                version,
            } => {
                client
                    .register_worker(RegisterWorkerRequest {
                        worker_id: id.clone(),
                        endpoint: endpoint.clone(),
                        capacity: *capacity,
                        policy_version: version(),
                        model: String::new(),
                        run_id: run_id.clone(),
                    })
                    .await?
                    .into_inner()
                    .heartbeat_interval_ms
            }
            Reporter::Learner {
                id,
                endpoint,
                run_id,
                version,
            } => {
                client
                    .register_learner(RegisterLearnerRequest {
                        learner_id: id.clone(),
                        endpoint: endpoint.clone(),
                        run_id: run_id.clone(),
                        policy_version: version(),
                        devices: 1,
                    })
                    .await?
                    .into_inner()
                    .heartbeat_interval_ms
            }
        };
        Ok(Duration::from_millis(interval_ms.clamp(100, 60_000)))
    }

    async fn heartbeat(
        &self,
        client: &mut Client,
        sequence: u64,
    ) -> Result<bool, chorus_proto::tonic::Status> {
        Ok(match self {
            Reporter::Worker {
                id,
                run_id,
                capacity,
                version,
                ..
            } => {
                client
                    .worker_heartbeat(WorkerHeartbeatRequest {
                        worker_id: id.clone(),
                        sequence,
                        capacity: *capacity,
                        in_flight: 0,
                        policy_version: version(),
                        run_id: run_id.clone(),
                        serving_run_id: String::new(),
                    })
                    .await?
                    .into_inner()
                    .registered
            }
            Reporter::Learner {
                id,
                run_id,
                version,
                ..
            } => {
                let v = version();
                client
                    .learner_heartbeat(LearnerHeartbeatRequest {
                        learner_id: id.clone(),
                        sequence,
                        run_id: run_id.clone(),
                        step: v,
                        policy_version: v,
                        queued_groups: 0,
                        serving_run_id: String::new(),
                    })
                    .await?
                    .into_inner()
                    .registered
            }
        })
    }
}

/// Registers with the orchestrator at `url` (failing if that first registration fails, so a
/// wrong address or token is reported at start-up), then keeps sending heartbeats in the
/// background.
pub async fn register(url: &str, token: &str, reporter: Reporter) -> Result<()> {
    let mut client = connect(url, token).await?;
    let interval = reporter
        .register(&mut client)
        .await
        .map_err(RunError::rpc(format!(
            "registering with the orchestrator at {url}"
        )))?;
    let url = url.to_string();
    tokio::spawn(async move {
        let mut sequence = 0;
        let mut warned = false;
        loop {
            tokio::time::sleep(interval).await;
            sequence += 1;
            match reporter.heartbeat(&mut client, sequence).await {
                Ok(true) => warned = false,
                Ok(false) => {
                    tracing::warn!(
                        orchestrator = url,
                        "the orchestrator at {url} does not know this service: registering again"
                    );
                    let _ = reporter.register(&mut client).await;
                }
                Err(e) => {
                    if !warned {
                        tracing::warn!(
                            orchestrator = url,
                            error = %e,
                            "heartbeat to the orchestrator at {url} failed (will retry): {e}"
                        );
                        warned = true;
                    }
                }
            }
        }
    });
    Ok(())
}
