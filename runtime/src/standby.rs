//! A standby learner or rollout worker (`chorus serve learner|worker --orchestrator URL` without
//! `--config`): it registers with the orchestrator without a run and sends heartbeats; when a
//! heartbeat hands it a run, it starts the service for that run as a child process (`chorus
//! serve … --config -`, the run's config on standard input), which registers for the run itself.
//! When the orchestrator moves on (the run ended, or another one began), the child is stopped
//! and the service stands by again.
//!
//! Each run gets a fresh process, so nothing of one run (weights, optimizer state, sockets)
//! leaks into the next, and the child dies with its parent (`PR_SET_PDEATHSIG`).

use std::time::Duration;

use chorus_proto::v1::{
    HeartbeatResponse, LearnerHeartbeatRequest, RegisterLearnerRequest, RegisterWorkerRequest,
    RunAssignment, WorkerHeartbeatRequest,
};
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};

use crate::error::{Result, RunError};
use crate::registration::{Client, connect};

/// Which service stands by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A learner.
    Learner,
    /// A rollout worker.
    Worker,
}

impl Role {
    /// `learner` or `worker`, as in `chorus serve`.
    pub fn name(self) -> &'static str {
        match self {
            Role::Learner => "learner",
            Role::Worker => "worker",
        }
    }
}

/// A standby service and what its children get.
pub struct Standby {
    /// Which service.
    pub role: Role,
    /// Its id at the orchestrator, passed on to the child.
    pub id: String,
    /// The orchestrator's URL.
    pub orchestrator: String,
    /// The shared token, passed on to the child.
    pub token: String,
    /// Where the child serves.
    pub listen: String,
    /// How others reach the child (see `serve --advertise`).
    pub advertise: Option<String>,
    /// Where the child serves Prometheus metrics (see `--metrics`).
    pub metrics: Option<std::net::SocketAddr>,
}

struct Serving {
    run_id: String,
    child: Child,
}

impl Standby {
    async fn register(&self, client: &mut Client) -> Result<Duration, chorus_proto::tonic::Status> {
        let ms = match self.role {
            Role::Worker => {
                client
                    .register_worker(RegisterWorkerRequest {
                        worker_id: self.id.clone(),
                        capacity: 1,
                        ..Default::default()
                    })
                    .await?
                    .into_inner()
                    .heartbeat_interval_ms
            }
            Role::Learner => {
                client
                    .register_learner(RegisterLearnerRequest {
                        learner_id: self.id.clone(),
                        ..Default::default()
                    })
                    .await?
                    .into_inner()
                    .heartbeat_interval_ms
            }
        };
        Ok(Duration::from_millis(ms.clamp(100, 60_000)))
    }

    async fn heartbeat(
        &self,
        client: &mut Client,
        sequence: u64,
    ) -> Result<HeartbeatResponse, chorus_proto::tonic::Status> {
        Ok(match self.role {
            Role::Worker => client
                .worker_heartbeat(WorkerHeartbeatRequest {
                    worker_id: self.id.clone(),
                    sequence,
                    capacity: 1,
                    ..Default::default()
                })
                .await?
                .into_inner(),
            Role::Learner => client
                .learner_heartbeat(LearnerHeartbeatRequest {
                    learner_id: self.id.clone(),
                    sequence,
                    ..Default::default()
                })
                .await?
                .into_inner(),
        })
    }

    /// Starts the service for run `a` as a child process with the run's config on its stdin.
    async fn start(&self, a: &RunAssignment) -> Result<Child> {
        let exe = std::env::current_exe().map_err(RunError::io("finding the chorus executable"))?;
        let mut cmd = Command::new(exe);
        cmd.args(["serve", self.role.name(), "--config", "-"])
            .args(["--run-id", &a.run_id, "--orchestrator", &self.orchestrator])
            .args(["--listen", &self.listen, "--id", &self.id])
            .env("CHORUS_TOKEN", &self.token)
            .envs(chorus_proto::tls::installed().map_or_else(Vec::new, |t| t.files().child_env()))
            .stdin(std::process::Stdio::piped())
            // The child's `listening on` line is a log line here; this process's stdout is
            // its own.
            .stdout(std::io::stderr())
            .kill_on_drop(true);
        if self.role == Role::Worker {
            cmd.args(["--learner", &a.learner_endpoint]);
        }
        if let Some(advertise) = &self.advertise {
            cmd.args(["--advertise", advertise]);
        }
        // The address is free again once the previous run's child has stopped.
        if let Some(metrics) = &self.metrics {
            cmd.args(["--metrics", &metrics.to_string()]);
        }
        crate::services::dies_with_parent(&mut cmd);
        let mut child = cmd.spawn().map_err(RunError::io(format!(
            "starting the {} for run {}",
            self.role.name(),
            a.run_id
        )))?;
        let mut stdin = child.stdin.take().expect("the child's stdin is piped");
        stdin
            .write_all(a.config_toml.as_bytes())
            .await
            .map_err(RunError::io(format!(
                "sending run {}'s config to its {}",
                a.run_id,
                self.role.name()
            )))?;
        drop(stdin);
        Ok(child)
    }
}

async fn stop(s: &mut Serving) {
    let _ = s.child.start_kill();
    let _ = s.child.wait().await;
}

/// Registers as a standby service and serves the runs the orchestrator hands out, until Ctrl-C.
/// `ready` is called once the registration succeeded (the binary prints a line for scripts).
pub async fn stand_by(s: Standby, ready: impl FnOnce()) -> Result<()> {
    let mut client = connect(&s.orchestrator, &s.token).await?;
    let interval = s
        .register(&mut client)
        .await
        .map_err(RunError::rpc(format!(
            "registering with the orchestrator at {}",
            s.orchestrator
        )))?;
    tracing::info!(
        role = s.role.name(),
        id = s.id,
        orchestrator = s.orchestrator,
        "standing by at the orchestrator"
    );
    ready();
    let mut serving: Option<Serving> = None;
    // A learner that exits by itself is not restarted for the same run (its state is gone).
    let mut given_up: Option<String> = None;
    let mut sequence = 0;
    let mut warned = false;
    let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = &mut ctrl_c => {
                if let Some(run) = serving.as_mut() {
                    stop(run).await;
                }
                tracing::info!("stopping");
                return Ok(());
            }
        }
        if let Some(run) = serving.as_mut()
            && let Ok(Some(status)) = run.child.try_wait()
        {
            tracing::warn!(
                role = s.role.name(),
                run_id = run.run_id,
                %status,
                "the {} serving run {} exited ({status})",
                s.role.name(),
                run.run_id
            );
            if s.role == Role::Learner {
                given_up = Some(run.run_id.clone());
            }
            serving = None;
        }
        sequence += 1;
        let hb = match s.heartbeat(&mut client, sequence).await {
            Ok(hb) => {
                warned = false;
                hb
            }
            Err(e) => {
                if !warned {
                    tracing::warn!(
                        orchestrator = s.orchestrator,
                        error = %e,
                        "heartbeat to the orchestrator at {} failed (will retry): {e}",
                        s.orchestrator
                    );
                    warned = true;
                }
                continue;
            }
        };
        if !hb.registered {
            tracing::warn!(
                orchestrator = s.orchestrator,
                "the orchestrator at {} does not know this service: registering again",
                s.orchestrator
            );
            let _ = s.register(&mut client).await;
            continue;
        }
        let wanted = hb.assignment.filter(|a| !a.run_id.is_empty());
        if let Some(run) = serving.as_mut()
            && wanted.as_ref().is_none_or(|a| a.run_id != run.run_id)
        {
            tracing::info!(
                run_id = run.run_id,
                role = s.role.name(),
                "run {} is over for this {}: standing by",
                run.run_id,
                s.role.name()
            );
            stop(run).await;
            serving = None;
        }
        if let (None, Some(a)) = (&serving, wanted)
            && given_up.as_ref() != Some(&a.run_id)
        {
            tracing::info!(run_id = a.run_id, "serving run {}", a.run_id);
            match s.start(&a).await {
                Ok(child) => {
                    serving = Some(Serving {
                        run_id: a.run_id,
                        child,
                    })
                }
                Err(e) => tracing::error!(run_id = a.run_id, error = %e, "{e}"),
            }
        }
    }
}
