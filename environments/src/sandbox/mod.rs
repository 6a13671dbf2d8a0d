//! The sandbox model-written code runs in.
//!
//! Every program an environment did not write itself (a model's solution, a generated program
//! whose output is the answer) runs through [`Sandbox::run`]: no network, a private writable
//! temporary directory (the working directory, `/tmp` inside) and nothing else writable, no view
//! of the host's files beyond the interpreter and its libraries, and limits on CPU time, wall
//! time, memory, processes and output size ([`Limits`]).
//!
//! Two backends ([`Backend`]): bubblewrap (`bwrap`) where it is installed, and otherwise Linux
//! namespaces set up by this module itself. [`Sandbox::detect`] picks one; [`shared`] is the
//! process-wide sandbox, detected once. Every [`Outcome`] names the backend that ran it.
//!
//! [`SandboxError`] is for the sandbox failing to start, never for the program misbehaving: a
//! program that crashes, loops or floods its output ends with a [`Termination`] and
//! [`Outcome::success`] false.
//!
//! # How a run is contained
//!
//! - **Namespaces backend.** The parent forks a child that joins the run's cgroups, unshares
//!   user, mount, PID, network, IPC and UTS namespaces (as root, a helper left outside writes
//!   the id maps: in-namespace root is host root for the setup, the program's uid 1000 is a
//!   per-run host uid), and forks the namespace's PID 1. That process mounts a tmpfs root,
//!   bind-mounts `/usr`, the interpreter's prefix, `/etc/ld.so.cache` and `/dev/{null,zero,
//!   full,random,urandom}` read-only (devices read-write), mounts a fresh `/proc` and a
//!   size-limited tmpfs `/tmp` holding the request's files, remounts the root read-only,
//!   `pivot_root`s into it, and forks the program, which starts a session, sets its rlimits,
//!   drops to uid 1000 (no capabilities, `no_new_privs`), installs the seccomp filter and
//!   executes. When the program ends, PID 1 reports its wait status and CPU time and exits,
//!   which kills everything left in the namespace. The new network namespace has only a
//!   loopback interface, and it is down.
//! - **Bubblewrap backend.** The same rlimits and cgroups are set on a child that, as root,
//!   becomes a per-run unprivileged uid and executes `bwrap --unshare-all` with the same view
//!   of the host, `/` and `/dev` remounted read-only, `--die-with-parent`,
//!   `--disable-userns` and the same seccomp filter (`--seccomp FD`, which bwrap installs
//!   right before executing the program: a filter on bwrap itself would forbid the namespaces
//!   it creates); the request's files are passed as memfds (`--file`). bwrap reports a
//!   program killed by signal N as exit status 128 + N, which is read back as the signal.
//! - **seccomp** (`seccomp.rs`, x86_64 and aarch64). A system call of another architecture
//!   (the i386 ABI on x86_64) kills the process; x32 calls, `ptrace`,
//!   `process_vm_readv`/`writev`, `mount` and the new mount API, `umount2`, `pivot_root`,
//!   `chroot`, `bpf`, `perf_event_open`, the keyring calls, kernel modules, `kexec_*`,
//!   `reboot`, `swapon`/`swapoff`, `unshare`, `setns`, `clone` with any `CLONE_NEW*` flag,
//!   `userfaultfd`, file handles (`name_to_handle_at`, `open_by_handle_at`), `fanotify_init`,
//!   `lookup_dcookie`, `iopl`/`ioperm`, `acct`, `quotactl`, clock setting and `personality`
//!   other than the default fail with `EPERM`; `clone3` fails with `ENOSYS` (its flags are out
//!   of a filter's reach; the C library falls back to `clone`). Everything else is allowed:
//!   `fork`, `vfork`, threads, `subprocess` work.
//! - **Limits.** CPU time: `RLIMIT_CPU` per process (`SIGXCPU`, then `SIGKILL`). Wall time and
//!   output: the parent, which reads stdout and stderr as they come and kills the run. The
//!   run ends with the backend's process (watched through a pidfd): anything left holding the
//!   pipes, orphaned when the backend died before its children could die with it, is killed
//!   through the cgroup then, not read until the wall limit.
//!   Processes: `RLIMIT_NPROC` for the program's uid, which a per-run uid makes count this run
//!   only (root's own count is never capped, which is why the program never runs as host root),
//!   plus the cgroup `pids` controller when writable. Memory: the cgroup `memory` controller
//!   when writable (whole sandbox, swap included), and `RLIMIT_AS` per process (the limit
//!   itself without a cgroup, a backstop at twice it with one). Files: a 64 MiB `/tmp` and
//!   `RLIMIT_FSIZE`. Cgroups (`cgroup.rs`, root only): the unified v2 hierarchy when it offers
//!   `memory` or `pids` to this process's group (runs' groups under `chorus-sandbox` in it;
//!   `memory.max`, `memory.swap.max` 0, `pids.max`, `cgroup.kill`), else the v1 `memory` and
//!   `pids` hierarchies, else rlimits only; [`Sandbox::describe`] says which.
//! - **Termination.** `SIGXCPU`, or `SIGKILL` after the CPU limit was used, is
//!   [`Termination::CpuTimeLimit`]; a memory cgroup that hit its limit (v1 `memory.failcnt` or
//!   an OOM kill; v2 `oom`/`oom_kill` in `memory.events`), or a failed program whose stderr
//!   says `MemoryError` (the interpreter's report of `RLIMIT_AS`), is
//!   [`Termination::MemoryLimit`]; `SIGXFSZ` counts as [`Termination::OutputLimit`].
//! - **Not covered.** Under cgroup v2 this process moves itself into a leaf group
//!   (`chorus-supervisor`) only when it is alone in its group; sharing it with other processes
//!   (started from a login shell's session scope, say) means no v2 group (v1 if the host has
//!   it, else rlimits only), so run it as its own service (systemd `Delegate=yes`) or
//!   container. The v2 limits (`memory.max`, `memory.swap.max`, `pids.max`, `memory.events`)
//!   are tested against a fake cgroup filesystem only: the test machine's controllers are
//!   bound to v1, and its cgroup2 mount served real tests of membership, `cgroup.kill` and
//!   removal without limits; the v1 limits are tested for real. Where no filter is written
//!   (architectures other than x86_64 and aarch64) there is no seccomp. The system calls the
//!   filter allows (`io_uring` among them) remain reachable, as an unprivileged user in fresh
//!   namespaces. The namespaces backend run by a non-root user maps only that user's own id
//!   and is not tested here.

mod cgroup;
mod layout;
mod runner;
mod seccomp;
mod spawn;
pub mod spawner;

use std::fmt;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Resource limits for one run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// CPU time of each process (user + system).
    pub cpu_time: Duration,
    /// Wall time of the whole run, from start to the last byte of output.
    pub wall_time: Duration,
    /// Memory of the whole sandbox (address space of each process where cgroups are not
    /// writable).
    pub memory_bytes: u64,
    /// Processes (and threads) alive at once inside the sandbox.
    pub max_processes: u32,
    /// Bytes of stdout and stderr together; more ends the run.
    pub max_output_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            cpu_time: Duration::from_secs(5),
            wall_time: Duration::from_secs(10),
            memory_bytes: 512 << 20,
            max_processes: 32,
            max_output_bytes: 1 << 20,
        }
    }
}

/// One program to run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxRequest {
    /// The command line; `argv[0]` is a path inside the sandbox (e.g. [`Sandbox::python`]).
    pub argv: Vec<String>,
    /// Files written into the private temporary directory before the run, by relative path.
    pub files: Vec<(String, Vec<u8>)>,
    /// Bytes fed to the program's standard input (then closed).
    pub stdin: Vec<u8>,
    /// Resource limits.
    pub limits: Limits,
}

/// How the sandbox is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// bubblewrap (`bwrap`), plus this module's rlimits and cgroups.
    Bubblewrap,
    /// Linux namespaces (user, mount, PID, network, IPC, UTS), rlimits and cgroups, set up here.
    Namespaces,
}

impl Backend {
    /// The backend's name: `bubblewrap` or `namespaces`.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Bubblewrap => "bubblewrap",
            Backend::Namespaces => "namespaces",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The cgroup hierarchy a sandbox uses ([`Sandbox::cgroup_version`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CgroupVersion {
    /// The per-controller v1 hierarchies (`/sys/fs/cgroup/{memory,pids}`).
    V1,
    /// The unified v2 hierarchy.
    V2,
}

impl CgroupVersion {
    /// `cgroup v1` or `cgroup v2`.
    pub fn as_str(self) -> &'static str {
        match self {
            CgroupVersion::V1 => "cgroup v1",
            CgroupVersion::V2 => "cgroup v2",
        }
    }
}

impl fmt::Display for CgroupVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Termination {
    /// The program exited with this status.
    Exited(i32),
    /// The program was killed by this signal (not one of the limits below).
    Signaled(i32),
    /// It used more CPU time than [`Limits::cpu_time`].
    CpuTimeLimit,
    /// It ran longer than [`Limits::wall_time`].
    WallTimeLimit,
    /// It used more memory than [`Limits::memory_bytes`].
    MemoryLimit,
    /// It wrote more than [`Limits::max_output_bytes`].
    OutputLimit,
}

/// What a run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// How it ended.
    pub termination: Termination,
    /// Its standard output (at most [`Limits::max_output_bytes`]).
    pub stdout: Vec<u8>,
    /// Its standard error (stdout and stderr share the output limit).
    pub stderr: Vec<u8>,
    /// Wall time from start to end.
    pub wall: Duration,
    /// The backend that ran it.
    pub backend: Backend,
}

impl Outcome {
    /// Whether the program exited with status 0 within every limit.
    pub fn success(&self) -> bool {
        self.termination == Termination::Exited(0)
    }

    /// A one-line explanation for a score's reason: how it ended, and the last line of stderr
    /// when it failed.
    pub fn reason(&self) -> String {
        let how = match self.termination {
            Termination::Exited(0) => "exited normally".to_string(),
            Termination::Exited(code) => format!("exited with status {code}"),
            Termination::Signaled(signal) => format!("killed by signal {signal}"),
            Termination::CpuTimeLimit => "exceeded the CPU time limit".to_string(),
            Termination::WallTimeLimit => "exceeded the wall time limit".to_string(),
            Termination::MemoryLimit => "exceeded the memory limit".to_string(),
            Termination::OutputLimit => "exceeded the output limit".to_string(),
        };
        let last = String::from_utf8_lossy(&self.stderr)
            .lines()
            .rev()
            .map(str::trim)
            .find(|line| !line.is_empty())
            .map(|line| line.chars().take(200).collect::<String>());
        match last {
            Some(line) if !self.success() => format!("{how}: {line}"),
            _ => how,
        }
    }
}

/// The sandbox could not be set up or started (never the program's fault).
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// No backend works on this machine.
    #[error("no sandbox backend works here: {0}")]
    Unavailable(String),
    /// The requested backend is missing or does not work.
    #[error("the {backend} sandbox backend is unavailable: {reason}")]
    BackendUnavailable {
        /// The backend asked for.
        backend: Backend,
        /// Why it cannot be used.
        reason: String,
    },
    /// No Python interpreter was found on `PATH` (nor at `/usr/bin/python3`).
    #[error("no python3 interpreter found: {0}")]
    NoPython(String),
    /// The request itself is malformed (an empty argv, a file path leaving the directory…).
    #[error("invalid sandbox request: {0}")]
    InvalidRequest(String),
    /// A system call needed to start or supervise the sandbox failed.
    #[error("sandbox {what} failed: {source}")]
    Os {
        /// What was being done.
        what: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
}

/// A sandbox ready to run programs. [`Sandbox::run`] takes `&self` and may be called from many
/// threads at once.
#[derive(Debug)]
pub struct Sandbox {
    backend: Backend,
    python: layout::Python,
    /// The `bwrap` executable (bubblewrap backend only).
    bwrap: Option<PathBuf>,
    cgroups: cgroup::CgroupRoots,
    /// The host directory the namespaces backend mounts its new root on (in its own mount
    /// namespace; the host never sees the mount).
    root_mountpoint: PathBuf,
    /// Whether this process is root (per-run host uids, cgroups).
    privileged: bool,
    /// The system-call filter every program runs under (none on architectures without one).
    seccomp: Option<seccomp::Filter>,
    /// The process runs start from, when not this one ([`spawner`]).
    spawner: Option<spawner::Spawner>,
}

impl Sandbox {
    /// The best backend here: bubblewrap if installed and working, else namespaces. Each
    /// candidate must run `python3 -c 'print(6*7)'` correctly before it is chosen.
    pub fn detect() -> Result<Sandbox, SandboxError> {
        let mut reasons = Vec::new();
        for backend in [Backend::Bubblewrap, Backend::Namespaces] {
            match Self::with_backend(backend) {
                Ok(sandbox) => return Ok(sandbox),
                Err(err) => reasons.push(err.to_string()),
            }
        }
        Err(SandboxError::Unavailable(reasons.join("; ")))
    }

    /// A sandbox on `backend`; fails if that backend does not work here (it is tried once).
    pub fn with_backend(backend: Backend) -> Result<Sandbox, SandboxError> {
        let unavailable = |reason: String| SandboxError::BackendUnavailable { backend, reason };
        // SAFETY: geteuid has no preconditions.
        let privileged = unsafe { libc::geteuid() } == 0;
        let pythons = layout::Python::find_all()?;
        // As root, bwrap runs as a per-run unprivileged uid (as host uid 0 the program could
        // write root-owned sysctls even without capabilities), which must reach the
        // interpreter; the namespaces backend sets up mounts as root and needs no such thing.
        let python = if backend == Backend::Bubblewrap && privileged {
            pythons
                .iter()
                .find(|p| p.reachable_by_others())
                .cloned()
                .ok_or_else(|| {
                    unavailable(format!(
                        "no interpreter is reachable by an unprivileged uid (found {:?})",
                        pythons.iter().map(|p| &p.executable).collect::<Vec<_>>()
                    ))
                })?
        } else {
            pythons[0].clone()
        };
        let bwrap = match backend {
            Backend::Bubblewrap => Some(
                layout::find_in_path("bwrap")
                    .ok_or_else(|| unavailable("`bwrap` is not on PATH".into()))?,
            ),
            Backend::Namespaces => None,
        };
        let root_mountpoint = layout::root_mountpoint()?;
        let cgroups = if privileged {
            cgroup::CgroupRoots::probe()
        } else {
            cgroup::CgroupRoots::default()
        };
        let sandbox = Sandbox {
            backend,
            python,
            bwrap,
            cgroups,
            root_mountpoint,
            privileged,
            seccomp: seccomp::Filter::for_this_arch(),
            spawner: None,
        };
        sandbox.self_test().map_err(unavailable)?;
        Ok(sandbox)
    }

    /// Runs the interpreter once and checks what it printed.
    fn self_test(&self) -> Result<(), String> {
        let request = SandboxRequest {
            argv: vec![self.python().to_string(), "-c".into(), "print(6*7)".into()],
            limits: Limits::default(),
            ..SandboxRequest::default()
        };
        let outcome = self.run(&request).map_err(|err| err.to_string())?;
        if outcome.success() && outcome.stdout == b"42\n" {
            Ok(())
        } else {
            Err(format!(
                "the self-test program {} (stdout {:?}, stderr {:?})",
                outcome.reason(),
                String::from_utf8_lossy(&outcome.stdout),
                String::from_utf8_lossy(&outcome.stderr)
            ))
        }
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Whether a cgroup caps the process count (otherwise only `RLIMIT_NPROC` in a user
    /// namespace does) and memory (otherwise `RLIMIT_AS` per process), e.g. for logs.
    pub fn cgroups(&self) -> (bool, bool) {
        self.cgroups.controls()
    }

    /// The cgroup hierarchy runs' groups are created in: v2 where the host's unified hierarchy
    /// offers `memory` or `pids`, else v1, else none (rlimits only).
    pub fn cgroup_version(&self) -> Option<CgroupVersion> {
        self.cgroups.version()
    }

    /// Whether programs run under the seccomp filter (x86_64 and aarch64).
    pub fn seccomp(&self) -> bool {
        self.seccomp.is_some()
    }

    /// One line saying how runs are contained here, for logs: the backend, the cgroup
    /// hierarchy and controllers, and the seccomp filter.
    pub fn describe(&self) -> String {
        let (pids, memory) = self.cgroups();
        let cgroups = match self.cgroup_version() {
            Some(version) => {
                let controllers: Vec<&str> = [("pids", pids), ("memory", memory)]
                    .into_iter()
                    .filter_map(|(name, on)| on.then_some(name))
                    .collect();
                if controllers.is_empty() {
                    format!("{version} (no controllers)")
                } else {
                    format!("{version} ({})", controllers.join(", "))
                }
            }
            None => "no cgroups (rlimits only)".to_string(),
        };
        let seccomp = if self.seccomp() {
            "seccomp filter"
        } else {
            "no seccomp filter"
        };
        let from = match self.spawner_pid() {
            Some(pid) => format!(", started from spawner process {pid}"),
            None => String::new(),
        };
        format!("{} backend, {cgroups}, {seccomp}{from}", self.backend)
    }

    /// The same sandbox without the seccomp filter, for testing what the filter alone denies.
    pub fn without_seccomp(mut self) -> Sandbox {
        self.seccomp = None;
        self.spawner = None;
        self
    }

    /// The same sandbox without cgroups: processes are capped by `RLIMIT_NPROC` (per-run uid)
    /// and memory per process by `RLIMIT_AS` only. For hosts where cgroups are slow or shared,
    /// and for testing that the rlimits alone contain a program.
    pub fn without_cgroups(mut self) -> Sandbox {
        self.cgroups = cgroup::CgroupRoots::default();
        self.spawner = None;
        self
    }

    /// Runs one program to completion (or to a limit). Errors mean the sandbox could not start
    /// it (or the request is malformed); whatever the program does ends in an [`Outcome`].
    pub fn run(&self, req: &SandboxRequest) -> Result<Outcome, SandboxError> {
        if let Some(outcome) = self.spawner.as_ref().and_then(|s| s.run(req)) {
            return outcome;
        }
        runner::run(self, req)
    }

    /// The process id of the spawner this sandbox's runs start from, if any ([`spawner`]).
    pub fn spawner_pid(&self) -> Option<u32> {
        self.spawner.as_ref().map(spawner::Spawner::pid)
    }

    /// The path of a Python 3 interpreter usable inside the sandbox (found on `PATH`, else
    /// `/usr/bin/python3`; the real executable, not a shim). The bubblewrap backend run as root
    /// needs one an unprivileged user can reach, so the two backends may differ.
    pub fn python(&self) -> &str {
        &self.python.executable
    }
}

/// The process-wide sandbox, detected on first use. Where the binary called
/// [`spawner::serve_or_enable`], its runs start from a spawner process started here.
pub fn shared() -> Result<&'static Sandbox, SandboxError> {
    static SHARED: OnceLock<Result<Sandbox, String>> = OnceLock::new();
    let detect = || {
        let mut sandbox = Sandbox::detect().map_err(|err| err.to_string())?;
        if spawner::enabled() {
            match spawner::Spawner::start() {
                Ok(spawner) => sandbox.spawner = Some(spawner),
                Err(error) => tracing::warn!(
                    %error,
                    "no sandbox spawner process; runs start from this process"
                ),
            }
        }
        Ok(sandbox)
    };
    match SHARED.get_or_init(detect) {
        Ok(sandbox) => Ok(sandbox),
        Err(message) => Err(SandboxError::Unavailable(message.clone())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whole runs in a real cgroup v2 group, where this host has a writable cgroup2 mount (as
    /// root): the program shows in the run's group, a run killed at its wall time leaves the
    /// group empty, and the group is removed. Only membership and killing: the hierarchy's
    /// controllers may be bound to v1 (as on hybrid hosts), so no limit is tested here.
    #[test]
    fn runs_join_a_real_cgroup_v2_group_and_leave_nothing_behind() {
        let Some(v2) = cgroup::tests_support::real_v2_parent() else {
            println!("SKIPPED: no writable cgroup2 mount, or not root");
            return;
        };
        let (mount, parent) = (v2.mount.clone(), v2.parent.clone());
        for backend in [Backend::Namespaces, Backend::Bubblewrap] {
            let sandbox = match Sandbox::with_backend(backend) {
                Ok(sandbox) => sandbox,
                Err(err) => {
                    println!("SKIPPED {backend}: {err}");
                    continue;
                }
            };
            let sandbox = Sandbox {
                cgroups: cgroup::CgroupRoots::V2 {
                    parent: parent.clone(),
                    pids: false,
                    memory: false,
                },
                ..sandbox
            };
            assert_eq!(sandbox.cgroup_version(), Some(CgroupVersion::V2));
            let request = SandboxRequest {
                argv: vec![
                    sandbox.python().to_string(),
                    "-c".into(),
                    "print(open('/proc/self/cgroup').read())".into(),
                ],
                ..SandboxRequest::default()
            };
            let outcome = sandbox.run(&request).unwrap();
            assert!(outcome.success(), "{outcome:?}");
            let text = String::from_utf8_lossy(&outcome.stdout);
            let relative = parent.strip_prefix(&mount).unwrap().display().to_string();
            let line = text
                .lines()
                .find_map(|l| l.strip_prefix("0::"))
                .unwrap_or_else(|| panic!("no v2 line in {text:?}"));
            if backend == Backend::Namespaces {
                let group = line
                    .strip_prefix(&format!("/{relative}/"))
                    .unwrap_or_else(|| panic!("{line} is not under /{relative}"));
                assert!(group.starts_with("chorus-sandbox-"), "{line}");
            } else {
                // bwrap's own cgroup namespace: its root is the group bwrap started in.
                assert_eq!(line, "/", "{text}");
            }

            // The whole sandbox is in the run's group: killing the group from outside (as
            // soon as it has members) ends the run, forked children and all, long before the
            // wall time.
            let sleeper = SandboxRequest {
                argv: vec![
                    sandbox.python().to_string(),
                    "-c".into(),
                    "import os, time\nfor _ in range(3):\n    if os.fork() == 0:\n        break\ntime.sleep(600)\n".into(),
                ],
                limits: Limits {
                    wall_time: Duration::from_secs(120),
                    cpu_time: Duration::from_secs(60),
                    ..Limits::default()
                },
                ..SandboxRequest::default()
            };
            let done = std::sync::atomic::AtomicBool::new(false);
            let (outcome, killed) = std::thread::scope(|scope| {
                let watcher = scope.spawn(|| {
                    while !done.load(std::sync::atomic::Ordering::Relaxed) {
                        for entry in std::fs::read_dir(&parent).unwrap().flatten() {
                            let members =
                                std::fs::read_to_string(entry.path().join("cgroup.procs"))
                                    .unwrap_or_default();
                            // Four Python processes and the backend's own.
                            if members.lines().count() >= 5 {
                                std::fs::write(entry.path().join("cgroup.kill"), "1").unwrap();
                                return Some(members.lines().count());
                            }
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    None
                });
                let outcome = sandbox.run(&sleeper).unwrap();
                done.store(true, std::sync::atomic::Ordering::Relaxed);
                (outcome, watcher.join().unwrap())
            });
            assert!(
                killed.is_some(),
                "{backend}: the group never held the run: {outcome:?}"
            );
            assert_eq!(
                outcome.termination,
                Termination::Signaled(libc::SIGKILL),
                "{backend}: {outcome:?}"
            );
            let left: Vec<_> = std::fs::read_dir(&parent)
                .unwrap()
                .flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name())
                .collect();
            assert!(left.is_empty(), "{backend}: groups left behind: {left:?}");
        }
        drop(v2);
        assert!(!parent.exists());
    }
}
