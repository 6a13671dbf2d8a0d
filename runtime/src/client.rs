//! The launching side of a standing fleet: hand a run to an orchestrator (`LaunchRun`, retried
//! under the same idempotency key) and follow its events (`WatchRun`, resumed where it broke off)
//! to its final status.

use std::time::Duration;

use chorus_proto::tonic::Code;
use chorus_proto::v1::{
    GetRunRequest, LaunchRunRequest, LaunchRunResponse, RunEvent, RunStatus, WatchRunRequest,
    run_event,
};

use crate::error::{Result, RunError};
pub use crate::registration::{Client, connect};

/// Times a launch is tried while the orchestrator is unavailable.
const LAUNCH_ATTEMPTS: u64 = 4;
/// Times in a row following a run may fail to reach the orchestrator before it gives up.
const FOLLOW_FAILURES: u32 = 10;

/// Launches a run at the orchestrator behind `client`. Retries carry the same request id, so a
/// launch whose answer was lost is not doubled. `orchestrator` names it in errors.
pub async fn launch(
    client: &mut Client,
    orchestrator: &str,
    request: LaunchRunRequest,
) -> Result<LaunchRunResponse> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match client.launch_run(request.clone()).await {
            Ok(r) => return Ok(r.into_inner()),
            Err(s) if s.code() == Code::Unavailable && attempt < LAUNCH_ATTEMPTS => {
                tracing::warn!(
                    orchestrator,
                    "the orchestrator is unavailable ({}); retrying",
                    s.message()
                );
                tokio::time::sleep(Duration::from_secs(attempt)).await;
            }
            Err(s) => {
                let hint = chorus_proto::tls::refusal_hint(orchestrator, &s);
                return Err(RunError::rpc(format!("launching at {orchestrator}{hint}"))(
                    s,
                ));
            }
        }
    }
}

/// A fresh idempotency key: the time and the process id, which no other launch shares.
pub fn new_request_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("launch-{nanos:x}-{:x}", std::process::id())
}

/// How a followed run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunEnd {
    /// It succeeded.
    Succeeded,
    /// It failed or was cancelled, for this reason.
    Failed(String),
}

/// The final status an event announces, if it is one.
pub fn final_status(e: &RunEvent) -> Option<RunEnd> {
    let Some(run_event::Kind::StatusChanged(c)) = &e.kind else {
        return None;
    };
    match RunStatus::try_from(c.status).unwrap_or(RunStatus::Unspecified) {
        RunStatus::Succeeded => Some(RunEnd::Succeeded),
        RunStatus::Failed | RunStatus::Cancelled => Some(RunEnd::Failed(c.reason.clone())),
        _ => None,
    }
}

/// Follows run `run_id`'s events, past ones first, handing each to `on_event`, until the run
/// ends; reconnects where it left off when the stream breaks, and asks for the run's status when
/// the stream ends without one.
pub async fn follow(
    client: &mut Client,
    run_id: &str,
    mut on_event: impl FnMut(&RunEvent),
) -> Result<RunEnd> {
    let mut last = 0;
    let mut failures = 0;
    loop {
        let stream = client
            .watch_run(WatchRunRequest {
                run_id: run_id.to_string(),
                after_sequence: last,
            })
            .await;
        let mut stream = match stream {
            Ok(s) => s.into_inner(),
            Err(s) if s.code() == Code::Unavailable && failures < FOLLOW_FAILURES => {
                failures += 1;
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
            Err(s) => return Err(RunError::rpc(format!("watching run {run_id}"))(s)),
        };
        loop {
            match stream.message().await {
                Ok(Some(e)) => {
                    last = e.sequence;
                    failures = 0;
                    on_event(&e);
                    if let Some(end) = final_status(&e) {
                        return Ok(end);
                    }
                }
                Ok(None) => break,
                Err(s) => {
                    tracing::warn!(
                        run_id,
                        "the event stream broke ({}); reconnecting",
                        s.message()
                    );
                    break;
                }
            }
        }
        // The stream ended without a final status: ask for it.
        match client
            .get_run(GetRunRequest {
                run_id: run_id.to_string(),
            })
            .await
        {
            Ok(r) if r.get_ref().status == RunStatus::Succeeded as i32 => {
                return Ok(RunEnd::Succeeded);
            }
            Ok(r) if r.get_ref().status == RunStatus::Failed as i32 => {
                return Ok(RunEnd::Failed("see the orchestrator's log".into()));
            }
            _ => {}
        }
        failures += 1;
        if failures > FOLLOW_FAILURES {
            return Err(RunError::Unavailable(format!(
                "lost the event stream of run {run_id} and could not reconnect"
            )));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
