//! The ledger: the durable record of runs, prompts, trajectories and learner steps.
//!
//! This module is the only part of Chorus that speaks SQL. It stores into
//! SQLite (one file per deployment, the default) or PostgreSQL (shared, for
//! multi-node runs and long-lived inspection), with the same schema in both
//! (`orchestrator/migrations/<dialect>/`, documented with example queries in
//! `docs/ledger.md`).
//!
//! # Opening
//!
//! [`Ledger::open`] takes `sqlite://path/to/ledger.db` (the file and its parent
//! directories are created; WAL journal, `synchronous = FULL`, foreign keys on),
//! `sqlite::memory:` (tests), or `postgres://user:pass@host/db`. It applies any
//! pending migrations before returning.
//!
//! # Writes are batched off the hot path
//!
//! Every write method (`insert_*`, `record_*`, `mark_*`, `set_run_status`) only
//! puts the write on a bounded queue and returns; it waits only when the queue
//! is full (backpressure instead of unbounded memory). A background task drains
//! the queue and commits the writes in batches, one transaction per batch, when
//! a batch reaches [`LedgerOptions::max_batch_rows`] rows or
//! [`LedgerOptions::flush_interval`] after its first write. Writes commit in the
//! order they were queued. Timestamps are taken when a method is called, not when
//! the batch commits.
//!
//! - [`Ledger::flush`] returns once everything queued before it is committed
//!   (durable: on SQLite every commit is fsynced, on PostgreSQL commits are
//!   durable with the server's default `synchronous_commit`).
//! - [`Ledger::close`] does the same, then stops the writer and closes the
//!   connections; writes after it fail with [`LedgerError::Closed`].
//!
//! Reads query the database directly and so see only committed writes: call
//! `flush` first to read your own writes. Dropping every handle without `close`
//! still commits what is queued if the runtime keeps running, but only `close`
//! guarantees it.
//!
//! A write the database refuses (for example a prompt of an unknown run) does not
//! take its batch down: the batch is retried one write at a time, and the
//! failures are returned by the next `flush` or `close` as
//! [`LedgerError::WriteFailed`].
//!
//! # Idempotency
//!
//! Rows are keyed by the ids the protocol carries (run, prompt, trajectory, (run,
//! step), (run, version)); inserting a key twice keeps the first row
//! (`ON CONFLICT DO NOTHING`), so a retried message never duplicates a row. Prompt
//! state changes only move forward (`dispatched -> generated -> scored ->
//! consumed`, or `dropped` before `consumed`); a repeated or late change is a no-op.
//!
//! # Storage choices
//!
//! Timestamps are `BIGINT` milliseconds since the Unix epoch (UTC). JSON (task,
//! reward components, event payloads) is `TEXT`. Per-token arrays are compact
//! little-endian blobs: token ids `u32`, logprobs `f32`, policy versions
//! run-length encoded as (`u64` version, `u32` count) pairs; a trajectory also
//! stores its token count and min / max policy version as plain columns for SQL.
//!
//! ```no_run
//! # async fn demo() -> Result<(), chorus_orchestrator::ledger::LedgerError> {
//! use chorus_orchestrator::ledger::{Ledger, NewRun, RolloutFilter, RunStatus};
//!
//! let ledger = Ledger::open("sqlite://runs/ledger.db").await?;
//! ledger
//!     .insert_run(NewRun {
//!         id: "run-1".into(),
//!         name: "gsm8k-grpo".into(),
//!         config_toml: "[run]\nsteps = 100\n".into(),
//!         status: RunStatus::Running,
//!     })
//!     .await?;
//! ledger.flush().await?;
//! let best = ledger
//!     .list_rollouts(&RolloutFilter::default().run("run-1").min_reward(1.0).limit(10))
//!     .await?;
//! # let _ = best;
//! ledger.close().await?;
//! # Ok(()) }
//! ```

mod audit;
mod codec;
mod error;
mod migrate;
mod read;
mod sql;
mod types;
mod writer;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::task::JoinHandle;

pub use audit::{AuditCheck, AuditReport};
pub use error::LedgerError;
pub use types::{
    EnvironmentFaults, Evaluation, EventRecord, LaunchEval, LearnerStep, LearnerStepRecord,
    NewPrompt, NewRun, NewStage, NewTrajectory, PolicyVersion, PolicyVersionRecord, PromptRecord,
    PromptState, RewardByStep, RolloutFilter, RolloutSummary, RunOutputs, RunRecord, RunStatus,
    Split, StageEnd, StageRecord, StageStatus, StalenessCount, Timings, TrajectoryCounts,
    TrajectoryRecord, TrajectoryStatus, WeightSync, WeightTransfer,
};

use sql::Pools;
use writer::{BatchLimits, Command, Transition, WriteOp};

/// Tuning of a [`Ledger`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerOptions {
    /// Writes that can wait in the queue before write methods start waiting.
    pub queue_capacity: usize,
    /// A batch is committed once it holds this many rows...
    pub max_batch_rows: usize,
    /// ...or this long after its first write.
    pub flush_interval: Duration,
    /// Connections in the pool (an in-memory SQLite ledger always uses one).
    pub max_connections: u32,
    /// How long a batch is tried again while the database cannot be written for a reason that
    /// may pass (it restarts, a connection drops); writers wait meanwhile.
    pub retry_for: Duration,
    /// Longest wait for a pooled connection (PostgreSQL) before a write counts as failed and
    /// is tried again.
    pub acquire_timeout: Duration,
}

impl Default for LedgerOptions {
    fn default() -> Self {
        Self {
            queue_capacity: 4096,
            max_batch_rows: 1000,
            flush_interval: Duration::from_millis(50),
            max_connections: 4,
            retry_for: Duration::from_secs(600),
            acquire_timeout: Duration::from_secs(30),
        }
    }
}

/// Which database a ledger URL names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    SqliteFile(PathBuf),
    SqliteMemory,
    Postgres,
}

fn parse_url(url: &str) -> Result<Target, LedgerError> {
    let invalid = |reason: &str| LedgerError::InvalidUrl {
        url: error::redact(url),
        reason: reason.to_owned(),
    };
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(Target::Postgres);
    }
    let Some(rest) = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
    else {
        return Err(invalid(
            "expected sqlite://<path>, sqlite::memory: or postgres://...",
        ));
    };
    if rest.contains('?') {
        return Err(invalid("query parameters are not supported"));
    }
    match rest {
        "" => Err(invalid("the SQLite path is empty")),
        ":memory:" => Ok(Target::SqliteMemory),
        path => Ok(Target::SqliteFile(PathBuf::from(path))),
    }
}

/// Handle to the ledger; cheap to clone, all clones share one writer.
#[derive(Clone)]
pub struct Ledger {
    inner: Arc<Inner>,
}

struct Inner {
    pools: Pools,
    queue: mpsc::Sender<Command>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("backend", &self.backend())
            .finish_non_exhaustive()
    }
}

impl Ledger {
    /// Opens (creating if needed) and migrates the ledger at `url`, with default options.
    pub async fn open(url: &str) -> Result<Self, LedgerError> {
        Self::open_with(url, LedgerOptions::default()).await
    }

    /// Opens (creating if needed) and migrates the ledger at `url`.
    ///
    /// Must be called within a Tokio runtime: it spawns the writer task.
    pub async fn open_with(url: &str, options: LedgerOptions) -> Result<Self, LedgerError> {
        // PostgreSQL's migrations hold an advisory lock (sqlx takes it); SQLite has none, so
        // processes opening one new file at once take turns on a lock file beside it.
        let mut migration_lock = None;
        let pools = match parse_url(url)? {
            Target::SqliteFile(path) => {
                create_parent(&path)?;
                migration_lock = Some(lock_for_migration(&path).await?);
                let opts = sqlite_options(SqliteConnectOptions::new().filename(&path));
                let pool = SqlitePoolOptions::new()
                    .max_connections(options.max_connections.max(1))
                    .connect_with(opts)
                    .await
                    .map_err(|source| connect_error("sqlite", url, source))?;
                Pools::Sqlite(pool)
            }
            Target::SqliteMemory => {
                let opts = sqlite_options(
                    SqliteConnectOptions::from_str("sqlite::memory:")
                        .map_err(|source| connect_error("sqlite", url, source))?,
                )
                .journal_mode(SqliteJournalMode::Memory);
                // Each connection would see its own empty database: keep exactly one.
                let pool = SqlitePoolOptions::new()
                    .max_connections(1)
                    .min_connections(1)
                    .idle_timeout(None)
                    .max_lifetime(None)
                    .connect_with(opts)
                    .await
                    .map_err(|source| connect_error("sqlite", url, source))?;
                Pools::Sqlite(pool)
            }
            Target::Postgres => {
                let opts =
                    PgConnectOptions::from_str(url).map_err(|e| LedgerError::InvalidUrl {
                        url: error::redact(url),
                        reason: e.to_string(),
                    })?;
                let pool = PgPoolOptions::new()
                    .max_connections(options.max_connections.max(1))
                    .acquire_timeout(options.acquire_timeout)
                    .connect_with(opts)
                    .await
                    .map_err(|source| connect_error("postgres", url, source))?;
                Pools::Postgres(pool)
            }
        };
        let backend = pools.backend_name();
        let migrated = match &pools {
            Pools::Sqlite(p) => migrate::migrator(migrate::SQLITE).run(p).await,
            Pools::Postgres(p) => migrate::migrator(migrate::POSTGRES).run(p).await,
        };
        drop(migration_lock);
        if let Err(source) = migrated {
            pools.close().await;
            return Err(LedgerError::Migrate { backend, source });
        }
        let (queue, rx) = mpsc::channel(options.queue_capacity.max(1));
        let limits = BatchLimits {
            max_rows: options.max_batch_rows.max(1),
            interval: options.flush_interval,
            retry_for: options.retry_for,
        };
        let writer = tokio::spawn(writer::run(pools.clone(), rx, limits));
        Ok(Self {
            inner: Arc::new(Inner {
                pools,
                queue,
                writer: Mutex::new(Some(writer)),
            }),
        })
    }

    /// `"sqlite"` or `"postgres"`.
    pub fn backend(&self) -> &'static str {
        self.inner.pools.backend_name()
    }

    async fn enqueue(&self, op: WriteOp) -> Result<(), LedgerError> {
        self.inner
            .queue
            .send(Command::Write(op))
            .await
            .map_err(|_| LedgerError::Closed)
    }

    /// Waits until every write queued before this call is committed.
    ///
    /// Returns [`LedgerError::WriteFailed`] if any write failed since the last
    /// `flush` (the others are committed).
    pub async fn flush(&self) -> Result<(), LedgerError> {
        let (reply, answer) = oneshot::channel();
        self.inner
            .queue
            .send(Command::Flush(reply))
            .await
            .map_err(|_| LedgerError::Closed)?;
        answer.await.map_err(|_| LedgerError::Closed)?
    }

    /// Commits everything queued, stops the writer and closes the connections.
    ///
    /// Affects every clone of the handle. Calling it again does nothing.
    pub async fn close(&self) -> Result<(), LedgerError> {
        let mut writer = self.inner.writer.lock().await;
        let Some(handle) = writer.take() else {
            return Ok(());
        };
        let (reply, answer) = oneshot::channel();
        let result = match self.inner.queue.send(Command::Close(reply)).await {
            Ok(()) => answer.await.unwrap_or(Err(LedgerError::Closed)),
            Err(_) => Err(LedgerError::Closed),
        };
        let _ = handle.await;
        self.inner.pools.close().await;
        result
    }

    /// Records a new run. A run whose id is already in the ledger is refused, and the next
    /// [`flush`](Self::flush) reports it: rows of two runs never mix under one id.
    pub async fn insert_run(&self, run: NewRun) -> Result<(), LedgerError> {
        self.enqueue(WriteOp::InsertRun {
            run,
            at_ms: now_ms(),
        })
        .await
    }

    /// Records a run (as given, normally pending) and the `LaunchRun` request of `orchestrator`
    /// that created it, with the request's own evaluation settings, in one transaction.
    pub async fn record_launch(
        &self,
        run: NewRun,
        orchestrator: &str,
        request_id: &str,
        eval: LaunchEval,
    ) -> Result<(), LedgerError> {
        self.enqueue(WriteOp::Launch {
            run,
            orchestrator: orchestrator.to_owned(),
            request_id: request_id.to_owned(),
            eval,
            at_ms: now_ms(),
        })
        .await
    }

    /// Records what a run leaves behind (the CPU it ran on, its final policy's directory, its
    /// environments' faults), which with the other tables makes its summary.
    pub async fn record_run_outputs(
        &self,
        run_id: &str,
        outputs: RunOutputs,
    ) -> Result<(), LedgerError> {
        self.enqueue(WriteOp::RunOutputs {
            run_id: run_id.to_owned(),
            outputs,
        })
        .await
    }

    /// Changes a run's status; a terminal status also sets `finished_at_ms`
    /// (once: a repeated terminal change keeps the first time).
    pub async fn set_run_status(&self, run_id: &str, status: RunStatus) -> Result<(), LedgerError> {
        self.enqueue(WriteOp::SetRunStatus {
            run_id: run_id.to_owned(),
            status,
            at_ms: now_ms(),
        })
        .await
    }

    /// Records prompts sent to rollout workers, in state `dispatched`.
    pub async fn record_prompts_dispatched(
        &self,
        prompts: Vec<NewPrompt>,
    ) -> Result<(), LedgerError> {
        self.enqueue(WriteOp::PromptsDispatched {
            prompts,
            at_ms: now_ms(),
        })
        .await
    }

    async fn transition(
        &self,
        ids: impl IntoIterator<Item = impl Into<String>>,
        to: Transition,
    ) -> Result<(), LedgerError> {
        let ids: Vec<String> = ids.into_iter().map(Into::into).collect();
        if ids.is_empty() {
            return Ok(());
        }
        self.enqueue(WriteOp::PromptsTransition {
            ids,
            to,
            at_ms: now_ms(),
        })
        .await
    }

    /// Moves `dispatched` prompts to `generated`.
    pub async fn mark_generated(
        &self,
        prompt_ids: impl IntoIterator<Item = impl Into<String>>,
    ) -> Result<(), LedgerError> {
        self.transition(prompt_ids, Transition::Generated).await
    }

    /// Moves `dispatched` or `generated` prompts to `scored`.
    pub async fn mark_scored(
        &self,
        prompt_ids: impl IntoIterator<Item = impl Into<String>>,
    ) -> Result<(), LedgerError> {
        self.transition(prompt_ids, Transition::Scored).await
    }

    /// Moves live prompts to `consumed` by learner step `step`, and stamps
    /// `consumed_at_step` on their `ok` trajectories.
    pub async fn mark_consumed(
        &self,
        prompt_ids: impl IntoIterator<Item = impl Into<String>>,
        step: u64,
    ) -> Result<(), LedgerError> {
        self.transition(prompt_ids, Transition::Consumed { step })
            .await
    }

    /// Moves live prompts to `dropped`, with the reason.
    pub async fn mark_dropped(
        &self,
        prompt_ids: impl IntoIterator<Item = impl Into<String>>,
        reason: &str,
    ) -> Result<(), LedgerError> {
        self.transition(
            prompt_ids,
            Transition::Dropped {
                reason: reason.to_owned(),
            },
        )
        .await
    }

    /// Records trajectories. Ids already present are skipped.
    pub async fn insert_trajectories(
        &self,
        trajectories: Vec<NewTrajectory>,
    ) -> Result<(), LedgerError> {
        if trajectories.is_empty() {
            return Ok(());
        }
        self.enqueue(WriteOp::Trajectories {
            trajectories,
            at_ms: now_ms(),
        })
        .await
    }

    /// Records a learner step. A second record of the same (run, step) is ignored.
    pub async fn insert_learner_step(&self, step: LearnerStep) -> Result<(), LedgerError> {
        self.enqueue(WriteOp::LearnerStep {
            step,
            at_ms: now_ms(),
        })
        .await
    }

    /// Records a published policy version. A second record of the same (run,
    /// version) is ignored.
    pub async fn record_policy_version(&self, version: PolicyVersion) -> Result<(), LedgerError> {
        self.enqueue(WriteOp::PolicyVersion {
            version,
            at_ms: now_ms(),
        })
        .await
    }

    /// Records weight transfers the learner served (rows of `weight_transfers`).
    pub async fn record_weight_transfers(
        &self,
        transfers: Vec<WeightTransfer>,
    ) -> Result<(), LedgerError> {
        if transfers.is_empty() {
            return Ok(());
        }
        self.enqueue(WriteOp::WeightTransfers { transfers }).await
    }

    /// Rewinds run `run_id` to policy `version`, for a run resumed from a learner checkpoint
    /// at that version: the groups of steps `version` and later were trained into state that
    /// was lost, so their prompts become `dropped` (with `reason`) and their trajectories
    /// unconsumed; prompts still in flight are dropped too; learner steps and policy versions
    /// after `version` are deleted (the resumed learner records them again); the run is
    /// running again. One transaction.
    pub async fn rewind(
        &self,
        run_id: &str,
        version: u64,
        reason: &str,
    ) -> Result<(), LedgerError> {
        self.enqueue(WriteOp::Rewind {
            run_id: run_id.to_owned(),
            version,
            reason: reason.to_owned(),
            at_ms: now_ms(),
        })
        .await?;
        self.flush().await
    }

    /// Forgets run `run_id`'s learner steps, policy versions and weight transfers after
    /// `version`, for a learner that died and came back from a checkpoint at `version`: it trains
    /// those steps again (on the same groups, sent again) and they are recorded as it reports
    /// them. Prompts and trajectories stay as they are: their groups are trained at the same
    /// steps as before.
    pub async fn forget_learner_steps(
        &self,
        run_id: &str,
        version: u64,
    ) -> Result<(), LedgerError> {
        self.enqueue(WriteOp::ForgetLearnerSteps {
            run_id: run_id.to_owned(),
            version,
        })
        .await
    }

    /// Drops every prompt of `run_id` still in flight (dispatched, generated or scored), with
    /// `reason`: a run that stopped leaves none behind. A later `--resume` rewinds as usual.
    pub async fn drop_in_flight(&self, run_id: &str, reason: &str) -> Result<(), LedgerError> {
        self.enqueue(WriteOp::DropInFlight {
            run_id: run_id.to_owned(),
            reason: reason.to_owned(),
            at_ms: now_ms(),
        })
        .await
    }

    /// Records that a stage began (a stage begun again, as a resumed run does, is running
    /// again). Record it before any of the stage's groups reach the learner: a learner step
    /// belongs to the last stage begun before it.
    pub async fn start_stage(&self, stage: NewStage) -> Result<(), LedgerError> {
        self.enqueue(WriteOp::StageStarted {
            stage,
            at_ms: now_ms(),
        })
        .await
    }

    /// Records how a stage ended.
    pub async fn finish_stage(&self, end: StageEnd) -> Result<(), LedgerError> {
        self.enqueue(WriteOp::StageFinished {
            end,
            at_ms: now_ms(),
        })
        .await
    }

    /// Records a held-out evaluation (the first of a run, version, environment and difficulty
    /// wins: a version is measured once).
    pub async fn record_evaluation(&self, evaluation: Evaluation) -> Result<(), LedgerError> {
        self.enqueue(WriteOp::Evaluation {
            evaluation,
            at_ms: now_ms(),
        })
        .await
    }

    /// Appends an event to a run's log (`payload_json` is stored as given).
    pub async fn record_event(
        &self,
        run_id: &str,
        kind: &str,
        payload_json: String,
    ) -> Result<(), LedgerError> {
        self.enqueue(WriteOp::Event {
            run_id: run_id.to_owned(),
            kind: kind.to_owned(),
            payload_json,
            at_ms: now_ms(),
        })
        .await
    }
}

fn sqlite_options(opts: SqliteConnectOptions) -> SqliteConnectOptions {
    opts.create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(true)
        .busy_timeout(Duration::from_secs(30))
}

/// An exclusive lock on `<ledger>-migrate.lock`, held until the returned file is dropped; waits
/// while another process holds it.
async fn lock_for_migration(ledger: &Path) -> Result<std::fs::File, LedgerError> {
    let mut name = ledger.as_os_str().to_owned();
    name.push("-migrate.lock");
    let path = PathBuf::from(name);
    let locking = path.clone();
    let locked = tokio::task::spawn_blocking(move || {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&locking)?;
        file.lock()?;
        Ok::<_, std::io::Error>(file)
    })
    .await
    .map_err(std::io::Error::other)
    .and_then(|r| r);
    locked.map_err(|source| LedgerError::MigrationLock { path, source })
}

fn create_parent(path: &Path) -> Result<(), LedgerError> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => {
            std::fs::create_dir_all(dir).map_err(|source| LedgerError::CreateDir {
                path: dir.to_owned(),
                source,
            })
        }
        _ => Ok(()),
    }
}

fn connect_error(backend: &'static str, url: &str, source: sqlx::Error) -> LedgerError {
    LedgerError::Connect {
        backend,
        url: error::redact(url),
        source,
    }
}

/// A new run's id: `<name>-<UTC date>-<UTC time>-<8 random hex digits>`, e.g.
/// `quickstart-20261204-011918-3fa2b1c0`. Ids of one name sort by their start time, and two runs
/// started in the same second (two processes, one config) still get different ids.
pub fn new_run_id(name: &str) -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("{name}-{}-{:08x}", utc_stamp(secs), rand::random::<u32>())
}

/// `YYYYMMDD-HHMMSS` of `secs` seconds after the Unix epoch, in UTC.
fn utc_stamp(secs: u64) -> String {
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Days to a proleptic Gregorian date, counting in 400-year eras that start on 1 March
    // (so the leap day ends a year).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}-{:02}{:02}{:02}",
        rest / 3_600,
        rest % 3_600 / 60,
        rest % 60
    )
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A `u64` for a `BIGINT` column.
fn to_i64(field: &'static str, value: u64) -> Result<i64, LedgerError> {
    i64::try_from(value).map_err(|_| LedgerError::OutOfRange { field, value })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_classified() {
        assert_eq!(
            parse_url("sqlite://runs/a.db").unwrap(),
            Target::SqliteFile("runs/a.db".into())
        );
        assert_eq!(
            parse_url("sqlite:///tmp/a.db").unwrap(),
            Target::SqliteFile("/tmp/a.db".into())
        );
        assert_eq!(
            parse_url("sqlite:a.db").unwrap(),
            Target::SqliteFile("a.db".into())
        );
        assert_eq!(parse_url("sqlite::memory:").unwrap(), Target::SqliteMemory);
        assert_eq!(parse_url("postgres://u:p@h/db").unwrap(), Target::Postgres);
        assert_eq!(parse_url("postgresql://h/db").unwrap(), Target::Postgres);
        for bad in [
            "mysql://h/db",
            "sqlite://",
            "runs/a.db",
            "sqlite://a.db?mode=ro",
        ] {
            assert!(
                matches!(parse_url(bad), Err(LedgerError::InvalidUrl { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn utc_stamps_are_calendar_dates() {
        assert_eq!(utc_stamp(0), "19700101-000000");
        // 2000-02-29 (a leap day of a year divisible by 400) and the day after.
        assert_eq!(utc_stamp(951_782_400 + 3_661), "20000229-010101");
        assert_eq!(utc_stamp(951_868_800), "20000301-000000");
        // 2026-12-04 23:59:59, and the last second of a year.
        assert_eq!(utc_stamp(1_796_428_799), "20261204-235959");
        assert_eq!(utc_stamp(1_798_761_599), "20261231-235959");
    }

    #[test]
    fn run_ids_carry_the_name_and_differ_within_a_second() {
        let (a, b) = (new_run_id("quickstart"), new_run_id("quickstart"));
        assert_ne!(a, b);
        let rest = a.strip_prefix("quickstart-").expect("the name first");
        let parts: Vec<&str> = rest.split('-').collect();
        assert_eq!(parts.len(), 3, "{a}");
        assert_eq!(
            (parts[0].len(), parts[1].len(), parts[2].len()),
            (8, 6, 8),
            "{a}"
        );
        assert!(parts[2].chars().all(|c| c.is_ascii_hexdigit()), "{a}");
    }

    #[test]
    fn u64_beyond_i64_is_out_of_range() {
        assert_eq!(to_i64("x", 5).unwrap(), 5);
        assert!(matches!(
            to_i64("x", u64::MAX),
            Err(LedgerError::OutOfRange { field: "x", .. })
        ));
    }
}
