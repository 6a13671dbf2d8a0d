//! cgroup v1 `pids` and `memory` controllers, where this process may create child groups.
//!
//! rlimits cannot cap a root user's process count and cap memory per process only; a cgroup
//! caps the whole sandbox. Each run gets its own group under the first writable parent (this
//! process's own group, else the hierarchy's root), removed when the run ends.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const CGROUP_FS: &str = "/sys/fs/cgroup";

/// Where runs' groups are created, per controller.
#[derive(Debug, Clone, Default)]
pub(crate) struct CgroupRoots {
    pub pids: Option<PathBuf>,
    pub memory: Option<PathBuf>,
}

impl CgroupRoots {
    /// Finds a writable parent group for each controller (none where cgroups are read-only or
    /// the host uses cgroup v2 only).
    pub fn probe() -> Self {
        let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let parent_for = |controller: &str| -> Option<PathBuf> {
            let mount = Path::new(CGROUP_FS).join(controller);
            let own_path = own.lines().find_map(|line| {
                let mut parts = line.splitn(3, ':');
                let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
                controllers
                    .split(',')
                    .any(|c| c == controller)
                    .then(|| path.trim_start_matches('/').to_string())
            })?;
            [mount.join(own_path), mount.clone()]
                .into_iter()
                .find(|parent| can_create_child(parent, controller))
        };
        let roots = Self {
            pids: parent_for("pids"),
            memory: parent_for("memory"),
        };
        for parent in roots.pids.iter().chain(roots.memory.iter()) {
            remove_stale_groups(parent);
        }
        roots
    }
}

/// Removes the (empty) groups of runs whose process no longer exists (killed before it could
/// clean up).
fn remove_stale_groups(parent: &Path) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let owner = name
            .strip_prefix("chorus-sandbox-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        if let Some(pid) = owner
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            // Fails harmlessly while a process is still inside.
            let _ = fs::remove_dir(entry.path());
        }
    }
}

fn can_create_child(parent: &Path, controller: &str) -> bool {
    let limit_file = match controller {
        "pids" => "pids.max",
        _ => "memory.limit_in_bytes",
    };
    let probe = parent.join(format!("chorus-probe-{}", std::process::id()));
    let ok = fs::create_dir(&probe).is_ok()
        && probe.join(limit_file).exists()
        && OpenOptions::new()
            .write(true)
            .open(probe.join("tasks"))
            .is_ok();
    let _ = fs::remove_dir(&probe);
    ok
}

/// One run's groups.
#[derive(Debug)]
pub(crate) struct RunCgroup {
    pids: Option<PathBuf>,
    memory: Option<PathBuf>,
    /// `tasks` of each group, open for writing: the (single-threaded) child writes `0` to move
    /// itself. Moving one thread, the current one, skips the global threadgroup lock that
    /// moving a whole process through `cgroup.procs` takes, and with it an RCU grace period
    /// (milliseconds, tens of them on a loaded machine).
    procs: Vec<File>,
}

static NEXT_GROUP: AtomicU64 = AtomicU64::new(0);

impl RunCgroup {
    /// Creates the groups with these limits. Failing to create one leaves it out (the run still
    /// has its rlimits); [`RunCgroup::has_memory`] says whether memory is capped.
    pub fn create(roots: &CgroupRoots, max_processes: u64, memory_bytes: u64) -> Self {
        let name = format!(
            "chorus-sandbox-{}-{}",
            std::process::id(),
            NEXT_GROUP.fetch_add(1, Ordering::Relaxed)
        );
        let mut group = RunCgroup {
            pids: None,
            memory: None,
            procs: Vec::new(),
        };
        if let Some(parent) = &roots.pids {
            let dir = parent.join(&name);
            if fs::create_dir(&dir).is_ok() {
                if write_value(&dir.join("pids.max"), &max_processes.to_string()) {
                    group.pids = Some(dir);
                } else {
                    let _ = fs::remove_dir(&dir);
                }
            }
        }
        if let Some(parent) = &roots.memory {
            let dir = parent.join(&name);
            if fs::create_dir(&dir).is_ok() {
                if write_value(
                    &dir.join("memory.limit_in_bytes"),
                    &memory_bytes.to_string(),
                ) {
                    // With swap accounting, swap counts too (absent without it).
                    let _ = write_value(
                        &dir.join("memory.memsw.limit_in_bytes"),
                        &memory_bytes.to_string(),
                    );
                    group.memory = Some(dir);
                } else {
                    let _ = fs::remove_dir(&dir);
                }
            }
        }
        for dir in group.pids.iter().chain(group.memory.iter()) {
            if let Ok(file) = OpenOptions::new().write(true).open(dir.join("tasks")) {
                group.procs.push(file);
            }
        }
        group
    }

    /// Whether memory is capped by a group.
    pub fn has_memory(&self) -> bool {
        self.memory.is_some()
    }

    /// The `tasks` descriptors a child joins by writing `0` to each.
    pub fn procs_fds(&self) -> Vec<RawFd> {
        self.procs.iter().map(|f| f.as_raw_fd()).collect()
    }

    /// Whether the memory group ever hit its limit.
    pub fn memory_limit_hit(&self) -> bool {
        let Some(dir) = &self.memory else {
            return false;
        };
        let failcnt = fs::read_to_string(dir.join("memory.failcnt"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
        let oom_kills = fs::read_to_string(dir.join("memory.oom_control"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse::<u64>().ok())
            })
            .unwrap_or(0);
        failcnt > 0 || oom_kills > 0
    }

    /// The processes in the run's groups.
    fn members(&self) -> Vec<libc::pid_t> {
        let mut pids = Vec::new();
        for dir in self.pids.iter().chain(self.memory.iter()) {
            if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
                pids.extend(
                    text.lines()
                        .filter_map(|l| l.trim().parse::<libc::pid_t>().ok()),
                );
            }
        }
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Kills every process in the groups; returns how many were signalled.
    pub fn kill_all(&self) -> usize {
        let members = self.members();
        for &pid in &members {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        members.len()
    }

    /// Kills until the groups are empty (or `patience` passes); true when empty.
    pub fn drain(&self, patience: Duration) -> bool {
        let start = Instant::now();
        loop {
            if self.kill_all() == 0 {
                return true;
            }
            if start.elapsed() > patience {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for RunCgroup {
    fn drop(&mut self) {
        self.procs.clear();
        self.drain(Duration::from_secs(5));
        for dir in self.pids.iter().chain(self.memory.iter()) {
            for _ in 0..200 {
                if fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

fn write_value(path: &Path, value: &str) -> bool {
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .is_ok()
}
