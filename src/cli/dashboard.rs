//! `chorus dashboard`: a web page over the ledger, live while runs go on. The page and its
//! script are embedded in the binary (nothing is fetched from the internet); it polls a small
//! JSON API read straight from the ledger (SQLite or PostgreSQL).

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chorus_model::tokenizer::Tokenizer;
use chorus_orchestrator::ledger::{Ledger, RolloutFilter, TrajectoryStatus};
use chorus_proto::v1::FinishReason;
use clap::Args;
use serde::Deserialize;
use serde_json::{Value, json};

/// Serve a dashboard over the ledger: runs with their stages and config, curves per run (reward,
/// held-out accuracy, loss, KL, entropy, gradient norm, learning rate, clip fraction, sampling
/// mismatch, staleness, throughput, faults; zoom by dragging, hover for values, several runs
/// overlaid), and a rollout browser (filters, one trajectory token by token, shaded by
/// log-probability, with the version that sampled each token). It reads the ledger live, so it
/// follows runs as they go; open the printed address in a browser.
///
/// Examples:
///   chorus dashboard
///   chorus dashboard --db postgres://chorus:chorus@127.0.0.1/chorus --listen 0.0.0.0:8080
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct DashboardArgs {
    /// Ledger database: sqlite://PATH or postgres://… (default: the newest runs/*/ledger.sqlite).
    #[arg(long)]
    db: Option<String>,
    /// Where to serve the page; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
}

const INDEX: &str = include_str!("dashboard/index.html");
const SCRIPT: &str = include_str!("dashboard/app.js");
const STYLE: &str = include_str!("dashboard/style.css");

/// The newest matching trajectories a text search of the rollout browser reads at most.
const SEARCH_WINDOW: u32 = 5_000;

struct Shared {
    ledger: Ledger,
    tokenizer: Tokenizer,
}

type AppState = State<Arc<Shared>>;

pub fn run(a: DashboardArgs) -> anyhow::Result<()> {
    let db = match a.db {
        Some(db) => db,
        None => super::inspect::default_db()?,
    };
    super::runtime(2)?.block_on(async move {
        let ledger = Ledger::open(&db)
            .await
            .with_context(|| format!("opening {db}"))?;
        let listener = tokio::net::TcpListener::bind(&a.listen)
            .await
            .with_context(|| format!("binding {}", a.listen))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            ledger,
            tokenizer: Tokenizer::byte_level(),
        });
        tracing::info!(db, "dashboard over {db}");
        super::print_listening(&format!("http://{addr}"));
        axum::serve(listener, router(shared))
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .context("serving the dashboard")
    })
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX) }),
        )
        .route(
            "/app.js",
            get(|| async { asset("text/javascript", SCRIPT) }),
        )
        .route("/style.css", get(|| async { asset("text/css", STYLE) }))
        .route("/api/runs", get(runs))
        .route("/api/runs/{id}/curves", get(curves))
        .route("/api/rollouts", get(rollouts))
        .route("/api/trajectories/{id}", get(trajectory))
        .with_state(shared)
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, kind)], body).into_response()
}

/// A ledger error as a 500 with its message; a missing row as a 404.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, axum::Json(json!({"error": self.1}))).into_response()
    }
}

impl<E: std::fmt::Display> From<E> for ApiError {
    fn from(e: E) -> Self {
        Self(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

impl ApiError {
    fn bad_request(message: String) -> Self {
        Self(StatusCode::BAD_REQUEST, message)
    }
}

type ApiResult = Result<axum::Json<Value>, ApiError>;

async fn runs(State(s): AppState) -> ApiResult {
    let mut out = vec![];
    for r in s.ledger.list_runs(100).await? {
        let stages: Vec<Value> = s
            .ledger
            .list_stages(&r.id)
            .await?
            .into_iter()
            .map(|st| {
                json!({
                    "index": st.stage.stage_index, "name": st.stage.name, "kind": st.stage.kind,
                    "status": st.status.as_str(), "metric": st.stage.metric,
                    "start": st.stage.metric_start, "end": st.metric_end,
                    "moved_policy": st.moved_policy(),
                    "first_step": st.stage.first_step, "last_step": st.last_step,
                    "trajectories": st.trajectories,
                    "wall_seconds": st.finished_at_ms.map(|f| (f - st.started_at_ms) as f64 / 1e3),
                })
            })
            .collect();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(r.created_at_ms);
        out.push(json!({
            "id": r.id, "name": r.name, "status": r.status.as_str(),
            "created_at_ms": r.created_at_ms, "finished_at_ms": r.finished_at_ms,
            "wall_seconds": (r.finished_at_ms.unwrap_or(now) - r.created_at_ms) as f64 / 1e3,
            "config_toml": r.config_toml, "stages": stages,
        }));
    }
    Ok(axum::Json(Value::Array(out)))
}

async fn curves(State(s): AppState, Path(id): Path<String>) -> ApiResult {
    Ok(axum::Json(curves_json(&s.ledger, &id).await?))
}

/// Everything a run's charts draw, by learner step (x) or policy version: what the page and
/// `chorus plot` draw.
pub(super) async fn curves_json(
    ledger: &Ledger,
    id: &str,
) -> Result<Value, chorus_orchestrator::ledger::LedgerError> {
    let id = id.to_string();
    let steps = ledger.list_learner_steps(&id).await?;
    let evals = ledger.list_evaluations(&id).await?;
    let versions = ledger.list_policy_versions(&id).await?;
    // Reward per step, lags and failures come from the ledger's views, aggregated in SQL
    // (a page polled every few seconds must not read every rollout of a long run).
    let mut by_env: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let mut scored = 0;
    for r in ledger.reward_by_step(&id).await? {
        scored += r.trajectories;
        by_env
            .entry(r.environment)
            .or_default()
            .push(json!([r.step, r.mean_reward]));
    }
    let lags: Vec<Value> = ledger
        .trained_staleness(&id)
        .await?
        .into_iter()
        .map(|s| json!([s.lag, s.trajectories]))
        .collect();
    // Per version: mean transfer seconds, the slowest, and the span to the last worker.
    let weight_sync: Vec<Value> = ledger
        .weight_sync(&id)
        .await?
        .into_iter()
        .map(|w| {
            json!([
                w.policy_version,
                w.mean_seconds,
                w.max_seconds,
                w.seconds_to_last_worker,
                w.transfers,
                w.bytes
            ])
        })
        .collect();
    let mut faults: BTreeMap<String, u64> = BTreeMap::new();
    let mut rollouts = 0;
    for f in ledger.faults_by_environment(&id).await? {
        rollouts += f.trajectories;
        if f.failed_trajectories > 0 {
            faults.insert(f.environment, f.failed_trajectories);
        }
    }
    let mut accuracy: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for e in &evals {
        accuracy
            .entry(e.environment.clone())
            .or_default()
            .push(json!([
                e.policy_version,
                e.accuracy,
                e.accuracy_lo,
                e.accuracy_hi
            ]));
    }
    let mut previous: Option<i64> = None;
    let step_rows: Vec<Value> = steps
        .iter()
        .map(|r| {
            let st = &r.step;
            let seconds = previous.map(|p| (r.created_at_ms - p).max(1) as f64 / 1e3);
            previous = Some(r.created_at_ms);
            json!({
                "step": st.step, "version": st.policy_version, "stage": r.stage_index,
                "loss": st.loss, "kl": st.kl, "entropy": st.entropy, "grad_norm": st.grad_norm,
                "learning_rate": st.learning_rate, "clip_fraction": st.clip_fraction,
                "mismatch": st.mean_abs_logprob_diff, "tokens": st.num_tokens,
                "trajectories": st.num_trajectories, "skip_reason": st.skip_reason,
                "trajectories_per_second": seconds.map(|s| st.num_trajectories as f64 / s),
                "tokens_per_second": seconds.map(|s| st.num_tokens as f64 / s),
            })
        })
        .collect();
    let published: Vec<Value> = versions
        .iter()
        .map(|v| json!({"version": v.version.version, "bytes": v.version.num_bytes, "created_at_ms": v.created_at_ms}))
        .collect();
    Ok(json!({
        "run": id, "steps": step_rows, "reward": by_env, "accuracy": accuracy,
        "lag": lags, "faults": faults, "versions": published, "rollouts": rollouts,
        "weight_sync": weight_sync,
        "scored": scored,
    }))
}

/// Filters of the rollout browser.
#[derive(Deserialize, Debug, Default)]
struct RolloutQuery {
    run: Option<String>,
    stage: Option<u64>,
    env: Option<String>,
    min_reward: Option<f64>,
    max_reward: Option<f64>,
    version: Option<u64>,
    finish: Option<String>,
    q: Option<String>,
    limit: Option<u32>,
}

async fn rollouts(State(s): AppState, Query(f): Query<RolloutQuery>) -> ApiResult {
    let limit = f.limit.unwrap_or(100).clamp(1, 1000);
    let finish_reason = match f.finish.as_deref().filter(|w| !w.is_empty()) {
        None => None,
        Some(want) => Some(
            [
                FinishReason::Stop,
                FinishReason::Length,
                FinishReason::Aborted,
                FinishReason::Error,
                FinishReason::Unspecified,
            ]
            .into_iter()
            .find(|r| format!("{r:?}").eq_ignore_ascii_case(want))
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "finish={want:?}: not a finish reason (stop, length, aborted, error, unspecified)"
                ))
            })?,
        ),
    };
    let needle =
        f.q.as_deref()
            .map(str::to_lowercase)
            .filter(|q| !q.is_empty());
    // Every filter but the text runs in SQL; the text needs the prompt decoded, so a search
    // reads a bounded window of the newest matching rows and filters them here.
    let rows = s
        .ledger
        .list_rollouts(&RolloutFilter {
            run_id: f.run.clone().filter(|r| !r.is_empty()),
            environment: f.env.clone().filter(|e| !e.is_empty()),
            min_reward: f.min_reward,
            max_reward: f.max_reward,
            stage_index: f.stage,
            policy_version: f.version,
            finish_reason,
            limit: if needle.is_some() {
                SEARCH_WINDOW
            } else {
                limit
            },
        })
        .await?;
    let mut out = vec![];
    for r in rows {
        if out.len() >= limit as usize {
            break;
        }
        if let Some(q) = &needle {
            let Some(t) = s.ledger.get_trajectory(&r.id).await? else {
                continue;
            };
            let prompt = s
                .tokenizer
                .decode(&t.trajectory.prompt_token_ids, false)
                .unwrap_or_default();
            let hay = format!("{prompt}\n{}", t.trajectory.completion_text).to_lowercase();
            if !hay.contains(q.as_str()) {
                continue;
            }
        }
        let (status, failure) = match &r.status {
            TrajectoryStatus::Ok => ("ok", None),
            TrajectoryStatus::Failed { reason } => ("failed", Some(reason.clone())),
        };
        out.push(json!({
            "id": r.id, "run": r.run_id, "environment": r.environment, "worker": r.worker_id,
            "reward": r.reward, "tokens": r.num_completion_tokens,
            "min_version": r.min_policy_version, "max_version": r.max_policy_version,
            "finish": format!("{:?}", r.finish_reason).to_lowercase(), "status": status,
            "failure": failure, "step": r.consumed_at_step,
        }));
    }
    Ok(axum::Json(Value::Array(out)))
}

/// One trajectory, turn by turn, token by token.
async fn trajectory(State(s): AppState, Path(id): Path<String>) -> ApiResult {
    let t = s
        .ledger
        .get_trajectory(&id)
        .await?
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no trajectory `{id}`")))?;
    let tr = &t.trajectory;
    let decode = |ids: &[u32]| s.tokenizer.decode(ids, false).unwrap_or_default();
    let tokens: Vec<Value> = tr
        .completion_token_ids
        .iter()
        .enumerate()
        .map(|(i, &tok)| {
            json!({
                "id": tok, "text": decode(&[tok]),
                "logprob": tr.logprobs.get(i), "version": tr.policy_versions.get(i),
            })
        })
        .collect();
    let (status, failure) = match &tr.status {
        TrajectoryStatus::Ok => ("ok", None),
        TrajectoryStatus::Failed { reason } => ("failed", Some(reason.clone())),
    };
    Ok(axum::Json(json!({
        "id": tr.id, "run": tr.run_id, "environment": tr.environment, "worker": tr.worker_id,
        "group": tr.group_id, "stage": tr.stage_index, "prompt": decode(&tr.prompt_token_ids),
        "completion": tr.completion_text, "tokens": tokens, "reward": tr.reward,
        "components": tr.reward_components, "reason": tr.reason, "status": status,
        "failure": failure, "finish": format!("{:?}", tr.finish_reason).to_lowercase(),
        "step": t.consumed_at_step,
    })))
}
