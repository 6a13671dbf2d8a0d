//! cgroup `pids` and `memory` controllers, where this process may create child groups: the
//! unified (v2) hierarchy when it offers them, else the v1 hierarchies.
//!
//! rlimits cannot cap a root user's process count and cap memory per process only; a cgroup
//! caps the whole sandbox. Each run gets its own group, removed when the run ends.
//!
//! - **v2** (cgroup2 mounted at `/sys/fs/cgroup`, or at `/sys/fs/cgroup/unified` on hybrid
//!   hosts, with `memory` or `pids` in this process's group's `cgroup.controllers`). Runs' groups
//!   live under `chorus-sandbox` in this process's own group, whose `cgroup.subtree_control`
//!   gets `+memory +pids`. A group with processes cannot enable controllers for its children
//!   (the "no internal processes" rule; only the hierarchy's real root is exempt): if this
//!   process is alone in its group (a container's cgroup namespace root, say), it first moves
//!   itself into a leaf, `chorus-supervisor`, beside `chorus-sandbox`; otherwise v2 is not used.
//!   A run's group gets `memory.max`, `memory.swap.max` 0 and `pids.max`; `memory.events`
//!   (`oom`, `oom_kill`) tells a memory kill; `cgroup.kill` kills the whole group where the
//!   kernel has it (5.14+), else each process in `cgroup.procs` is signalled.
//! - **v1**: a group per controller under the first writable parent (this process's own group,
//!   else the hierarchy's root) with `memory.limit_in_bytes` (and `memory.memsw.limit_in_bytes`
//!   with swap accounting) and `pids.max`; `memory.failcnt` and `memory.oom_control` tell a
//!   memory kill.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::CgroupVersion;

const CGROUP_FS: &str = "/sys/fs/cgroup";
/// The v2 group (in this process's own group) that holds the runs' groups.
const V2_PARENT: &str = "chorus-sandbox";
/// The v2 leaf this process moves itself into when its own group must hold no processes.
const V2_SUPERVISOR: &str = "chorus-supervisor";
/// Run groups are named `chorus-sandbox-<pid>-<n>`.
const RUN_PREFIX: &str = "chorus-sandbox-";
/// Probe groups (created and removed at once) are named `chorus-probe-<pid>-<n>`.
const PROBE_PREFIX: &str = "chorus-probe-";

/// A probe group's name, unique within this process (sandboxes may be probed concurrently).
fn probe_name() -> String {
    format!(
        "{PROBE_PREFIX}{}-{}",
        std::process::id(),
        NEXT_GROUP.fetch_add(1, Ordering::Relaxed)
    )
}

/// Where runs' groups are created.
#[derive(Debug, Clone, Default)]
pub(crate) enum CgroupRoots {
    /// No writable cgroup controller: rlimits only.
    #[default]
    None,
    /// v1: the parent group for each controller.
    V1 {
        pids: Option<PathBuf>,
        memory: Option<PathBuf>,
    },
    /// v2: the parent group, with the controllers enabled for its children.
    V2 {
        parent: PathBuf,
        pids: bool,
        memory: bool,
    },
}

impl CgroupRoots {
    /// Probes the host's hierarchies: v2 when it offers `memory` or `pids` here, else v1,
    /// else none (read-only cgroups, or none mounted).
    pub fn probe() -> Self {
        let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        Self::probe_at(Path::new(CGROUP_FS), &own)
    }

    /// [`CgroupRoots::probe`] on the cgroup filesystem mounted at `fs_root`, for a process
    /// whose `/proc/self/cgroup` reads `own`.
    fn probe_at(fs_root: &Path, own: &str) -> Self {
        if let Some(v2) = probe_v2(fs_root, own) {
            return v2;
        }
        let v1 = probe_v1(fs_root, own);
        match v1 {
            CgroupRoots::V1 {
                pids: None,
                memory: None,
            } => CgroupRoots::None,
            other => other,
        }
    }

    /// Which hierarchy is used, if any.
    pub fn version(&self) -> Option<CgroupVersion> {
        match self {
            CgroupRoots::None => None,
            CgroupRoots::V1 { .. } => Some(CgroupVersion::V1),
            CgroupRoots::V2 { .. } => Some(CgroupVersion::V2),
        }
    }

    /// Whether a group caps `(processes, memory)`.
    pub fn controls(&self) -> (bool, bool) {
        match self {
            CgroupRoots::None => (false, false),
            CgroupRoots::V1 { pids, memory } => (pids.is_some(), memory.is_some()),
            CgroupRoots::V2 { pids, memory, .. } => (*pids, *memory),
        }
    }
}

fn probe_v1(fs_root: &Path, own: &str) -> CgroupRoots {
    let parent_for = |controller: &str| -> Option<PathBuf> {
        let mount = fs_root.join(controller);
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
            .find(|parent| can_create_child_v1(parent, controller))
    };
    let pids = parent_for("pids");
    let memory = parent_for("memory");
    for parent in pids.iter().chain(memory.iter()) {
        remove_stale_groups(parent);
    }
    CgroupRoots::V1 { pids, memory }
}

fn can_create_child_v1(parent: &Path, controller: &str) -> bool {
    let limit_file = match controller {
        "pids" => "pids.max",
        _ => "memory.limit_in_bytes",
    };
    let probe = parent.join(probe_name());
    let ok = make_group(&probe)
        && probe.join(limit_file).exists()
        && OpenOptions::new()
            .write(true)
            .open(probe.join("tasks"))
            .is_ok();
    remove_group(&probe);
    ok
}

/// The words of a cgroup v2 list file (`cgroup.controllers`, `cgroup.subtree_control`).
fn words(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .map(|w| w.trim_start_matches('+').to_string())
        .collect()
}

/// Enables `controllers` for `group`'s children; true when all are enabled afterwards.
fn enable(group: &Path, controllers: &[&str]) -> bool {
    let control = group.join("cgroup.subtree_control");
    let enabled = words(&control);
    let missing: Vec<String> = controllers
        .iter()
        .filter(|c| !enabled.iter().any(|e| e == *c))
        .map(|c| format!("+{c}"))
        .collect();
    if missing.is_empty() {
        return true;
    }
    write_value(&control, &missing.join(" "))
        && controllers
            .iter()
            .all(|c| words(&control).iter().any(|e| e == c))
}

fn probe_v2(fs_root: &Path, own: &str) -> Option<CgroupRoots> {
    let mount = [fs_root.to_path_buf(), fs_root.join("unified")]
        .into_iter()
        .find(|m| m.join("cgroup.controllers").is_file())?;
    let own_path = own
        .lines()
        .find_map(|line| line.strip_prefix("0::"))?
        .trim()
        .trim_start_matches('/');
    let mut own_group = mount.join(own_path);
    // Moved aside by an earlier probe: the group to use is the one above.
    if own_group
        .file_name()
        .is_some_and(|name| name == V2_SUPERVISOR)
    {
        own_group.pop();
    }
    let available = words(&own_group.join("cgroup.controllers"));
    let wanted: Vec<&str> = ["memory", "pids"]
        .into_iter()
        .filter(|c| available.iter().any(|a| a == c))
        .collect();
    if wanted.is_empty() {
        return None;
    }
    if !enable(&own_group, &wanted) {
        // The group holds processes. Only if they are all this process may it step aside.
        let me = std::process::id().to_string();
        let members = fs::read_to_string(own_group.join("cgroup.procs")).unwrap_or_default();
        let alone = members.split_whitespace().eq(std::iter::once(me.as_str()));
        let leaf = own_group.join(V2_SUPERVISOR);
        if !alone
            || !(make_group(&leaf) || leaf.is_dir())
            || !write_value(&leaf.join("cgroup.procs"), &me)
            || !enable(&own_group, &wanted)
        {
            return None;
        }
    }
    let parent = own_group.join(V2_PARENT);
    if !(make_group(&parent) || parent.is_dir()) || !enable(&parent, &wanted) {
        return None;
    }
    let probe = parent.join(probe_name());
    let memory = wanted.contains(&"memory");
    let pids = wanted.contains(&"pids");
    let ok = make_group(&probe)
        && (!memory || probe.join("memory.max").exists())
        && (!pids || probe.join("pids.max").exists())
        && OpenOptions::new()
            .write(true)
            .open(probe.join("cgroup.procs"))
            .is_ok();
    remove_group(&probe);
    if !ok {
        return None;
    }
    remove_stale_groups(&parent);
    Some(CgroupRoots::V2 {
        parent,
        pids,
        memory,
    })
}

/// Removes the (empty) groups of runs and probes whose process no longer exists (killed before
/// it could clean up).
fn remove_stale_groups(parent: &Path) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let owner = name
            .strip_prefix(RUN_PREFIX)
            .or_else(|| name.strip_prefix(PROBE_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        if let Some(pid) = owner
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            // Fails harmlessly while a process is still inside.
            remove_group(&entry.path());
        }
    }
}

/// One run's groups.
#[derive(Debug)]
pub(crate) struct RunCgroup {
    version: Option<CgroupVersion>,
    /// The groups: one per v1 controller, or the single v2 group.
    dirs: Vec<PathBuf>,
    /// The group whose memory is capped.
    memory: Option<PathBuf>,
    /// `tasks` (v1) or `cgroup.procs` (v2) of each group, open for writing: the
    /// (single-threaded) child writes `0` to move itself. In v1, moving one thread, the current
    /// one, skips the global threadgroup lock that moving a whole process through
    /// `cgroup.procs` takes, and with it an RCU grace period (milliseconds, tens of them on a
    /// loaded machine).
    procs: Vec<File>,
}

static NEXT_GROUP: AtomicU64 = AtomicU64::new(0);

impl RunCgroup {
    /// Creates the groups with these limits. Failing to create one leaves it out (the run still
    /// has its rlimits); [`RunCgroup::has_memory`] says whether memory is capped.
    pub fn create(roots: &CgroupRoots, max_processes: u64, memory_bytes: u64) -> Self {
        let name = format!(
            "{RUN_PREFIX}{}-{}",
            std::process::id(),
            NEXT_GROUP.fetch_add(1, Ordering::Relaxed)
        );
        let mut group = RunCgroup {
            version: roots.version(),
            dirs: Vec::new(),
            memory: None,
            procs: Vec::new(),
        };
        let procs_file = match roots {
            CgroupRoots::None => return group,
            CgroupRoots::V1 { pids, memory } => {
                if let Some(parent) = pids {
                    let dir = parent.join(&name);
                    if make_group(&dir) {
                        if write_value(&dir.join("pids.max"), &max_processes.to_string()) {
                            group.dirs.push(dir);
                        } else {
                            remove_group(&dir);
                        }
                    }
                }
                if let Some(parent) = memory {
                    let dir = parent.join(&name);
                    if make_group(&dir) {
                        if write_value(
                            &dir.join("memory.limit_in_bytes"),
                            &memory_bytes.to_string(),
                        ) {
                            // With swap accounting, swap counts too (absent without it).
                            let _ = write_value(
                                &dir.join("memory.memsw.limit_in_bytes"),
                                &memory_bytes.to_string(),
                            );
                            group.dirs.push(dir.clone());
                            group.memory = Some(dir);
                        } else {
                            remove_group(&dir);
                        }
                    }
                }
                "tasks"
            }
            CgroupRoots::V2 {
                parent,
                pids,
                memory,
            } => {
                let dir = parent.join(&name);
                if !make_group(&dir) {
                    return group;
                }
                let pids_ok =
                    !pids || write_value(&dir.join("pids.max"), &max_processes.to_string());
                let memory_ok =
                    !memory || write_value(&dir.join("memory.max"), &memory_bytes.to_string());
                if !(pids_ok && memory_ok) {
                    remove_group(&dir);
                    return group;
                }
                if *memory {
                    // No swapping instead of dying (absent without swap accounting).
                    let _ = write_value(&dir.join("memory.swap.max"), "0");
                    group.memory = Some(dir.clone());
                }
                group.dirs.push(dir);
                "cgroup.procs"
            }
        };
        for dir in &group.dirs {
            if let Ok(file) = OpenOptions::new().write(true).open(dir.join(procs_file)) {
                group.procs.push(file);
            }
        }
        group
    }

    /// Whether memory is capped by a group.
    pub fn has_memory(&self) -> bool {
        self.memory.is_some()
    }

    /// The descriptors a child joins by writing `0` to each.
    pub fn procs_fds(&self) -> Vec<RawFd> {
        self.procs.iter().map(|f| f.as_raw_fd()).collect()
    }

    /// Whether the memory group ever hit its limit.
    pub fn memory_limit_hit(&self) -> bool {
        let Some(dir) = &self.memory else {
            return false;
        };
        let counter = |file: &str, key: &str| -> u64 {
            fs::read_to_string(dir.join(file))
                .ok()
                .and_then(|text| parse_counter(&text, key))
                .unwrap_or(0)
        };
        match self.version {
            Some(CgroupVersion::V2) => {
                counter("memory.events", "oom") > 0 || counter("memory.events", "oom_kill") > 0
            }
            _ => {
                let failcnt = fs::read_to_string(dir.join("memory.failcnt"))
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .unwrap_or(0);
                failcnt > 0 || counter("memory.oom_control", "oom_kill") > 0
            }
        }
    }

    /// The processes in the run's groups.
    fn members(&self) -> Vec<libc::pid_t> {
        let mut pids = Vec::new();
        for dir in &self.dirs {
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

    /// Kills every process in the groups (through `cgroup.kill` where v2 has it); returns how
    /// many there were.
    pub fn kill_all(&self) -> usize {
        let members = self.members();
        if members.is_empty() {
            return 0;
        }
        if self.version == Some(CgroupVersion::V2) {
            let kill = self.dirs[0].join("cgroup.kill");
            if kill.exists() && write_value(&kill, "1") {
                return members.len();
            }
        }
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
        for dir in &self.dirs {
            for _ in 0..200 {
                if remove_group(dir) || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// The value of `key` in a flat-keyed cgroup file (`memory.events`: `oom 0\noom_kill 1\n`).
fn parse_counter(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.trim().split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

fn write_value(path: &Path, value: &str) -> bool {
    OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .is_ok()
}

/// Creates a group (the kernel fills it with its interface files).
fn make_group(dir: &Path) -> bool {
    if fs::create_dir(dir).is_err() {
        return false;
    }
    #[cfg(test)]
    fake::populate(dir);
    true
}

/// Removes an empty group (the kernel removes its interface files with it).
fn remove_group(dir: &Path) -> bool {
    #[cfg(test)]
    fake::depopulate(dir);
    fs::remove_dir(dir).is_ok()
}

/// For tests elsewhere in the sandbox module.
#[cfg(test)]
pub(crate) mod tests_support {
    use std::path::{Path, PathBuf};

    /// A fresh group in this process's own group of this host's cgroup2 mount, removed when
    /// dropped (a failed test included).
    pub struct RealV2 {
        pub mount: PathBuf,
        pub parent: PathBuf,
    }

    impl Drop for RealV2 {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.parent);
        }
    }

    /// A [`RealV2`] group, when there is a cgroup2 mount and this process (root) can write it.
    pub fn real_v2_parent() -> Option<RealV2> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        let mount = [
            PathBuf::from(super::CGROUP_FS),
            Path::new(super::CGROUP_FS).join("unified"),
        ]
        .into_iter()
        .find(|m| m.join("cgroup.controllers").is_file())?;
        let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let own_path = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))?
            .trim()
            .trim_start_matches('/')
            .to_string();
        let parent = mount.join(own_path).join(format!(
            "chorus-test-{}-{}",
            std::process::id(),
            super::NEXT_GROUP.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        super::make_group(&parent).then_some(RealV2 { mount, parent })
    }
}

/// A fake cgroup v2 filesystem in a temporary directory: what the kernel does on `mkdir` and
/// `rmdir` in a registered fake root is emulated here, and nothing else.
#[cfg(test)]
mod fake {
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    static ROOTS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

    pub fn register(root: &Path) {
        ROOTS.lock().unwrap().push(root.to_path_buf());
    }

    fn is_fake(dir: &Path) -> bool {
        ROOTS
            .lock()
            .unwrap()
            .iter()
            .any(|root| dir.starts_with(root))
    }

    /// The interface files a new v2 group has, with the kernel's initial contents.
    pub const FILES: [(&str, &str); 9] = [
        ("cgroup.procs", ""),
        ("cgroup.subtree_control", ""),
        ("cgroup.events", "populated 0\nfrozen 0\n"),
        ("cgroup.kill", ""),
        ("memory.max", "max\n"),
        ("memory.swap.max", "max\n"),
        (
            "memory.events",
            "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n",
        ),
        ("pids.max", "max\n"),
        ("cgroup.controllers", ""),
    ];

    pub fn populate(dir: &Path) {
        if !is_fake(dir) {
            return;
        }
        for (name, contents) in FILES {
            std::fs::write(dir.join(name), contents).unwrap();
        }
        // A child's controllers are those its parent enabled.
        if let Some(parent) = dir.parent() {
            let enabled = super::words(&parent.join("cgroup.subtree_control")).join(" ");
            std::fs::write(dir.join("cgroup.controllers"), enabled).unwrap();
        }
    }

    pub fn depopulate(dir: &Path) {
        if !is_fake(dir) || !dir.is_dir() {
            return;
        }
        for (name, _) in FILES {
            let _ = std::fs::remove_file(dir.join(name));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::{CommandExt, ExitStatusExt};

    /// A fake v2 root in a fresh temporary directory, as the kernel shows the root group.
    fn fake_v2_root(controllers: &str) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        fake::register(root.path());
        for (name, contents) in fake::FILES {
            fs::write(root.path().join(name), contents).unwrap();
        }
        fs::write(root.path().join("cgroup.controllers"), controllers).unwrap();
        root
    }

    fn read(path: &Path) -> String {
        fs::read_to_string(path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
    }

    #[test]
    fn counters_are_read_from_flat_keyed_files() {
        let events = "low 0\nhigh 0\nmax 12\noom 1\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(parse_counter(events, "oom"), Some(1));
        assert_eq!(parse_counter(events, "oom_kill"), Some(2));
        assert_eq!(parse_counter(events, "max"), Some(12));
        assert_eq!(parse_counter(events, "missing"), None);
        let oom_control = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(parse_counter(oom_control, "oom_kill"), Some(3));
    }

    #[test]
    fn v2_is_chosen_and_each_run_group_gets_its_limits_and_is_removed() {
        let root = fake_v2_root("cpuset cpu io memory hugetlb pids rdma misc");
        let parent = root.path().join(V2_PARENT);
        // Left by a process that no longer exists (no pid reaches 999999999).
        assert!(make_group(&parent));
        let stale = parent.join(format!("{RUN_PREFIX}999999999-0"));
        assert!(make_group(&stale));
        let roots = CgroupRoots::probe_at(root.path(), "0::/\n");
        assert!(!stale.exists(), "a dead process's group was left");
        let CgroupRoots::V2 {
            parent: found,
            pids: true,
            memory: true,
        } = &roots
        else {
            panic!("v2 with both controllers expected, got {roots:?}");
        };
        assert_eq!(found, &parent);
        assert_eq!(roots.version(), Some(CgroupVersion::V2));
        assert_eq!(roots.controls(), (true, true));
        // Both the root and the parent enable the controllers for their children.
        assert_eq!(
            read(&root.path().join("cgroup.subtree_control")),
            "+memory +pids"
        );
        assert_eq!(
            read(&parent.join("cgroup.subtree_control")),
            "+memory +pids"
        );
        // The probe group is gone.
        assert_eq!(
            fs::read_dir(&parent)
                .unwrap()
                .filter(|e| e.as_ref().unwrap().path().is_dir())
                .count(),
            0
        );

        let group = RunCgroup::create(&roots, 18, 256 << 20);
        assert!(group.has_memory());
        assert_eq!(group.dirs.len(), 1);
        let dir = group.dirs[0].clone();
        assert_eq!(dir.parent(), Some(parent.as_path()));
        assert!(
            dir.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(RUN_PREFIX)
        );
        assert_eq!(read(&dir.join("pids.max")), "18");
        assert_eq!(read(&dir.join("memory.max")), (256u64 << 20).to_string());
        assert_eq!(read(&dir.join("memory.swap.max")), "0");
        // Joining is through the group's cgroup.procs.
        assert_eq!(group.procs_fds().len(), 1);
        let fd = group.procs_fds()[0];
        let link = fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
        assert_eq!(link, dir.join("cgroup.procs"));

        assert!(!group.memory_limit_hit());
        fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 0\noom_kill 1\n",
        )
        .unwrap();
        assert!(group.memory_limit_hit());
        fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 0\n",
        )
        .unwrap();
        assert!(group.memory_limit_hit());
        // Hitting the limit and reclaiming is not a memory kill.
        fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 0\noom_kill 0\n",
        )
        .unwrap();
        assert!(!group.memory_limit_hit());

        // A member is killed through cgroup.kill.
        fs::write(dir.join("cgroup.procs"), "4242\n").unwrap();
        assert_eq!(group.kill_all(), 1);
        assert_eq!(read(&dir.join("cgroup.kill")), "1");
        fs::write(dir.join("cgroup.procs"), "").unwrap();

        drop(group);
        assert!(!dir.exists(), "the run's group was not removed");
        assert!(parent.is_dir(), "the parent stays for the next run");
    }

    #[test]
    fn v2_without_cgroup_kill_signals_each_member() {
        let root = fake_v2_root("memory pids");
        let roots = CgroupRoots::probe_at(root.path(), "0::/\n");
        let group = RunCgroup::create(&roots, 4, 64 << 20);
        let dir = group.dirs[0].clone();
        fs::remove_file(dir.join("cgroup.kill")).unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .unwrap();
        fs::write(dir.join("cgroup.procs"), format!("{}\n", child.id())).unwrap();
        assert_eq!(group.kill_all(), 1);
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
        fs::write(dir.join("cgroup.procs"), "").unwrap();
        drop(group);
        assert!(!dir.exists());
    }

    #[test]
    fn v2_only_with_memory_or_pids_and_only_the_available_ones() {
        // Only hugetlb, as on a hybrid host whose controllers are all bound to v1.
        let root = fake_v2_root("hugetlb");
        let roots = CgroupRoots::probe_at(root.path(), "0::/\n");
        assert!(!matches!(roots, CgroupRoots::V2 { .. }), "{roots:?}");
        assert!(!root.path().join(V2_PARENT).exists());

        let root = fake_v2_root("cpu pids");
        let roots = CgroupRoots::probe_at(root.path(), "0::/\n");
        assert_eq!(roots.controls(), (true, false), "{roots:?}");
        let group = RunCgroup::create(&roots, 9, 64 << 20);
        assert!(!group.has_memory());
        let dir = group.dirs[0].clone();
        assert_eq!(read(&dir.join("pids.max")), "9");
        assert_eq!(read(&dir.join("memory.max")), "max\n");
        drop(group);
        assert!(!dir.exists());
    }

    #[test]
    fn v2_on_a_hybrid_host_is_found_under_unified_in_the_own_group() {
        let fs_root = tempfile::tempdir().unwrap();
        let unified = fs_root.path().join("unified");
        fs::create_dir(&unified).unwrap();
        fake::register(&unified);
        for (name, contents) in fake::FILES {
            fs::write(unified.join(name), contents).unwrap();
        }
        fs::write(unified.join("cgroup.controllers"), "memory pids").unwrap();
        fs::write(unified.join("cgroup.subtree_control"), "memory pids").unwrap();
        let own = unified.join("service");
        assert!(make_group(&own));
        // This process is alone in its group: it moves itself into a leaf first.
        let me = std::process::id().to_string();
        fs::write(own.join("cgroup.procs"), format!("{me}\n")).unwrap();
        // The fake cannot refuse like the kernel (EBUSY): make the first write fail instead.
        fs::remove_file(own.join("cgroup.subtree_control")).unwrap();
        let roots = CgroupRoots::probe_at(
            fs_root.path(),
            "12:pids:/service\n4:memory:/service\n0::/service\n",
        );
        // The enable write failed (no such file in the fake), so the process stepped aside …
        assert_eq!(read(&own.join(V2_SUPERVISOR).join("cgroup.procs")), me);
        // … and enabling still failed, so v2 was not used.
        assert!(!matches!(roots, CgroupRoots::V2 { .. }), "{roots:?}");

        fs::write(own.join("cgroup.subtree_control"), "").unwrap();
        fs::write(own.join("cgroup.procs"), "").unwrap();
        let roots = CgroupRoots::probe_at(fs_root.path(), "0::/service\n");
        let CgroupRoots::V2 { parent, .. } = &roots else {
            panic!("{roots:?}");
        };
        assert_eq!(parent, &own.join(V2_PARENT));
        assert_eq!(read(&own.join("cgroup.subtree_control")), "+memory +pids");

        // Probed again from the leaf it moved into, it uses the same groups (no deeper leaf).
        let again =
            CgroupRoots::probe_at(fs_root.path(), &format!("0::/service/{V2_SUPERVISOR}\n"));
        let CgroupRoots::V2 { parent: same, .. } = &again else {
            panic!("{again:?}");
        };
        assert_eq!(same, parent);
        assert!(!own.join(V2_SUPERVISOR).join(V2_SUPERVISOR).exists());
    }

    #[test]
    fn v2_is_not_used_when_other_processes_share_the_group() {
        let fs_root = fake_v2_root("memory pids");
        let own = fs_root.path().join("pod");
        assert!(make_group(&own));
        fs::write(
            own.join("cgroup.procs"),
            format!("1\n{}\n", std::process::id()),
        )
        .unwrap();
        fs::remove_file(own.join("cgroup.subtree_control")).unwrap();
        let roots = CgroupRoots::probe_at(fs_root.path(), "0::/pod\n");
        assert!(!matches!(roots, CgroupRoots::V2 { .. }), "{roots:?}");
        assert!(
            !own.join(V2_SUPERVISOR).exists(),
            "moved although not alone"
        );
    }

    /// A real cgroup2 hierarchy, where one is mounted and writable (as root): a process joins
    /// a run's group through the descriptor, shows in it, and `cgroup.kill` kills it. Only
    /// membership, killing and removal are tested; limits need controllers this hierarchy may
    /// not have (on a hybrid host they are bound to v1).
    #[test]
    fn a_process_joins_and_is_killed_in_a_real_v2_group() {
        let Some(v2) = tests_support::real_v2_parent() else {
            println!("SKIPPED: no writable cgroup2 mount, or not root");
            return;
        };
        let (mount, parent) = (v2.mount.clone(), v2.parent.clone());
        let roots = CgroupRoots::V2 {
            parent: parent.clone(),
            pids: false,
            memory: false,
        };
        let group = RunCgroup::create(&roots, 4, 64 << 20);
        assert_eq!(
            group.dirs.len(),
            1,
            "no group created under {}",
            parent.display()
        );
        let dir = group.dirs[0].clone();
        let fd = group.procs_fds()[0];
        let mut command = std::process::Command::new("sleep");
        command.arg("600");
        // SAFETY: the closure makes one raw write, async-signal-safe.
        unsafe {
            command.pre_exec(move || {
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().expect("the child joins the group");
        let inside = read(Path::new(&format!("/proc/{}/cgroup", child.id())));
        let relative = dir.strip_prefix(&mount).unwrap().display().to_string();
        assert!(
            inside.lines().any(|l| l == format!("0::/{relative}")),
            "{inside}"
        );
        assert_eq!(group.members(), vec![child.id() as libc::pid_t]);
        assert!(
            dir.join("cgroup.kill").exists(),
            "kernel without cgroup.kill"
        );
        assert_eq!(group.kill_all(), 1);
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
        drop(group);
        assert!(!dir.exists(), "the group was not removed");
        drop(v2);
        assert!(!parent.exists());
    }
}
