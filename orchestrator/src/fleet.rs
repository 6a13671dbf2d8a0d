//! [`Fleet`]: the state of the orchestrator process.
//!
//! The run it serves now, the runs launched and waiting for their turn (`LaunchRun`, idempotent
//! by request id), every run's [`Directory`] for `WatchRun`, and the standby services. A standby
//! service registered without a run; its heartbeats are answered with a [`RunAssignment`] once
//! there is a run for it (one learner is chosen; workers are assigned once that learner
//! serves), and it then registers for that run like any other service.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use chorus_proto::v1::{
    HeartbeatResponse, RunAssignment, RunStatus as ProtoRunStatus, RunStatusChanged, run_event,
};
use tokio::sync::Notify;

use crate::directory::{Directory, Leases};
use crate::ledger::LaunchEval;

/// Why the fleet refuses a request about the run it serves or its standby services.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FleetError {
    /// A standby service registered without an id.
    #[error("{0} is empty")]
    EmptyId(&'static str),
    /// The request names a run this process does not serve now.
    #[error("run `{asked}`: this orchestrator serves {}", match serving {
        Some(s) => format!("`{s}` now"),
        None => "no run now".to_string(),
    })]
    NotServing {
        /// The run the request named.
        asked: String,
        /// The run served now, if any.
        serving: Option<String>,
    },
}

/// A launched run waiting for its turn.
#[derive(Clone)]
pub struct Launched {
    /// Its id.
    pub run_id: String,
    /// Its human name.
    pub name: String,
    /// Its configuration, as TOML.
    pub config_toml: String,
    /// Its own evaluation settings, where the launch gave them.
    pub eval: LaunchEval,
    /// Its directory (it already holds the run's first event).
    pub directory: Arc<Directory>,
}

/// Finished runs whose event logs a long-lived orchestrator keeps for `WatchRun`; older ones are
/// in the ledger.
pub const FINISHED_RUNS_KEPT: usize = 256;

/// The kind of a standby service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// A rollout worker.
    Worker,
    /// A learner.
    Learner,
}

struct Current {
    directory: Arc<Directory>,
    config_toml: String,
    /// The standby learner chosen to serve it.
    learner: Option<String>,
    /// When a run picked up after a restart of this process began to be served again: for a
    /// lease from then, no standby learner is chosen but one whose learner still serves it.
    picked_up: Option<Instant>,
}

#[derive(Default)]
struct FleetState {
    /// Every run this process has served or queued, for `WatchRun` (the oldest finished ones
    /// are forgotten past [`FINISHED_RUNS_KEPT`]).
    runs: BTreeMap<String, Arc<Directory>>,
    /// Finished runs, oldest first.
    finished: VecDeque<String>,
    current: Option<Current>,
    /// Standby services, with when they were last heard from.
    standby: BTreeMap<(Kind, String), Instant>,
    /// `LaunchRun` request ids and the runs they created.
    launches: HashMap<String, String>,
    queue: VecDeque<Launched>,
}

/// The orchestrator process: the run served now, launched runs waiting, and standby services
/// (see the module docs).
pub struct Fleet {
    leases: Leases,
    /// The name launches are recorded under in the ledger; `None`: launches are refused.
    launcher: Option<String>,
    state: Mutex<FleetState>,
    launched: Notify,
}

impl Fleet {
    /// A fleet. With a `launcher` name, `LaunchRun` queues runs for [`Fleet::next_launched`]
    /// and records them in the ledger under that name (orchestrators sharing a ledger need
    /// different names); without, it is refused (the process serves the run of its config).
    pub fn new(leases: Leases, launcher: Option<String>) -> Arc<Self> {
        Arc::new(Self {
            leases,
            launcher,
            state: Mutex::new(FleetState::default()),
            launched: Notify::new(),
        })
    }

    /// Registration timing of its runs.
    pub fn leases(&self) -> Leases {
        self.leases
    }

    fn lock(&self) -> MutexGuard<'_, FleetState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves `directory`'s run from now on: its services' registrations and heartbeats go to
    /// it, and standby services are assigned to it (`config_toml` is what they are handed).
    pub fn serve_run(&self, directory: Arc<Directory>, config_toml: String) {
        self.serve(directory, config_toml, None);
    }

    /// Serves again the run an earlier process serving this fleet was running when it stopped
    /// (see [`Fleet::serve_run`]). Its standby services may still serve it: they say so in their
    /// heartbeats and are handed it back, and for a lease no other standby learner is chosen.
    pub fn pick_up_run(&self, directory: Arc<Directory>, config_toml: String) {
        self.serve(directory, config_toml, Some(Instant::now()));
    }

    fn serve(&self, directory: Arc<Directory>, config_toml: String, picked_up: Option<Instant>) {
        let mut st = self.lock();
        if let Some(c) = &st.current
            && c.directory.run_id() == directory.run_id()
        {
            // Served already (picked up before this process served anything).
            return;
        }
        st.runs
            .insert(directory.run_id().to_string(), directory.clone());
        st.current = Some(Current {
            directory,
            config_toml,
            learner: None,
            picked_up,
        });
    }

    /// Ends the current run: its lease checks stop, and standby services serving it are told
    /// there is no run for them (or the next one) at their next heartbeat.
    pub fn finish_run(&self) {
        let mut st = self.lock();
        if let Some(c) = st.current.take() {
            c.directory.close();
            st.finished.push_back(c.directory.run_id().to_string());
        }
        while st.finished.len() > FINISHED_RUNS_KEPT {
            if let Some(old) = st.finished.pop_front() {
                st.runs.remove(&old);
            }
        }
    }

    /// The current run's directory, when it is `run_id`.
    pub fn current(&self, run_id: &str) -> Option<Arc<Directory>> {
        self.lock()
            .current
            .as_ref()
            .filter(|c| c.directory.run_id() == run_id)
            .map(|c| c.directory.clone())
    }

    /// The id of the run served now; empty when none is.
    pub fn current_id(&self) -> String {
        self.lock()
            .current
            .as_ref()
            .map(|c| c.directory.run_id().to_string())
            .unwrap_or_default()
    }

    /// The directory of any run this process served or queued.
    pub fn directory(&self, run_id: &str) -> Option<Arc<Directory>> {
        self.lock().runs.get(run_id).cloned()
    }

    /// The run an earlier `LaunchRun` with `request_id` created in this process.
    pub fn launched(&self, request_id: &str) -> Option<String> {
        self.lock().launches.get(request_id).cloned()
    }

    /// Queues a new run (validated by the caller) for `request_id` and returns it; a repeat of
    /// a request this process has seen returns the run the first call created and `false`.
    pub fn launch(
        &self,
        request_id: &str,
        name: &str,
        config_toml: &str,
        eval: LaunchEval,
    ) -> (Launched, bool) {
        let mut st = self.lock();
        if let Some(run_id) = st.launches.get(request_id)
            && let Some(directory) = st.runs.get(run_id)
        {
            let launched = Launched {
                run_id: run_id.clone(),
                name: name.to_string(),
                config_toml: config_toml.to_string(),
                eval,
                directory: directory.clone(),
            };
            return (launched, false);
        }
        let run_id = crate::ledger::new_run_id(name);
        (
            self.enqueue(&mut st, request_id, &run_id, name, config_toml, eval),
            true,
        )
    }

    /// Queues again a run launched before this process started (found pending or running in
    /// the ledger).
    pub fn requeue(
        &self,
        request_id: &str,
        run_id: &str,
        name: &str,
        config_toml: &str,
        eval: LaunchEval,
    ) -> Launched {
        let mut st = self.lock();
        self.enqueue(&mut st, request_id, run_id, name, config_toml, eval)
    }

    fn enqueue(
        &self,
        st: &mut FleetState,
        request_id: &str,
        run_id: &str,
        name: &str,
        config_toml: &str,
        eval: LaunchEval,
    ) -> Launched {
        let run_id = run_id.to_string();
        let directory = Directory::new(run_id.clone(), self.leases);
        directory.emit(run_event::Kind::StatusChanged(RunStatusChanged {
            status: ProtoRunStatus::Pending as i32,
            reason: String::new(),
        }));
        let launched = Launched {
            run_id: run_id.clone(),
            name: name.to_string(),
            config_toml: config_toml.to_string(),
            eval,
            directory: directory.clone(),
        };
        st.runs.insert(run_id.clone(), directory);
        st.launches.insert(request_id.to_string(), run_id);
        st.queue.push_back(launched.clone());
        self.launched.notify_one();
        launched
    }

    /// The next launched run, in launch order; waits for one.
    pub async fn next_launched(&self) -> Launched {
        loop {
            let notified = self.launched.notified();
            if let Some(l) = self.lock().queue.pop_front() {
                return l;
            }
            notified.await;
        }
    }

    /// Standby services heard from within their lease.
    pub fn standby(&self) -> (usize, usize) {
        let st = self.lock();
        let live = |kind: Kind| {
            st.standby
                .iter()
                .filter(|((k, _), seen)| *k == kind && seen.elapsed() <= self.leases.lease)
                .count()
        };
        (live(Kind::Learner), live(Kind::Worker))
    }

    /// A standby service checks in (`register`: for the first time, or again; `serving`: the
    /// run the service it started serves, if any); returns the run it should serve now, if any.
    pub fn standby_heartbeat(
        &self,
        kind: Kind,
        id: &str,
        register: bool,
        serving: &str,
    ) -> Option<RunAssignment> {
        let mut st = self.lock();
        let key = (kind, id.to_string());
        if !register && !st.standby.contains_key(&key) {
            return None;
        }
        st.standby.insert(key, Instant::now());
        let lease = self.leases.lease;
        let learner_alive = |st: &FleetState, learner: &str| {
            st.standby
                .get(&(Kind::Learner, learner.to_string()))
                .is_some_and(|seen| seen.elapsed() <= lease)
        };
        let claimed = st.current.as_ref().and_then(|c| c.learner.clone());
        let current = st.current.as_ref()?;
        let learner_endpoint = current
            .directory
            .learner()
            .map(|l| l.endpoint)
            .unwrap_or_default();
        let serves_it = !serving.is_empty() && serving == current.directory.run_id();
        let picked_up_lately = current
            .picked_up
            .is_some_and(|at| at.elapsed() <= self.leases.lease);
        match kind {
            Kind::Learner => {
                // One learner serves the run: the one whose learner serves it already, else
                // the first standby learner to ask, unless the chosen one is still alive (or,
                // for a run picked up after a restart, its learner may yet say it serves it).
                let mine = match &claimed {
                    Some(c) if c == id => true,
                    _ if serves_it => true,
                    Some(c) if learner_alive(&st, c) || !learner_endpoint.is_empty() => false,
                    None if picked_up_lately => false,
                    _ => true,
                };
                if !mine {
                    return None;
                }
                let c = st.current.as_mut().expect("checked");
                c.learner = Some(id.to_string());
                Some(RunAssignment {
                    run_id: c.directory.run_id().to_string(),
                    config_toml: c.config_toml.clone(),
                    learner_endpoint,
                })
            }
            // Workers need the learner's address to fetch weights (one serving the run has it).
            Kind::Worker if learner_endpoint.is_empty() && !serves_it => None,
            Kind::Worker => Some(RunAssignment {
                run_id: current.directory.run_id().to_string(),
                config_toml: current.config_toml.clone(),
                learner_endpoint,
            }),
        }
    }

    /// Whether the standby service `id` has registered.
    pub fn standby_known(&self, kind: Kind, id: &str) -> bool {
        self.lock().standby.contains_key(&(kind, id.to_string()))
    }

    /// How often services are asked to send heartbeats, in milliseconds.
    pub fn heartbeat_interval_ms(&self) -> u64 {
        self.leases.heartbeat.as_millis() as u64
    }

    /// A standby service registers (again).
    pub fn register_standby(&self, kind: Kind, id: &str) -> Result<(), FleetError> {
        if id.is_empty() {
            return Err(FleetError::EmptyId(match kind {
                Kind::Worker => "worker_id",
                Kind::Learner => "learner_id",
            }));
        }
        self.standby_heartbeat(kind, id, true, "");
        Ok(())
    }

    /// The answer to a standby service's heartbeat (`serving`: the run the service it started
    /// serves, if any).
    pub fn standby_answer(&self, kind: Kind, id: &str, serving: &str) -> HeartbeatResponse {
        HeartbeatResponse {
            registered: self.standby_known(kind, id),
            assignment: self.standby_heartbeat(kind, id, false, serving),
            ..Default::default()
        }
    }

    /// The directory of `run_id` when it is the run served now; otherwise an error saying
    /// which run is.
    pub fn serving(&self, run_id: &str) -> Result<Arc<Directory>, FleetError> {
        self.current(run_id).ok_or_else(|| {
            let current = self.current_id();
            FleetError::NotServing {
                asked: run_id.to_string(),
                serving: (!current.is_empty()).then_some(current),
            }
        })
    }

    /// The name launches are recorded under in the ledger; `None` when launches are refused.
    pub fn launcher(&self) -> Option<&str> {
        self.launcher.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_proto::v1::RegisterLearnerRequest;

    #[tokio::test]
    async fn standby_services_are_handed_launched_runs_in_order() {
        let fleet = Fleet::new(Leases::default(), Some("test".into()));
        let (first, created) = fleet.launch("req-1", "a", "name = \"a\"", LaunchEval::default());
        assert!(created);
        let (again, created) = fleet.launch("req-1", "a", "name = \"a\"", LaunchEval::default());
        assert!(!created, "a retry returns the first run");
        assert_eq!(again.run_id, first.run_id);
        let (second, _) = fleet.launch("req-2", "b", "name = \"b\"", LaunchEval::default());
        assert_ne!(second.run_id, first.run_id);

        // Standby services get nothing while no run is served.
        assert!(
            fleet
                .standby_heartbeat(Kind::Learner, "L1", true, "")
                .is_none()
        );
        assert!(
            fleet
                .standby_heartbeat(Kind::Worker, "W", true, "")
                .is_none()
        );
        assert!(!fleet.standby_known(Kind::Worker, "stranger"));

        let run = fleet.next_launched().await;
        assert_eq!(run.run_id, first.run_id);
        fleet.serve_run(run.directory.clone(), run.config_toml.clone());
        // One learner is chosen; workers wait until it serves.
        let to_l1 = fleet
            .standby_heartbeat(Kind::Learner, "L1", false, "")
            .unwrap();
        assert_eq!(to_l1.run_id, first.run_id);
        assert!(to_l1.learner_endpoint.is_empty());
        assert!(
            fleet
                .standby_heartbeat(Kind::Learner, "L2", true, "")
                .is_none()
        );
        assert!(
            fleet
                .standby_heartbeat(Kind::Worker, "W", false, "")
                .is_none()
        );
        run.directory
            .register_learner(RegisterLearnerRequest {
                learner_id: "L1".into(),
                endpoint: "http://127.0.0.1:9".into(),
                run_id: first.run_id.clone(),
                policy_version: 0,
                devices: 1,
            })
            .unwrap();
        let to_w = fleet
            .standby_heartbeat(Kind::Worker, "W", false, "")
            .unwrap();
        assert_eq!(
            (to_w.run_id.as_str(), to_w.learner_endpoint.as_str()),
            (first.run_id.as_str(), "http://127.0.0.1:9")
        );
        assert_eq!(to_w.config_toml, "name = \"a\"");

        // The run ends: nothing for anyone until the next one is served.
        fleet.finish_run();
        assert!(
            fleet
                .standby_heartbeat(Kind::Learner, "L1", false, "")
                .is_none()
        );
        let run = fleet.next_launched().await;
        assert_eq!(run.run_id, second.run_id);
        fleet.serve_run(run.directory, run.config_toml);
        assert_eq!(
            fleet
                .standby_heartbeat(Kind::Learner, "L2", false, "")
                .unwrap()
                .run_id,
            second.run_id
        );
        assert_eq!(fleet.standby(), (2, 1));
        // Both runs keep their event logs for WatchRun; each began pending.
        let events = fleet.directory(&first.run_id).unwrap().events_after(0);
        assert!(
            matches!(&events[0].kind, Some(run_event::Kind::StatusChanged(c))
            if c.status == ProtoRunStatus::Pending as i32)
        );
        // Only the newest finished runs' logs are kept.
        fleet.finish_run();
        for i in 0..FINISHED_RUNS_KEPT {
            let (run, _) = fleet.launch(&format!("more-{i}"), "m", "", LaunchEval::default());
            assert_eq!(fleet.next_launched().await.run_id, run.run_id);
            fleet.serve_run(run.directory, String::new());
            fleet.finish_run();
        }
        let ids: std::collections::BTreeSet<String> = (0..FINISHED_RUNS_KEPT)
            .map(|i| fleet.launched(&format!("more-{i}")).unwrap())
            .collect();
        assert_eq!(ids.len(), FINISHED_RUNS_KEPT, "run ids are unique");
        assert!(fleet.directory(&first.run_id).is_none());
        assert!(fleet.directory(&second.run_id).is_none());
        assert!(
            fleet
                .directory(&fleet.launched("more-0").unwrap())
                .is_some()
        );
    }

    #[tokio::test]
    async fn a_picked_up_run_goes_back_to_the_standby_services_still_serving_it() {
        let fleet = Fleet::new(Leases::default(), Some("test".into()));
        let (run, _) = fleet.launch("req-1", "a", "name = \"a\"", LaunchEval::default());
        fleet.pick_up_run(run.directory.clone(), run.config_toml.clone());
        let id = run.run_id.as_str();
        // Another standby learner asks first: it is not chosen while the run's own learner may
        // still say it serves it.
        assert!(
            fleet
                .standby_heartbeat(Kind::Learner, "L2", true, "")
                .is_none()
        );
        let back = fleet
            .standby_heartbeat(Kind::Learner, "L1", true, id)
            .unwrap();
        assert_eq!(back.run_id, id);
        assert!(
            fleet
                .standby_heartbeat(Kind::Learner, "L2", false, "")
                .is_none()
        );
        // A worker still serving it keeps it before the learner has registered again; a new
        // one waits for the learner's address.
        assert_eq!(
            fleet
                .standby_heartbeat(Kind::Worker, "W1", true, id)
                .unwrap()
                .run_id,
            id
        );
        assert!(
            fleet
                .standby_heartbeat(Kind::Worker, "W2", true, "")
                .is_none()
        );
        // Serving it again once it is popped from the queue keeps the choice.
        let popped = fleet.next_launched().await;
        fleet.serve_run(popped.directory, popped.config_toml);
        assert!(
            fleet
                .standby_heartbeat(Kind::Learner, "L1", false, id)
                .is_some()
        );
        assert!(
            fleet
                .standby_heartbeat(Kind::Learner, "L2", false, "")
                .is_none()
        );
    }

    #[tokio::test]
    async fn a_picked_up_run_nobody_serves_gets_a_standby_learner_after_a_lease() {
        let leases = Leases {
            lease: std::time::Duration::ZERO,
            ..Leases::default()
        };
        let fleet = Fleet::new(leases, Some("test".into()));
        let (run, _) = fleet.launch("req-1", "a", "name = \"a\"", LaunchEval::default());
        fleet.pick_up_run(run.directory.clone(), run.config_toml.clone());
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert_eq!(
            fleet
                .standby_heartbeat(Kind::Learner, "L2", true, "")
                .unwrap()
                .run_id,
            run.run_id
        );
    }
}
