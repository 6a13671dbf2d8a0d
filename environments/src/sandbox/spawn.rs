//! Everything between `fork` and `exec`.
//!
//! The parent is multi-threaded, so a forked child may not allocate, lock or unwind: this file
//! prepares every path, argument and buffer before forking ([`ExecSpec`], [`NsPlan`]) and the
//! child code (`unsafe fn … -> !`) makes raw system calls only. Children tell the parent what
//! happened through a pipe of fixed-size [`Record`]s (atomic writes, below `PIPE_BUF`).

use std::ffi::{CString, c_char, c_int, c_ulong};
use std::os::fd::RawFd;

use libc::pid_t;

/// A setup step failed: `stage`, `a` = errno.
pub(crate) const TAG_ERROR: u32 = 1;
/// The namespace init process started: `a` = its pid (in the parent's PID namespace).
pub(crate) const TAG_INIT_PID: u32 = 2;
/// The program ended: `a` = wait status, `b` = CPU time in microseconds.
pub(crate) const TAG_EXIT: u32 = 3;

/// One message from a child to the parent.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Record {
    pub tag: u32,
    pub stage: u32,
    pub a: i64,
    pub b: i64,
}

pub(crate) const RECORD_SIZE: usize = std::mem::size_of::<Record>();

impl Record {
    pub fn from_bytes(bytes: &[u8]) -> Record {
        let mut record = Record::default();
        // SAFETY: Record is plain old data of exactly RECORD_SIZE bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                (&mut record as *mut Record).cast::<u8>(),
                RECORD_SIZE,
            );
        }
        record
    }
}

/// The setup steps a child reports failure of.
pub(crate) const STAGES: [&str; 25] = [
    "(unknown step)",
    "joining the cgroups",
    "setting rlimits",
    "opening the id maps",
    "unsharing namespaces",
    "writing the id maps",
    "forking the namespace init",
    "making mounts private",
    "mounting the new root",
    "creating a directory",
    "creating a symlink",
    "creating a mount point",
    "bind-mounting",
    "remounting read-only",
    "mounting /proc",
    "mounting /tmp",
    "writing a request file",
    "remounting the root read-only",
    "pivoting the root",
    "forking the program",
    "redirecting stdio",
    "dropping privileges",
    "changing directory",
    "executing the program",
    "installing the seccomp filter",
];
const JOIN_CGROUP: u32 = 1;
const RLIMIT: u32 = 2;
const UNSHARE: u32 = 4;
const WRITE_IDMAP: u32 = 5;
const FORK_INIT: u32 = 6;
const MAKE_PRIVATE: u32 = 7;
const MOUNT_ROOT: u32 = 8;
const MAKE_DIR: u32 = 9;
const MAKE_SYMLINK: u32 = 10;
const MAKE_FILE: u32 = 11;
const BIND: u32 = 12;
const REMOUNT: u32 = 13;
const MOUNT_PROC: u32 = 14;
const MOUNT_TMP: u32 = 15;
const WRITE_FILE: u32 = 16;
const REMOUNT_ROOT: u32 = 17;
const PIVOT: u32 = 18;
const FORK_PROGRAM: u32 = 19;
const DUP: u32 = 20;
const SET_IDS: u32 = 21;
const CHDIR: u32 = 22;
const EXEC: u32 = 23;
const SECCOMP: u32 = 24;

/// A program to execute: path, argv and environment as C strings with their pointer arrays.
#[derive(Debug)]
pub(crate) struct ExecSpec {
    path: CString,
    _argv: Vec<CString>,
    _envp: Vec<CString>,
    argv_ptrs: Vec<*const c_char>,
    envp_ptrs: Vec<*const c_char>,
}

impl ExecSpec {
    pub fn new(path: CString, argv: Vec<CString>, envp: Vec<CString>) -> Self {
        let pointers = |strings: &[CString]| -> Vec<*const c_char> {
            strings
                .iter()
                .map(|s| s.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect()
        };
        let argv_ptrs = pointers(&argv);
        let envp_ptrs = pointers(&envp);
        Self {
            path,
            _argv: argv,
            _envp: envp,
            argv_ptrs,
            envp_ptrs,
        }
    }
}

/// The child's ends of the pipes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChildIo {
    pub stdin_r: RawFd,
    pub stdout_w: RawFd,
    pub stderr_w: RawFd,
    pub report_w: RawFd,
}

/// One resource limit: `(resource, soft, hard)`.
pub(crate) type Rlimit = (c_int, u64, u64);

/// A mount-namespace step, paths already joined onto the new root.
#[derive(Debug)]
pub(crate) enum MountOp {
    Dir(CString),
    Symlink {
        target: CString,
        path: CString,
    },
    EmptyFile(CString),
    /// Read-only bind; `flags` are the extra remount flags the source's mount is locked with.
    BindRo {
        src: CString,
        dst: CString,
        flags: c_ulong,
    },
    /// Read-write bind of a device node.
    BindDev {
        src: CString,
        dst: CString,
    },
    Proc(CString),
    Tmpfs {
        dst: CString,
        data: CString,
    },
}

/// What the namespaces backend builds inside the new root.
#[derive(Debug)]
pub(crate) struct NsPlan<'a> {
    /// The host directory the new root's tmpfs is mounted on (inside the new mount namespace).
    pub root: CString,
    pub root_data: CString,
    pub ops: Vec<MountOp>,
    /// Directories to create for request files, parents first.
    pub file_dirs: Vec<CString>,
    /// Request files: full path (under the new root's tmp) and contents.
    pub files: Vec<(CString, &'a [u8])>,
    pub uid_map: Vec<u8>,
    pub gid_map: Vec<u8>,
    /// Unprivileged: `setgroups` must be denied before writing the gid map.
    pub deny_setgroups: bool,
    /// Root on the host: the program runs as in-namespace uid/gid [`PROGRAM_ID`], mapped to a
    /// per-run host id; otherwise it stays in-namespace root with every capability dropped.
    pub privileged: bool,
    pub hostname: CString,
    pub workdir: CString,
    pub oom_score_adj: CString,
    /// The system-call filter installed right before the program executes (none: no filter).
    pub seccomp: Option<&'a [libc::sock_filter]>,
}

/// The in-namespace uid and gid programs run as when the host side is root.
pub(crate) const PROGRAM_ID: u32 = 1000;

/// Fds every child keeps, sorted; all others are closed right after forking.
pub(crate) fn sorted_keep(fds: &[RawFd]) -> Vec<RawFd> {
    let mut keep = fds.to_vec();
    keep.sort_unstable();
    keep.dedup();
    keep
}

unsafe fn errno() -> i64 {
    // SAFETY: errno is thread-local and always readable.
    i64::from(unsafe { *libc::__errno_location() })
}

unsafe fn report(fd: RawFd, record: Record) {
    // SAFETY: writing a plain struct's bytes; a short write cannot happen below PIPE_BUF.
    unsafe {
        libc::write(
            fd,
            (&record as *const Record).cast::<libc::c_void>(),
            RECORD_SIZE,
        );
    }
}

unsafe fn fail(fd: RawFd, stage: u32) -> ! {
    // SAFETY: async-signal-safe calls only.
    unsafe {
        let error = errno();
        report(
            fd,
            Record {
                tag: TAG_ERROR,
                stage,
                a: error,
                b: 0,
            },
        );
        libc::_exit(126)
    }
}

/// Closes every descriptor not in `keep` (sorted).
unsafe fn close_all_except(keep: &[RawFd]) {
    let mut next: u32 = 0;
    for &fd in keep {
        let fd = fd as u32;
        if fd > next {
            // SAFETY: close_range only closes descriptors.
            unsafe { close_range_or_loop(next, fd - 1) };
        }
        next = fd + 1;
    }
    // SAFETY: as above.
    unsafe { close_range_or_loop(next, u32::MAX) };
}

unsafe fn close_range_or_loop(first: u32, last: u32) {
    // SAFETY: closing descriptors has no memory-safety preconditions.
    unsafe {
        if libc::syscall(libc::SYS_close_range, first, last, 0) == 0 {
            return;
        }
        let max = libc::sysconf(libc::_SC_OPEN_MAX).clamp(0, 65_536) as u32;
        for fd in first..=last.min(max) {
            libc::close(fd as c_int);
        }
    }
}

unsafe fn write_all(fd: RawFd, bytes: &[u8]) -> bool {
    let mut done = 0;
    while done < bytes.len() {
        // SAFETY: the slice is valid for its length.
        let n = unsafe {
            libc::write(
                fd,
                bytes[done..].as_ptr().cast::<libc::c_void>(),
                bytes.len() - done,
            )
        };
        if n < 0 {
            // SAFETY: reading errno.
            if unsafe { errno() } == i64::from(libc::EINTR) {
                continue;
            }
            return false;
        }
        done += n as usize;
    }
    true
}

unsafe fn join_cgroups(procs: &[RawFd], report_w: RawFd) {
    for &fd in procs {
        // SAFETY: fd is an open cgroup.procs file.
        if !unsafe { write_all(fd, b"0") } {
            // SAFETY: reporting and exiting.
            unsafe { fail(report_w, JOIN_CGROUP) };
        }
    }
}

unsafe fn set_rlimits(limits: &[Rlimit], report_w: RawFd) {
    for &(resource, soft, hard) in limits {
        let limit = libc::rlimit {
            rlim_cur: soft,
            rlim_max: hard,
        };
        // SAFETY: limit is a valid rlimit.
        if unsafe { libc::setrlimit(resource as _, &limit) } != 0 {
            // SAFETY: reporting and exiting.
            unsafe { fail(report_w, RLIMIT) };
        }
    }
}

unsafe fn die_with_parent(parent: pid_t) {
    // SAFETY: prctl/getppid/_exit are async-signal-safe.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as c_ulong, 0, 0, 0);
        if libc::getppid() != parent {
            libc::_exit(1);
        }
    }
}

/// The child of the bubblewrap backend: joins the cgroups, sets rlimits, becomes the run's own
/// unprivileged uid (when root) and executes `bwrap`.
///
/// # Safety
/// Call only in a freshly forked child; everything it reads was prepared before the fork.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn bwrap_child(
    parent: pid_t,
    io: ChildIo,
    keep: &[RawFd],
    inherit: &[RawFd],
    cgroup_procs: &[RawFd],
    rlimits: &[Rlimit],
    run_as: Option<u32>,
    exec: &ExecSpec,
) -> ! {
    // SAFETY: raw system calls on descriptors and buffers prepared by the parent.
    unsafe {
        die_with_parent(parent);
        close_all_except(keep);
        join_cgroups(cgroup_procs, io.report_w);
        if libc::dup2(io.stdin_r, 0) < 0
            || libc::dup2(io.stdout_w, 1) < 0
            || libc::dup2(io.stderr_w, 2) < 0
        {
            fail(io.report_w, DUP);
        }
        for &fd in inherit {
            libc::fcntl(fd, libc::F_SETFD, 0);
        }
        set_rlimits(rlimits, io.report_w);
        if let Some(id) = run_as
            && (libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(id, id, id) != 0
                || libc::setresuid(id, id, id) != 0)
        {
            fail(io.report_w, SET_IDS);
        }
        libc::execve(
            exec.path.as_ptr(),
            exec.argv_ptrs.as_ptr(),
            exec.envp_ptrs.as_ptr(),
        );
        fail(io.report_w, EXEC)
    }
}

/// The first child of the namespaces backend: joins the cgroups, unshares the namespaces,
/// writes the id maps, forks the namespace's init and waits for it.
///
/// # Safety
/// Call only in a freshly forked child; everything it reads was prepared before the fork.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn namespaces_child(
    parent: pid_t,
    io: ChildIo,
    keep: &[RawFd],
    cgroup_procs: &[RawFd],
    plan: &NsPlan<'_>,
    rlimits: &[Rlimit],
    exec: &ExecSpec,
) -> ! {
    // SAFETY: raw system calls on descriptors and buffers prepared by the parent.
    unsafe {
        die_with_parent(parent);
        close_all_except(keep);
        join_cgroups(cgroup_procs, io.report_w);
        // Root on the host: a helper left outside the new user namespace writes the maps
        // (mapping ids other than one's own needs CAP_SETUID over the parent namespace).
        // Otherwise the process maps its own ids itself.
        let mut go = [0 as c_int; 2];
        if plan.privileged && libc::pipe2(go.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            fail(io.report_w, WRITE_IDMAP);
        }
        let helper = if plan.privileged { libc::fork() } else { 0 };
        if plan.privileged && helper < 0 {
            fail(io.report_w, WRITE_IDMAP);
        }
        if plan.privileged && helper == 0 {
            libc::close(go[1]);
            let mut byte = 0u8;
            if libc::read(go[0], (&mut byte as *mut u8).cast(), 1) != 1 {
                libc::_exit(1);
            }
            write_maps(libc::getppid(), plan, io.report_w);
            libc::_exit(0);
        }
        let flags = libc::CLONE_NEWUSER
            | libc::CLONE_NEWNS
            | libc::CLONE_NEWPID
            | libc::CLONE_NEWNET
            | libc::CLONE_NEWIPC
            | libc::CLONE_NEWUTS;
        if libc::unshare(flags) != 0 {
            fail(io.report_w, UNSHARE);
        }
        if plan.privileged {
            libc::close(go[0]);
            libc::write(go[1], b"x".as_ptr().cast(), 1);
            libc::close(go[1]);
            let mut status = 0;
            while libc::waitpid(helper, &mut status, 0) < 0 && errno() == i64::from(libc::EINTR) {}
            if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
                // The helper reported why.
                libc::_exit(126);
            }
        } else {
            write_maps(0, plan, io.report_w);
        }
        let me = libc::getpid();
        let init = libc::fork();
        if init < 0 {
            fail(io.report_w, FORK_INIT);
        }
        if init == 0 {
            init_child(me, io, plan, rlimits, exec);
        }
        report(
            io.report_w,
            Record {
                tag: TAG_INIT_PID,
                stage: 0,
                a: i64::from(init),
                b: 0,
            },
        );
        libc::close(io.stdin_r);
        libc::close(io.stdout_w);
        libc::close(io.stderr_w);
        loop {
            let mut status = 0;
            let reaped = libc::waitpid(init, &mut status, 0);
            if reaped == init || (reaped < 0 && errno() != i64::from(libc::EINTR)) {
                break;
            }
        }
        libc::_exit(0)
    }
}

/// Writes `/proc/<pid>/{setgroups,uid_map,gid_map}` (`pid` 0: `self`).
unsafe fn write_maps(pid: pid_t, plan: &NsPlan<'_>, report_w: RawFd) {
    let mut path = [0u8; 64];
    for (file, contents) in [
        (&b"setgroups"[..], &b"deny"[..]),
        (b"uid_map", &plan.uid_map),
        (b"gid_map", &plan.gid_map),
    ] {
        if file == b"setgroups" && !plan.deny_setgroups {
            continue;
        }
        proc_path(&mut path, pid, file);
        // SAFETY: path is NUL-terminated; contents is a valid slice.
        unsafe {
            let fd = libc::open(path.as_ptr().cast(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 || !write_all(fd, contents) {
                fail(report_w, WRITE_IDMAP);
            }
            libc::close(fd);
        }
    }
}

/// `/proc/<pid>/<file>` (or `/proc/self/<file>`) into `out`, NUL-terminated, without
/// allocating.
fn proc_path(out: &mut [u8; 64], pid: pid_t, file: &[u8]) {
    let mut len = 0;
    let mut put = |bytes: &[u8]| {
        for &b in bytes {
            if len < out.len() - 1 {
                out[len] = b;
                len += 1;
            }
        }
    };
    put(b"/proc/");
    if pid <= 0 {
        put(b"self");
    } else {
        let mut digits = [0u8; 12];
        let mut n = pid as u32;
        let mut count = 0;
        while n > 0 || count == 0 {
            digits[count] = b'0' + (n % 10) as u8;
            n /= 10;
            count += 1;
        }
        digits[..count].reverse();
        put(&digits[..count]);
    }
    put(b"/");
    put(file);
    out[len] = 0;
}

/// PID 1 of the new PID namespace: builds the root, forks the program and reaps until the
/// program ends (its exit takes every other process in the namespace with it).
unsafe fn init_child(
    parent: pid_t,
    io: ChildIo,
    plan: &NsPlan<'_>,
    rlimits: &[Rlimit],
    exec: &ExecSpec,
) -> ! {
    // SAFETY: raw system calls on buffers prepared by the parent.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as c_ulong, 0, 0, 0);
        let _ = parent;
        build_root(plan, io.report_w);
        libc::sethostname(plan.hostname.as_ptr(), plan.hostname.as_bytes().len());
        let program = libc::fork();
        if program < 0 {
            fail(io.report_w, FORK_PROGRAM);
        }
        if program == 0 {
            program_child(io, plan, rlimits, exec);
        }
        libc::close(io.stdin_r);
        libc::close(io.stdout_w);
        libc::close(io.stderr_w);
        loop {
            let mut status = 0;
            let mut usage: libc::rusage = std::mem::zeroed();
            let reaped = libc::wait4(-1, &mut status, 0, &mut usage);
            if reaped == program {
                let micros = |t: libc::timeval| t.tv_sec * 1_000_000 + t.tv_usec;
                report(
                    io.report_w,
                    Record {
                        tag: TAG_EXIT,
                        stage: 0,
                        a: i64::from(status),
                        b: micros(usage.ru_utime) + micros(usage.ru_stime),
                    },
                );
                break;
            }
            if reaped < 0 && errno() != i64::from(libc::EINTR) {
                break;
            }
        }
        libc::_exit(0)
    }
}

unsafe fn build_root(plan: &NsPlan<'_>, report_w: RawFd) {
    let null = std::ptr::null::<c_char>();
    // SAFETY: every pointer is a NUL-terminated string prepared by the parent.
    unsafe {
        if libc::mount(
            null,
            c"/".as_ptr(),
            null,
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            fail(report_w, MAKE_PRIVATE);
        }
        if libc::mount(
            c"tmpfs".as_ptr(),
            plan.root.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            plan.root_data.as_ptr().cast(),
        ) != 0
        {
            fail(report_w, MOUNT_ROOT);
        }
        for op in &plan.ops {
            match op {
                MountOp::Dir(path) => {
                    if libc::mkdir(path.as_ptr(), 0o755) != 0 && errno() != i64::from(libc::EEXIST)
                    {
                        fail(report_w, MAKE_DIR);
                    }
                }
                MountOp::Symlink { target, path } => {
                    if libc::symlink(target.as_ptr(), path.as_ptr()) != 0 {
                        fail(report_w, MAKE_SYMLINK);
                    }
                }
                MountOp::EmptyFile(path) => {
                    let fd = libc::open(
                        path.as_ptr(),
                        libc::O_WRONLY | libc::O_CREAT | libc::O_CLOEXEC,
                        0o644,
                    );
                    if fd < 0 {
                        fail(report_w, MAKE_FILE);
                    }
                    libc::close(fd);
                }
                MountOp::BindRo { src, dst, flags } => {
                    if libc::mount(
                        src.as_ptr(),
                        dst.as_ptr(),
                        null,
                        libc::MS_BIND | libc::MS_REC,
                        std::ptr::null(),
                    ) != 0
                    {
                        fail(report_w, BIND);
                    }
                    let remount = libc::MS_REMOUNT
                        | libc::MS_BIND
                        | libc::MS_RDONLY
                        | libc::MS_NOSUID
                        | libc::MS_NODEV
                        | flags;
                    if libc::mount(null, dst.as_ptr(), null, remount, std::ptr::null()) != 0 {
                        fail(report_w, REMOUNT);
                    }
                }
                MountOp::BindDev { src, dst } => {
                    if libc::mount(
                        src.as_ptr(),
                        dst.as_ptr(),
                        null,
                        libc::MS_BIND,
                        std::ptr::null(),
                    ) != 0
                    {
                        fail(report_w, BIND);
                    }
                }
                MountOp::Proc(dst) => {
                    if libc::mount(
                        c"proc".as_ptr(),
                        dst.as_ptr(),
                        c"proc".as_ptr(),
                        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                        std::ptr::null(),
                    ) != 0
                    {
                        fail(report_w, MOUNT_PROC);
                    }
                }
                MountOp::Tmpfs { dst, data } => {
                    if libc::mount(
                        c"tmpfs".as_ptr(),
                        dst.as_ptr(),
                        c"tmpfs".as_ptr(),
                        libc::MS_NOSUID | libc::MS_NODEV,
                        data.as_ptr().cast(),
                    ) != 0
                    {
                        fail(report_w, MOUNT_TMP);
                    }
                }
            }
        }
        let owner = if plan.privileged { PROGRAM_ID } else { 0 };
        for dir in &plan.file_dirs {
            if libc::mkdir(dir.as_ptr(), 0o755) != 0 && errno() != i64::from(libc::EEXIST) {
                fail(report_w, WRITE_FILE);
            }
            libc::chown(dir.as_ptr(), owner, owner);
        }
        for (path, contents) in &plan.files {
            let fd = libc::open(
                path.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC,
                0o644,
            );
            if fd < 0 || !write_all(fd, contents) {
                fail(report_w, WRITE_FILE);
            }
            libc::fchown(fd, owner, owner);
            libc::close(fd);
        }
        let read_only = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID;
        if libc::mount(null, plan.root.as_ptr(), null, read_only, std::ptr::null()) != 0 {
            fail(report_w, REMOUNT_ROOT);
        }
        if libc::chdir(plan.root.as_ptr()) != 0
            || libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) != 0
            || libc::umount2(c".".as_ptr(), libc::MNT_DETACH) != 0
            || libc::chdir(c"/".as_ptr()) != 0
        {
            fail(report_w, PIVOT);
        }
    }
}

/// The program itself: a new session, the pipes as stdio, rlimits, no privileges, the seccomp
/// filter, exec.
unsafe fn program_child(io: ChildIo, plan: &NsPlan<'_>, rlimits: &[Rlimit], exec: &ExecSpec) -> ! {
    // SAFETY: raw system calls on descriptors and buffers prepared by the parent.
    unsafe {
        libc::setsid();
        if libc::dup2(io.stdin_r, 0) < 0
            || libc::dup2(io.stdout_w, 1) < 0
            || libc::dup2(io.stderr_w, 2) < 0
        {
            fail(io.report_w, DUP);
        }
        let keep = [0, 1, 2, io.report_w];
        close_all_except(&sorted_keep_array(keep));
        let adj = libc::open(c"/proc/self/oom_score_adj".as_ptr(), libc::O_WRONLY);
        if adj >= 0 {
            write_all(adj, plan.oom_score_adj.as_bytes());
            libc::close(adj);
        }
        set_rlimits(rlimits, io.report_w);
        if plan.privileged {
            let id = PROGRAM_ID;
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(id, id, id) != 0
                || libc::setresuid(id, id, id) != 0
            {
                fail(io.report_w, SET_IDS);
            }
        } else {
            // In-namespace root: make exec grant no capabilities and drop the bounding set.
            const SECBIT_NOROOT: c_ulong = 1 << 0;
            const SECBIT_NOROOT_LOCKED: c_ulong = 1 << 1;
            if libc::prctl(
                libc::PR_SET_SECUREBITS,
                SECBIT_NOROOT | SECBIT_NOROOT_LOCKED,
                0,
                0,
                0,
            ) != 0
            {
                fail(io.report_w, SET_IDS);
            }
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as c_ulong,
                0,
                0,
                0,
            );
            for cap in 0..64 {
                libc::prctl(libc::PR_CAPBSET_DROP, cap as c_ulong, 0, 0, 0);
            }
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            fail(io.report_w, SET_IDS);
        }
        if libc::chdir(plan.workdir.as_ptr()) != 0 {
            fail(io.report_w, CHDIR);
        }
        // Last, so that nothing above needs a call the filter denies.
        if let Some(filter) = plan.seccomp
            && !super::seccomp::install(filter)
        {
            fail(io.report_w, SECCOMP);
        }
        libc::execve(
            exec.path.as_ptr(),
            exec.argv_ptrs.as_ptr(),
            exec.envp_ptrs.as_ptr(),
        );
        fail(io.report_w, EXEC)
    }
}

/// Sorts four descriptors without allocating.
fn sorted_keep_array(mut fds: [RawFd; 4]) -> [RawFd; 4] {
    fds.sort_unstable();
    fds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_paths_are_built_without_allocating() {
        let mut out = [0u8; 64];
        proc_path(&mut out, 1234, b"uid_map");
        assert_eq!(&out[..18], b"/proc/1234/uid_map");
        assert_eq!(out[18], 0);
        proc_path(&mut out, 0, b"setgroups");
        assert_eq!(&out[..20], b"/proc/self/setgroups");
    }
}
