//! One run: prepare, fork, supervise (stdin, output limit, wall time), classify.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::cgroup::RunCgroup;
use super::layout::{
    self, DEVICES, ETC_FILES, SYSTEM_DIRS, WORKDIR, WORKDIR_BYTES, c_string, locked_flags,
};
use super::spawn::{
    self, ChildIo, ExecSpec, MountOp, NsPlan, PROGRAM_ID, RECORD_SIZE, Record, Rlimit, STAGES,
    TAG_ERROR, TAG_EXIT, TAG_INIT_PID,
};
use super::{Backend, Limits, Outcome, Sandbox, SandboxError, SandboxRequest, Termination};

/// How long to keep reading after killing a run before giving up on its pipes.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// First host uid of the per-run uids (far above any real account).
const RUN_UID_BASE: u32 = 0x3000_0000;
const RUN_UID_SPAN: u32 = 0x0100_0000;

fn os_error(what: &str) -> SandboxError {
    SandboxError::Os {
        what: what.to_string(),
        source: std::io::Error::last_os_error(),
    }
}

/// A pipe, both ends close-on-exec: `(read, write)`.
fn pipe() -> Result<(OwnedFd, OwnedFd), SandboxError> {
    let mut fds = [0; 2];
    // SAFETY: fds has room for two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(os_error("creating a pipe"));
    }
    // SAFETY: both descriptors are fresh and owned here.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A host uid no other run of this process uses at the same time, so `RLIMIT_NPROC` counts
/// this run's processes only.
fn run_uid() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let salt = std::process::id().wrapping_mul(4_099);
    RUN_UID_BASE + (salt.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) % RUN_UID_SPAN)
}

fn rlimits(limits: &Limits, nproc: Option<u64>, memory_cgroup: bool) -> Vec<Rlimit> {
    let cpu = limits.cpu_time.as_secs_f64().ceil().max(1.0) as u64;
    // With a memory cgroup, the address-space limit is only a backstop (interpreters map
    // far more than they touch); without one it is the limit.
    let address_space = if memory_cgroup {
        limits
            .memory_bytes
            .saturating_mul(2)
            .saturating_add(256 << 20)
    } else {
        limits.memory_bytes
    };
    let mut list: Vec<Rlimit> = vec![
        (libc::RLIMIT_CPU as _, cpu, cpu + 1),
        (libc::RLIMIT_AS as _, address_space, address_space),
        (libc::RLIMIT_FSIZE as _, WORKDIR_BYTES, WORKDIR_BYTES),
        (libc::RLIMIT_CORE as _, 0, 0),
        (libc::RLIMIT_NOFILE as _, 256, 256),
    ];
    if let Some(n) = nproc {
        list.push((libc::RLIMIT_NPROC as _, n, n));
    }
    list
}

fn validate(req: &SandboxRequest) -> Result<(), SandboxError> {
    if req.argv.is_empty() {
        return Err(SandboxError::InvalidRequest("argv is empty".into()));
    }
    let l = &req.limits;
    if l.cpu_time.is_zero() || l.wall_time.is_zero() {
        return Err(SandboxError::InvalidRequest(
            "limits.cpu_time and limits.wall_time must be positive".into(),
        ));
    }
    if l.memory_bytes < 16 << 20 {
        return Err(SandboxError::InvalidRequest(format!(
            "limits.memory_bytes {} is below 16 MiB, too little for any interpreter",
            l.memory_bytes
        )));
    }
    if l.max_processes == 0 {
        return Err(SandboxError::InvalidRequest(
            "limits.max_processes must be at least 1".into(),
        ));
    }
    for (path, _) in &req.files {
        layout::check_file_path(path)?;
    }
    Ok(())
}

fn exec_spec(program: &str, args: &[String], env: &[String]) -> Result<ExecSpec, SandboxError> {
    let path = c_string(program.as_bytes(), "argv[0]")?;
    let mut argv = vec![path.clone()];
    for arg in args {
        argv.push(c_string(arg.as_bytes(), "an argument")?);
    }
    let envp = env
        .iter()
        .map(|e| c_string(e.as_bytes(), "an environment variable"))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ExecSpec::new(path, argv, envp))
}

/// The pipes of one run: the parent's ends and the child's.
struct Pipes {
    stdin_w: OwnedFd,
    stdout_r: OwnedFd,
    stderr_r: OwnedFd,
    report_r: OwnedFd,
    child: [OwnedFd; 4],
}

impl Pipes {
    fn new() -> Result<Self, SandboxError> {
        let (stdin_r, stdin_w) = pipe()?;
        let (stdout_r, stdout_w) = pipe()?;
        let (stderr_r, stderr_w) = pipe()?;
        let (report_r, report_w) = pipe()?;
        Ok(Self {
            stdin_w,
            stdout_r,
            stderr_r,
            report_r,
            child: [stdin_r, stdout_w, stderr_w, report_w],
        })
    }

    fn child_io(&self) -> ChildIo {
        ChildIo {
            stdin_r: self.child[0].as_raw_fd(),
            stdout_w: self.child[1].as_raw_fd(),
            stderr_w: self.child[2].as_raw_fd(),
            report_w: self.child[3].as_raw_fd(),
        }
    }
}

/// Runs `req` in `sandbox`.
pub(crate) fn run(sandbox: &Sandbox, req: &SandboxRequest) -> Result<Outcome, SandboxError> {
    validate(req)?;
    let program = layout::resolve_program(&req.argv[0], &sandbox.python)?;
    let env = layout::environment(&sandbox.python);
    let limits = &req.limits;
    let max_processes = u64::from(limits.max_processes);
    // Two extra for the backend's own processes (namespace init and its parent, or bwrap's two).
    let cgroup = RunCgroup::create(&sandbox.cgroups, max_processes + 2, limits.memory_bytes);
    let pipes = Pipes::new()?;
    let io = pipes.child_io();
    let cgroup_fds = cgroup.procs_fds();
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    let start = Instant::now();
    let child = match sandbox.backend {
        Backend::Namespaces => {
            let uid = run_uid();
            let plan = namespaces_plan(sandbox, req, uid)?;
            let exec = exec_spec(&program, &req.argv[1..], &env)?;
            let nproc = if sandbox.privileged {
                max_processes
            } else {
                // In-namespace root also counts the namespace's init.
                max_processes + 1
            };
            let rlimits = rlimits(limits, Some(nproc), cgroup.has_memory());
            let mut keep: Vec<RawFd> = pipes.child.iter().map(|fd| fd.as_raw_fd()).collect();
            keep.extend(&cgroup_fds);
            let keep = spawn::sorted_keep(&keep);
            // SAFETY: fork; the child only runs `namespaces_child`, which makes raw system
            // calls on data prepared above.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                // SAFETY: we are the freshly forked child.
                unsafe {
                    spawn::namespaces_child(parent, io, &keep, &cgroup_fds, &plan, &rlimits, &exec)
                }
            }
            pid
        }
        Backend::Bubblewrap => {
            let bwrap = sandbox
                .bwrap
                .as_ref()
                .ok_or_else(|| SandboxError::Unavailable("bwrap path missing".into()))?;
            let memfds = req
                .files
                .iter()
                .map(|(_, contents)| memfd(contents))
                .collect::<Result<Vec<_>, _>>()?;
            let run_as = sandbox.privileged.then(run_uid);
            let seccomp = sandbox
                .seccomp
                .as_ref()
                .map(|filter| memfd(&filter.to_bytes()))
                .transpose()?;
            let args = bwrap_args(sandbox, req, &program, &env, &memfds, seccomp.as_ref());
            let exec = exec_spec(
                &bwrap.display().to_string(),
                &args,
                &["PATH=/usr/bin:/bin".to_string()],
            )?;
            // As root with its own uid, RLIMIT_NPROC counts this run only; as an ordinary
            // user it would count all of the user's processes, so only a cgroup can cap it.
            let nproc = run_as.map(|_| max_processes + 2);
            let rlimits = rlimits(limits, nproc, cgroup.has_memory());
            let inherit: Vec<RawFd> = memfds
                .iter()
                .chain(seccomp.iter())
                .map(|fd| fd.as_raw_fd())
                .collect();
            let mut keep: Vec<RawFd> = pipes.child.iter().map(|fd| fd.as_raw_fd()).collect();
            keep.extend(&cgroup_fds);
            keep.extend(&inherit);
            keep.extend([0, 1, 2]);
            let keep = spawn::sorted_keep(&keep);
            // SAFETY: fork; the child only runs `bwrap_child`.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                // SAFETY: we are the freshly forked child.
                unsafe {
                    spawn::bwrap_child(
                        parent,
                        io,
                        &keep,
                        &inherit,
                        &cgroup_fds,
                        &rlimits,
                        run_as,
                        &exec,
                    )
                }
            }
            pid
        }
    };
    if child < 0 {
        return Err(os_error("fork"));
    }
    let Pipes {
        stdin_w,
        stdout_r,
        stderr_r,
        report_r,
        child: child_ends,
    } = pipes;
    drop(child_ends);
    let supervised = supervise(
        child,
        sandbox.backend,
        &cgroup,
        stdin_w,
        &req.stdin,
        stdout_r,
        stderr_r,
        report_r,
        limits,
        start,
    );
    let mut status = 0;
    // SAFETY: rusage is plain data written by wait4.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: waiting for our own child.
        let reaped = unsafe { libc::wait4(child, &mut status, 0, &mut usage) };
        if reaped == child
            || (reaped < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR))
        {
            break;
        }
    }
    let wall = start.elapsed();
    // Anything still in the groups (a backend that exited before its namespace finished
    // dying) is killed before returning: a run leaves no processes behind.
    cgroup.drain(KILL_GRACE);
    let memory_hit = cgroup.memory_limit_hit();
    drop(cgroup);
    if let Some(error) = supervised.records.iter().find(|r| r.tag == TAG_ERROR) {
        let stage = STAGES
            .get(error.stage as usize)
            .copied()
            .unwrap_or(STAGES[0]);
        return Err(SandboxError::Os {
            what: format!("{stage} ({} backend)", sandbox.backend),
            source: std::io::Error::from_raw_os_error(error.a as i32),
        });
    }
    let (wait_status, cpu_micros) = match sandbox.backend {
        Backend::Namespaces => supervised
            .records
            .iter()
            .find(|r| r.tag == TAG_EXIT)
            .map(|r| (Some(r.a as i32), r.b)),
        Backend::Bubblewrap => {
            let micros = |t: libc::timeval| t.tv_sec * 1_000_000 + t.tv_usec;
            Some((
                Some(status),
                micros(usage.ru_utime) + micros(usage.ru_stime),
            ))
        }
    }
    .unwrap_or((None, 0));
    let termination = classify(
        supervised.killed,
        wait_status,
        sandbox.backend,
        Duration::from_micros(cpu_micros.max(0) as u64),
        limits,
        memory_hit,
        &supervised.stderr,
    );
    Ok(Outcome {
        termination,
        stdout: supervised.stdout,
        stderr: supervised.stderr,
        wall,
        backend: sandbox.backend,
    })
}

/// Why the supervisor killed a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kill {
    Wall,
    Output,
}

fn classify(
    killed: Option<Kill>,
    wait_status: Option<i32>,
    backend: Backend,
    cpu: Duration,
    limits: &Limits,
    memory_hit: bool,
    stderr: &[u8],
) -> Termination {
    match killed {
        Some(Kill::Output) => return Termination::OutputLimit,
        Some(Kill::Wall) => return Termination::WallTimeLimit,
        None => {}
    }
    let Some(status) = wait_status else {
        // The namespace's init died without reporting: the OOM killer, or worse.
        return if memory_hit {
            Termination::MemoryLimit
        } else {
            Termination::Signaled(libc::SIGKILL)
        };
    };
    let signal = if libc::WIFSIGNALED(status) {
        Some(libc::WTERMSIG(status))
    } else {
        let code = libc::WEXITSTATUS(status);
        // bwrap exits with 128 + N when its child is killed by signal N.
        (backend == Backend::Bubblewrap && code > 128 && code < 128 + 65).then(|| code - 128)
    };
    let cpu_exhausted = cpu + Duration::from_millis(50) >= limits.cpu_time;
    match signal {
        Some(libc::SIGXCPU) => Termination::CpuTimeLimit,
        Some(libc::SIGKILL) if cpu_exhausted => Termination::CpuTimeLimit,
        Some(libc::SIGKILL) if memory_hit => Termination::MemoryLimit,
        Some(libc::SIGXFSZ) => Termination::OutputLimit,
        Some(signal) => Termination::Signaled(signal),
        None => {
            let code = libc::WEXITSTATUS(status);
            let memory_error = memory_hit || contains(stderr, b"MemoryError");
            if code != 0 && memory_error {
                Termination::MemoryLimit
            } else {
                Termination::Exited(code)
            }
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// What supervision collected.
struct Supervised {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    records: Vec<Record>,
    killed: Option<Kill>,
}

fn set_nonblocking(fd: RawFd) {
    // SAFETY: fcntl on an open descriptor.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
}

#[allow(clippy::too_many_arguments)]
fn supervise(
    child: libc::pid_t,
    backend: Backend,
    cgroup: &RunCgroup,
    stdin_w: OwnedFd,
    stdin: &[u8],
    stdout_r: OwnedFd,
    stderr_r: OwnedFd,
    report_r: OwnedFd,
    limits: &Limits,
    start: Instant,
) -> Supervised {
    let mut out = Supervised {
        stdout: Vec::new(),
        stderr: Vec::new(),
        records: Vec::new(),
        killed: None,
    };
    let mut stdin_w = if stdin.is_empty() {
        None
    } else {
        set_nonblocking(stdin_w.as_raw_fd());
        Some(stdin_w)
    };
    let mut written = 0usize;
    let mut stdout_r = Some(stdout_r);
    let mut stderr_r = Some(stderr_r);
    let mut report_r = Some(report_r);
    let mut report_buf: Vec<u8> = Vec::new();
    let mut killed_at: Option<Instant> = None;
    // The backend process's end is the run's end: anything it leaves behind holding the pipes
    // (orphaned when the backend died before its children learnt to die with it) is killed,
    // rather than read until the wall limit. Without pidfds (Linux < 5.3) the wall limit
    // still ends such a run.
    let mut child_exit = pidfd(child);
    let mut buf = vec![0u8; 64 * 1024];
    let kill = |records: &[Record]| {
        let init = records
            .iter()
            .find(|r| r.tag == TAG_INIT_PID)
            .map(|r| r.a as libc::pid_t);
        // SAFETY: kill has no memory-safety preconditions; the pids are our children (or the
        // namespace init, which cannot have been reaped while its parent, our child, lives).
        unsafe {
            match (backend, init) {
                (Backend::Namespaces, Some(init)) => {
                    libc::kill(init, libc::SIGKILL);
                }
                _ => {
                    libc::kill(child, libc::SIGKILL);
                }
            }
        }
        cgroup.kill_all();
    };
    while stdout_r.is_some() || stderr_r.is_some() || report_r.is_some() {
        let now = Instant::now();
        if killed_at.is_none() && now >= start + limits.wall_time {
            out.killed = Some(Kill::Wall);
            killed_at = Some(now);
            kill(&out.records);
        }
        if let Some(at) = killed_at
            && now >= at + KILL_GRACE
        {
            // Something still holds the pipes: kill the direct child too and stop reading.
            // SAFETY: our own child, not yet reaped.
            unsafe { libc::kill(child, libc::SIGKILL) };
            break;
        }
        let deadline = match killed_at {
            Some(at) => at + KILL_GRACE,
            None => start + limits.wall_time,
        };
        let timeout_ms = deadline
            .saturating_duration_since(now)
            .as_millis()
            .clamp(1, 1000) as i32;
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(5);
        let mut which: Vec<u8> = Vec::with_capacity(5);
        // 0-2: stdout, stderr, the report pipe; 3: stdin; 4: the backend's exit.
        let watched = [
            (&stdout_r, libc::POLLIN),
            (&stderr_r, libc::POLLIN),
            (&report_r, libc::POLLIN),
            (&stdin_w, libc::POLLOUT),
            (&child_exit, libc::POLLIN),
        ];
        for (index, (fd, events)) in watched.into_iter().enumerate() {
            if let Some(fd) = fd {
                fds.push(libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events,
                    revents: 0,
                });
                which.push(index as u8);
            }
        }
        // SAFETY: fds is a valid array of pollfd.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if ready <= 0 {
            continue;
        }
        for (pollfd, &index) in fds.iter().zip(&which) {
            if pollfd.revents == 0 {
                continue;
            }
            if index == 4 {
                child_exit = None;
                if killed_at.is_none() {
                    // Not `kill`: the namespace init's pid may already be reaped and reused.
                    // The cgroup names exactly this run's processes.
                    killed_at = Some(Instant::now());
                    cgroup.kill_all();
                }
                continue;
            }
            if index == 3 {
                let fd = pollfd.fd;
                // SAFETY: writing from a valid slice to an open descriptor.
                let n = unsafe {
                    libc::write(
                        fd,
                        stdin[written..].as_ptr().cast(),
                        (stdin.len() - written).min(64 * 1024),
                    )
                };
                if n > 0 {
                    written += n as usize;
                }
                if n < 0 || written >= stdin.len() || pollfd.revents & libc::POLLERR != 0 {
                    stdin_w = None;
                }
                continue;
            }
            // SAFETY: reading into a valid buffer from an open descriptor.
            let n = unsafe { libc::read(pollfd.fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                if n == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                    match index {
                        0 => stdout_r = None,
                        1 => stderr_r = None,
                        _ => report_r = None,
                    }
                }
                continue;
            }
            let chunk = &buf[..n as usize];
            match index {
                2 => {
                    report_buf.extend_from_slice(chunk);
                    while report_buf.len() >= RECORD_SIZE {
                        let record = Record::from_bytes(&report_buf[..RECORD_SIZE]);
                        report_buf.drain(..RECORD_SIZE);
                        out.records.push(record);
                    }
                }
                _ => {
                    let room = limits
                        .max_output_bytes
                        .saturating_sub(out.stdout.len() + out.stderr.len());
                    let target = if index == 0 {
                        &mut out.stdout
                    } else {
                        &mut out.stderr
                    };
                    target.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    if chunk.len() > room && out.killed.is_none() {
                        out.killed = Some(Kill::Output);
                        killed_at = Some(Instant::now());
                        kill(&out.records);
                    }
                }
            }
        }
    }
    out
}

/// A descriptor that becomes readable when `pid` (our child) exits; `None` where the kernel
/// has no `pidfd_open`.
fn pidfd(pid: libc::pid_t) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a fresh descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    // SAFETY: a non-negative result is a descriptor owned by nobody else.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// A sealed in-memory file holding `contents`, for `bwrap --file`.
fn memfd(contents: &[u8]) -> Result<OwnedFd, SandboxError> {
    // SAFETY: the name is NUL-terminated; the descriptor is owned below.
    let fd = unsafe { libc::memfd_create(c"chorus-sandbox-file".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(os_error("memfd_create"));
    }
    // SAFETY: fresh descriptor.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut file = std::fs::File::from(owned);
    use std::io::{Seek, Write};
    file.write_all(contents)
        .and_then(|()| file.seek(std::io::SeekFrom::Start(0)).map(|_| ()))
        .map_err(|source| SandboxError::Os {
            what: "writing a request file to a memfd".into(),
            source,
        })?;
    Ok(OwnedFd::from(file))
}

fn bwrap_args(
    sandbox: &Sandbox,
    req: &SandboxRequest,
    program: &str,
    env: &[String],
    memfds: &[OwnedFd],
    seccomp: Option<&OwnedFd>,
) -> Vec<String> {
    let mut args: Vec<String> = [
        "--unshare-all",
        "--unshare-user",
        "--die-with-parent",
        "--new-session",
        "--hostname",
        "sandbox",
        "--clearenv",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut push = |items: &[&str]| args.extend(items.iter().map(|s| s.to_string()));
    for dir in SYSTEM_DIRS {
        let path = Path::new(dir);
        match std::fs::read_link(path) {
            Ok(target) => push(&["--symlink", &target.display().to_string(), dir]),
            Err(_) if path.is_dir() => push(&["--ro-bind", dir, dir]),
            Err(_) => {}
        }
    }
    for file in ETC_FILES {
        push(&["--ro-bind-try", file, file]);
    }
    for root in &sandbox.python.roots {
        let root = root.display().to_string();
        push(&["--ro-bind", &root, &root]);
    }
    push(&["--dev", "/dev", "--remount-ro", "/dev", "--proc", "/proc"]);
    push(&["--size", &WORKDIR_BYTES.to_string(), "--tmpfs", WORKDIR]);
    if sandbox.privileged {
        let id = PROGRAM_ID.to_string();
        push(&["--uid", &id, "--gid", &id]);
    }
    for dir in layout::file_dirs(req.files.iter().map(|(p, _)| p.as_str())) {
        push(&["--dir", &format!("{WORKDIR}/{dir}")]);
    }
    for ((path, _), fd) in req.files.iter().zip(memfds) {
        push(&[
            "--perms",
            "0644",
            "--file",
            &fd.as_raw_fd().to_string(),
            &format!("{WORKDIR}/{path}"),
        ]);
    }
    for var in env {
        if let Some((key, value)) = var.split_once('=') {
            push(&["--setenv", key, value]);
        }
    }
    if let Some(fd) = seccomp {
        // bwrap installs it last, right before executing the program.
        push(&["--seccomp", &fd.as_raw_fd().to_string()]);
    }
    push(&[
        "--remount-ro",
        "/",
        "--chdir",
        WORKDIR,
        "--disable-userns",
        "--",
        program,
    ]);
    args.extend(req.argv[1..].iter().cloned());
    args
}

fn namespaces_plan<'a>(
    sandbox: &'a Sandbox,
    req: &'a SandboxRequest,
    run_uid: u32,
) -> Result<NsPlan<'a>, SandboxError> {
    let root = sandbox.root_mountpoint.as_os_str().as_bytes().to_vec();
    let inside = |path: &str| -> Result<CString, SandboxError> {
        let mut bytes = root.clone();
        bytes.extend_from_slice(path.as_bytes());
        c_string(&bytes, "a sandbox path")
    };
    let host = |path: &str| c_string(path.as_bytes(), "a host path");
    let mut ops = Vec::new();
    for dir in SYSTEM_DIRS {
        let path = Path::new(dir);
        match std::fs::read_link(path) {
            Ok(target) => ops.push(MountOp::Symlink {
                target: c_string(target.as_os_str().as_bytes(), "a symlink")?,
                path: inside(dir)?,
            }),
            Err(_) if path.is_dir() => {
                ops.push(MountOp::Dir(inside(dir)?));
                ops.push(MountOp::BindRo {
                    src: host(dir)?,
                    dst: inside(dir)?,
                    flags: locked_flags(path),
                });
            }
            Err(_) => {}
        }
    }
    ops.push(MountOp::Dir(inside("/etc")?));
    for file in ETC_FILES {
        if Path::new(file).is_file() {
            ops.push(MountOp::EmptyFile(inside(file)?));
            ops.push(MountOp::BindRo {
                src: host(file)?,
                dst: inside(file)?,
                flags: locked_flags(Path::new(file)),
            });
        }
    }
    for python_root in &sandbox.python.roots {
        let text = python_root.display().to_string();
        let mut partial = String::new();
        for component in text.split('/').filter(|c| !c.is_empty()) {
            partial.push('/');
            partial.push_str(component);
            ops.push(MountOp::Dir(inside(&partial)?));
        }
        ops.push(MountOp::BindRo {
            src: host(&text)?,
            dst: inside(&text)?,
            flags: locked_flags(python_root),
        });
    }
    ops.push(MountOp::Dir(inside("/dev")?));
    for device in DEVICES {
        let dev = format!("/dev/{device}");
        ops.push(MountOp::EmptyFile(inside(&dev)?));
        ops.push(MountOp::BindDev {
            src: host(&dev)?,
            dst: inside(&dev)?,
        });
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        ops.push(MountOp::Symlink {
            target: host(target)?,
            path: inside(&format!("/dev/{name}"))?,
        });
    }
    ops.push(MountOp::Dir(inside("/proc")?));
    ops.push(MountOp::Proc(inside("/proc")?));
    ops.push(MountOp::Dir(inside(WORKDIR)?));
    let owner = if sandbox.privileged {
        format!(",uid={PROGRAM_ID},gid={PROGRAM_ID}")
    } else {
        String::new()
    };
    ops.push(MountOp::Tmpfs {
        dst: inside(WORKDIR)?,
        data: host(&format!("mode=0755,size={WORKDIR_BYTES}{owner}"))?,
    });
    let file_dirs = layout::file_dirs(req.files.iter().map(|(p, _)| p.as_str()))
        .iter()
        .map(|dir| inside(&format!("{WORKDIR}/{dir}")))
        .collect::<Result<Vec<_>, _>>()?;
    let files = req
        .files
        .iter()
        .map(|(path, contents)| Ok((inside(&format!("{WORKDIR}/{path}"))?, contents.as_slice())))
        .collect::<Result<Vec<_>, SandboxError>>()?;
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let (uid_map, gid_map) = if sandbox.privileged {
        (
            format!("0 0 1\n{PROGRAM_ID} {run_uid} 1\n"),
            format!("0 0 1\n{PROGRAM_ID} {run_uid} 1\n"),
        )
    } else {
        (format!("0 {uid} 1\n"), format!("0 {gid} 1\n"))
    };
    Ok(NsPlan {
        root: c_string(&root, "the root mount point")?,
        root_data: host("mode=0755,size=1048576")?,
        ops,
        file_dirs,
        files,
        uid_map: uid_map.into_bytes(),
        gid_map: gid_map.into_bytes(),
        deny_setgroups: !sandbox.privileged,
        privileged: sandbox.privileged,
        hostname: host("sandbox")?,
        workdir: host(WORKDIR)?,
        oom_score_adj: host("1000")?,
        seccomp: sandbox.seccomp.as_ref().map(|filter| filter.instructions()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::cgroup::CgroupRoots;
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};

    /// A backend that exits while something it started still holds the output pipes: the run
    /// ends with the backend (its exit status, its output so far), not at the wall limit.
    #[test]
    fn the_run_ends_when_the_backend_exits_even_if_orphans_hold_its_pipes() {
        let (stdout_r, stdout_w) = pipe().unwrap();
        let (stderr_r, stderr_w) = pipe().unwrap();
        let (report_r, report_w) = pipe().unwrap();
        let (_stdin_r, stdin_w) = pipe().unwrap();
        drop(report_w);
        let mut backend = Command::new("sh")
            .args(["-c", "sleep 600 & echo started; exit 7"])
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout_w))
            .stderr(Stdio::from(stderr_w))
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = backend.id() as libc::pid_t;
        let limits = Limits {
            wall_time: Duration::from_secs(120),
            ..Limits::default()
        };
        let cgroup = RunCgroup::create(&CgroupRoots::None, 16, 1 << 30);
        let supervised = supervise(
            pid,
            Backend::Bubblewrap,
            &cgroup,
            stdin_w,
            &[],
            stdout_r,
            stderr_r,
            report_r,
            &limits,
            Instant::now(),
        );
        // Without a cgroup nothing kills the orphan: the test does, by its process group.
        // SAFETY: kill has no memory-safety preconditions; the group is the shell's own.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
        let status = backend.wait().unwrap();
        assert_eq!(status.code(), Some(7));
        assert!(supervised.killed.is_none(), "{:?}", supervised.killed);
        assert_eq!(supervised.stdout, b"started\n");
    }
}
