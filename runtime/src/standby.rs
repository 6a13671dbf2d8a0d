//! A standby learner or rollout worker (`chorus serve learner|worker --orchestrator URL` without
//! `--config`): it registers with the orchestrator without a run and sends heartbeats; when a
//! heartbeat hands it a run, it starts the service for that run as a child process (`chorus
//! serve … --config -`, the run's config on standard input), which registers for the run itself.
//! When the orchestrator moves on (the run ended, or another one began), the child is stopped
//! and the service stands by again.
//!
//! Each run gets a fresh process, so nothing of one run (weights, optimizer state, sockets)
//! leaks into the next, and the child dies with its parent (`PR_SET_PDEATHSIG`).
//!
//! A standby learner's child saves rolling checkpoints under `<checkpoints>/<run id>`. When it
//! dies while its run goes on, the standby starts it again (up to [`MAX_LEARNER_RESTARTS`] times
//! per run) at the address it served at, from its newest checkpoint; the orchestrator sends it
//! the groups of the steps after that again. Heartbeats name the run the child serves, so an
//! orchestrator restarted mid-run hands that run back to this standby instead of stopping it.

use std::path::PathBuf;
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
    /// For a learner: where each run's rolling checkpoints go (`<checkpoints>/<run id>`).
    pub checkpoints: PathBuf,
}

/// How many times a standby learner starts the learner of one run again after it died.
pub const MAX_LEARNER_RESTARTS: u32 = 5;

struct Serving {
    run_id: String,
    child: Child,
}

/// The run a standby learner's child died in, and how often it was started again.
struct Restarts {
    run_id: String,
    count: u32,
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
        serving: &str,
    ) -> Result<HeartbeatResponse, chorus_proto::tonic::Status> {
        Ok(match self.role {
            Role::Worker => client
                .worker_heartbeat(WorkerHeartbeatRequest {
                    worker_id: self.id.clone(),
                    sequence,
                    capacity: 1,
                    serving_run_id: serving.to_string(),
                    ..Default::default()
                })
                .await?
                .into_inner(),
            Role::Learner => client
                .learner_heartbeat(LearnerHeartbeatRequest {
                    learner_id: self.id.clone(),
                    sequence,
                    serving_run_id: serving.to_string(),
                    ..Default::default()
                })
                .await?
                .into_inner(),
        })
    }

    /// Starts the service for run `a` as a child process with the run's config on its stdin.
    /// A learner started again for its run serves where the run knows it (`learner_endpoint`).
    async fn start(&self, a: &RunAssignment) -> Result<Child> {
        let exe = std::env::current_exe().map_err(RunError::io("finding the chorus executable"))?;
        let mut cmd = Command::new(exe);
        let listen = match (self.role, port_of(&a.learner_endpoint)) {
            (Role::Learner, Some(port)) => with_port(&self.listen, port),
            _ => self.listen.clone(),
        };
        cmd.args(["serve", self.role.name(), "--config", "-"])
            .args(["--run-id", &a.run_id, "--orchestrator", &self.orchestrator])
            .args(["--listen", &listen, "--id", &self.id])
            .env("CHORUS_TOKEN", &self.token)
            .envs(chorus_proto::tls::installed().map_or_else(Vec::new, |t| t.files().child_env()))
            .stdin(std::process::Stdio::piped())
            // The child's `listening on` line is a log line here; this process's stdout is
            // its own.
            .stdout(std::io::stderr())
            .kill_on_drop(true);
        match self.role {
            Role::Worker => {
                cmd.args(["--learner", &a.learner_endpoint]);
            }
            Role::Learner => {
                cmd.arg("--checkpoints")
                    .arg(self.checkpoints.join(&a.run_id));
            }
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
    // A learner that exits by itself is started again for its run from its checkpoints, a
    // bounded number of times.
    let mut restarts: Option<Restarts> = None;
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
                let r = match &mut restarts {
                    Some(r) if r.run_id == run.run_id => r,
                    other => other.insert(Restarts {
                        run_id: run.run_id.clone(),
                        count: 0,
                    }),
                };
                r.count += 1;
                if r.count > MAX_LEARNER_RESTARTS {
                    tracing::error!(
                        run_id = run.run_id,
                        restarts = MAX_LEARNER_RESTARTS,
                        "the learner of run {} died again after {MAX_LEARNER_RESTARTS} restarts: \
                         it is not started again for this run",
                        run.run_id
                    );
                }
            }
            serving = None;
        }
        sequence += 1;
        let serving_run = serving.as_ref().map_or("", |r| r.run_id.as_str());
        let hb = match s.heartbeat(&mut client, sequence, serving_run).await {
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
        let given_up = |a: &RunAssignment| {
            restarts
                .as_ref()
                .is_some_and(|r| r.run_id == a.run_id && r.count > MAX_LEARNER_RESTARTS)
        };
        if let (None, Some(a)) = (&serving, wanted)
            && !given_up(&a)
        {
            match restarts.as_ref().filter(|r| r.run_id == a.run_id) {
                Some(r) => tracing::warn!(
                    run_id = a.run_id,
                    restart = r.count,
                    "starting the learner of run {} again from its checkpoints (restart {} of \
                     at most {MAX_LEARNER_RESTARTS})",
                    a.run_id,
                    r.count
                ),
                None => tracing::info!(run_id = a.run_id, "serving run {}", a.run_id),
            }
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

/// The port of a service URL such as `http://10.0.0.2:7000`; `None` when it names none.
fn port_of(url: &str) -> Option<u16> {
    let authority = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = authority.split('/').next()?;
    authority.rsplit_once(':')?.1.parse().ok()
}

/// `listen` (HOST:PORT) with its port replaced.
fn with_port(listen: &str, port: u16) -> String {
    let host = listen.rsplit_once(':').map_or(listen, |(host, _)| host);
    format!("{host}:{port}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restarted_learner_serves_at_the_port_its_run_knows() {
        assert_eq!(port_of("http://10.0.0.2:7000"), Some(7000));
        assert_eq!(port_of("https://learner.example:7443/"), Some(7443));
        assert_eq!(port_of("http://[::1]:7001"), Some(7001));
        assert_eq!(port_of(""), None);
        assert_eq!(port_of("http://learner"), None);
        assert_eq!(with_port("0.0.0.0:0", 7000), "0.0.0.0:7000");
        assert_eq!(with_port("[::]:0", 7000), "[::]:7000");
    }
}
