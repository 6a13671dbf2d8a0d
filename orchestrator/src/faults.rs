//! Environment faults: every call into an environment runs on a blocking thread under a deadline,
//! so an environment that panics, returns an error, hangs or returns malformed data fails only the
//! prompt or trajectory it was working on. Each environment has an error budget; once it is
//! spent the environment is paused for the rest of the run, reported, and the scheduler draws
//! from the others.

use std::collections::BTreeMap;
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::Mutex;
use std::time::Duration;

use chorus_environments::EnvError;

use crate::metrics as names;

/// How much misbehaviour an environment is allowed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FaultPolicy {
    /// Longest one environment call (sample, score, step…) may take.
    pub deadline: Duration,
    /// Faults an environment may cause before it is paused.
    pub error_budget: u64,
    /// How long a paused environment rests before one call probes it; a probe that succeeds
    /// resumes it with a fresh budget (a plugin process that died and came back at its address
    /// is used again). `None`: paused for the rest of the run.
    pub probe_after: Option<Duration>,
}

impl Default for FaultPolicy {
    fn default() -> Self {
        Self {
            deadline: Duration::from_secs(30),
            error_budget: 20,
            probe_after: Some(Duration::from_secs(30)),
        }
    }
}

/// Why an environment call produced nothing usable.
#[derive(Clone, Debug, PartialEq)]
pub enum EnvFault {
    /// The environment returned an error (a plugin that raised, a corrupt task…).
    Error(String),
    /// The environment panicked.
    Panicked(String),
    /// The call outlived the deadline; its thread is abandoned.
    TimedOut(Duration),
    /// The environment answered with something that breaks its contract.
    Malformed(String),
    /// The environment spent its error budget earlier in the run.
    Paused,
}

impl fmt::Display for EnvFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EnvFault::Error(m) => write!(f, "environment error: {m}"),
            EnvFault::Panicked(m) => write!(f, "environment panicked: {m}"),
            EnvFault::TimedOut(d) => {
                write!(
                    f,
                    "environment call exceeded its {:.1} s deadline",
                    d.as_secs_f64()
                )
            }
            EnvFault::Malformed(m) => write!(f, "environment returned malformed data: {m}"),
            EnvFault::Paused => write!(f, "environment is paused: its error budget is spent"),
        }
    }
}

impl EnvFault {
    /// A short name of the fault's kind (a metrics label).
    pub fn kind(&self) -> &'static str {
        match self {
            EnvFault::Error(_) => "error",
            EnvFault::Panicked(_) => "panicked",
            EnvFault::TimedOut(_) => "timed_out",
            EnvFault::Malformed(_) => "malformed",
            EnvFault::Paused => "paused",
        }
    }
}

/// An environment's fault record.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Health {
    /// Faults so far.
    pub faults: u64,
    /// Whether the budget is spent.
    pub paused: bool,
    /// The latest fault, for the report.
    pub last_fault: String,
    /// Times a probe found it working again after a pause.
    #[serde(default)]
    pub resumed: u64,
    /// Faults counted before the last resumption (the budget applies to the ones after).
    #[serde(skip)]
    faults_before_resume: u64,
    /// When it was paused, or last probed while paused.
    #[serde(skip)]
    rested_since: Option<std::time::Instant>,
}

impl Health {
    /// Whether it is paused and not yet due for a probe under `policy`.
    fn resting(&self, policy: &FaultPolicy) -> bool {
        self.paused
            && match (policy.probe_after, self.rested_since) {
                (Some(after), Some(since)) => since.elapsed() < after,
                _ => true,
            }
    }
}

/// Fault accounting shared by every stage of a run.
#[derive(Debug, Default)]
pub struct EnvFaults {
    policy: FaultPolicy,
    health: Mutex<BTreeMap<String, Health>>,
}

impl EnvFaults {
    /// Accounting under `policy`.
    pub fn new(policy: FaultPolicy) -> Self {
        Self {
            policy,
            health: Mutex::new(BTreeMap::new()),
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> FaultPolicy {
        self.policy
    }

    /// Whether `env` is paused and resting: not to be drawn until its next probe is due.
    pub fn is_paused(&self, env: &str) -> bool {
        let policy = self.policy;
        self.lock().get(env).is_some_and(|h| h.resting(&policy))
    }

    /// How long until the first of `envs` that is resting is due for a probe; `None` when a
    /// paused one will never be probed (no `probe_after`).
    pub fn next_probe_in<'a>(&self, envs: impl IntoIterator<Item = &'a str>) -> Option<Duration> {
        let after = self.policy.probe_after?;
        let health = self.lock();
        envs.into_iter()
            .filter_map(|e| health.get(e))
            .filter(|h| h.paused)
            .map(|h| after.saturating_sub(h.rested_since.map_or(after, |s| s.elapsed())))
            .min()
    }

    /// Every environment that has faulted, with its record.
    pub fn report(&self) -> BTreeMap<String, Health> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Health>> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a fault against `env`; pauses it (and says so on stderr) when the budget is spent.
    pub fn record(&self, env: &str, fault: &EnvFault) {
        if *fault == EnvFault::Paused {
            return;
        }
        let mut health = self.lock();
        let h = health.entry(env.to_string()).or_default();
        h.faults += 1;
        h.last_fault = fault.to_string();
        if !h.paused && h.faults - h.faults_before_resume >= self.policy.error_budget {
            h.paused = true;
            h.rested_since = Some(std::time::Instant::now());
            tracing::warn!(
                env = %env,
                faults = h.faults,
                error_budget = self.policy.error_budget,
                last_fault = %fault,
                "environment paused: its error budget is spent"
            );
        }
    }

    /// Runs `call` against environment `env` on a blocking thread under the deadline, turning a
    /// panic, an error or a timeout into an [`EnvFault`] that is counted against the budget.
    pub async fn call<T, F>(&self, env: &str, call: F) -> Result<T, EnvFault>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T, EnvError> + Send + 'static,
    {
        let started = std::time::Instant::now();
        let result = self.call_uncounted(env, call).await;
        let environment = env.to_string();
        metrics::counter!(names::ENVIRONMENT_CALLS, "environment" => environment.clone())
            .increment(1);
        metrics::histogram!(names::ENVIRONMENT_CALL_SECONDS, "environment" => environment.clone())
            .record(started.elapsed().as_secs_f64());
        if let Err(fault) = &result {
            metrics::counter!(
                names::ENVIRONMENT_FAULTS,
                "environment" => environment,
                "kind" => fault.kind()
            )
            .increment(1);
            self.record(env, fault);
        }
        result
    }

    async fn call_uncounted<T, F>(&self, env: &str, call: F) -> Result<T, EnvFault>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T, EnvError> + Send + 'static,
    {
        // A paused environment answers Paused while it rests; once a probe is due, this call
        // is the probe (the others keep resting until it tells).
        let probe = {
            let policy = self.policy;
            let mut health = self.lock();
            match health.get_mut(env) {
                Some(h) if h.resting(&policy) => return Err(EnvFault::Paused),
                Some(h) if h.paused => {
                    h.rested_since = Some(std::time::Instant::now());
                    true
                }
                _ => false,
            }
        };
        let task =
            tokio::task::spawn_blocking(move || std::panic::catch_unwind(AssertUnwindSafe(call)));
        let result = match tokio::time::timeout(self.policy.deadline, task).await {
            Err(_) => Err(EnvFault::TimedOut(self.policy.deadline)),
            Ok(Err(join)) => Err(EnvFault::Panicked(join.to_string())),
            Ok(Ok(Err(panic))) => Err(EnvFault::Panicked(panic_message(&panic))),
            Ok(Ok(Ok(Err(e)))) => Err(EnvFault::Error(e.to_string())),
            Ok(Ok(Ok(Ok(v)))) => Ok(v),
        };
        if probe && result.is_ok() {
            let mut health = self.lock();
            if let Some(h) = health.get_mut(env)
                && h.paused
            {
                h.paused = false;
                h.rested_since = None;
                h.resumed += 1;
                h.faults_before_resume = h.faults;
                tracing::warn!(
                    env = %env,
                    faults = h.faults,
                    "environment resumed: a probe call succeeded after its pause"
                );
            }
        }
        result
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn faults(budget: u64) -> EnvFaults {
        EnvFaults::new(FaultPolicy {
            // Generous: a panic under RUST_BACKTRACE=1 on a loaded machine takes a while to
            // capture its backtrace, and must not be mistaken for a hang.
            deadline: Duration::from_secs(3),
            error_budget: budget,
            probe_after: None,
        })
    }

    #[tokio::test]
    async fn a_paused_environment_is_probed_and_resumes_when_a_call_succeeds() {
        let f = EnvFaults::new(FaultPolicy {
            deadline: Duration::from_secs(3),
            error_budget: 2,
            // Zero rest: every call after the pause is a probe, so the test needs no clock.
            probe_after: Some(Duration::ZERO),
        });
        let down = || Err::<(), _>(EnvError::UnknownSplit("plugin down".into()));
        for _ in 0..2 {
            assert!(f.call("plugin", down).await.is_err());
        }
        assert!(f.report()["plugin"].paused);
        assert_eq!(f.next_probe_in(["plugin"]), Some(Duration::ZERO));
        // The probe fails: still paused, the fault counted.
        assert!(matches!(
            f.call("plugin", down).await,
            Err(EnvFault::Error(_))
        ));
        assert!(f.report()["plugin"].paused);
        assert_eq!(f.report()["plugin"].faults, 3);
        // The plugin is back: the probe succeeds and the environment resumes with a fresh
        // budget (one more fault does not pause it again).
        assert_eq!(f.call("plugin", || Ok(5)).await, Ok(5));
        let h = &f.report()["plugin"];
        assert!(!h.paused && h.resumed == 1, "{h:?}");
        assert!(f.call("plugin", down).await.is_err());
        assert!(!f.is_paused("plugin"));
        assert!(f.call("plugin", down).await.is_err());
        assert!(f.report()["plugin"].paused);

        // Without probes a pause lasts.
        let f = faults(1);
        assert!(f.call("e", down).await.is_err());
        assert_eq!(f.call("e", || Ok(1)).await, Err(EnvFault::Paused));
        assert_eq!(f.next_probe_in(["e"]), None);
    }

    #[tokio::test]
    async fn panics_errors_and_hangs_become_faults_and_spend_the_budget() {
        let f = faults(3);
        assert_eq!(f.call("e", || Ok(7)).await, Ok(7));
        let panicked = f.call::<(), _>("e", || panic!("boom")).await.unwrap_err();
        assert_eq!(panicked, EnvFault::Panicked("boom".into()));
        let err = f
            .call::<(), _>("e", || Err(EnvError::UnknownSplit("x".into())))
            .await
            .unwrap_err();
        assert!(matches!(err, EnvFault::Error(m) if m.contains("x")));
        assert!(!f.is_paused("e"));
        let hung = f
            .call::<(), _>("e", || {
                std::thread::sleep(Duration::from_secs(6));
                Ok(())
            })
            .await
            .unwrap_err();
        assert!(matches!(hung, EnvFault::TimedOut(_)));
        assert!(f.is_paused("e"));
        assert_eq!(f.call("e", || Ok(1)).await, Err(EnvFault::Paused));
        // Other environments are unaffected.
        assert_eq!(f.call("other", || Ok(1)).await, Ok(1));
        let report = f.report();
        assert_eq!(report["e"].faults, 3);
        assert!(report["e"].last_fault.contains("deadline"));
        assert!(!report.contains_key("other"));
    }
}
