//! The hostile corpus: programs a model might write to escape, snoop or take the host down.
//! Each must be contained, end as a failure with a reason, and leave the host as it was. Every
//! program prints `ESCAPED` and exits 0 only if its attack worked, and each case also checks
//! the host side (a listener that must see no connection, files that must not change, a
//! sentinel process that must survive, no process of the run left behind), so each assertion
//! fails if the containment it tests is missing.
//!
//! The namespaces backend is always tested; bubblewrap when `bwrap` is installed.

use std::io::ErrorKind;
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use chorus_environments::sandbox::{
    Backend, Limits, Outcome, Sandbox, SandboxRequest, Termination,
};

fn sandboxes() -> Vec<Sandbox> {
    let mut all = vec![Sandbox::with_backend(Backend::Namespaces).expect("namespaces backend")];
    match Sandbox::with_backend(Backend::Bubblewrap) {
        Ok(sandbox) => all.push(sandbox),
        Err(err) => println!("SKIPPED bubblewrap backend: {err}"),
    }
    all
}

/// The same backends with rlimits alone (no cgroups), for the resource cases.
fn sandboxes_without_cgroups() -> Vec<Sandbox> {
    sandboxes()
        .into_iter()
        .map(Sandbox::without_cgroups)
        .collect()
}

/// A marker unique to one run, passed as an argument so it shows in every process's command
/// line (forked children included).
fn marker(case: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "chorus-hostile-{case}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Pids of live (not zombie) processes whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(marker) {
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            let zombie = stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
            if !zombie {
                found.push(name);
            }
        }
    }
    found
}

fn run(sandbox: &Sandbox, case: &str, program: &str, limits: Limits) -> Outcome {
    let marker = marker(case);
    let request = SandboxRequest {
        argv: vec![
            sandbox.python().to_string(),
            "main.py".into(),
            marker.clone(),
        ],
        files: vec![("main.py".into(), program.as_bytes().to_vec())],
        stdin: Vec::new(),
        limits,
    };
    let outcome = sandbox.run(&request).expect("the sandbox starts");
    let stray = processes_with(&marker);
    assert!(
        stray.is_empty(),
        "{case} on {}: processes left behind: {stray:?}",
        sandbox.backend()
    );
    assert_eq!(outcome.backend, sandbox.backend());
    println!(
        "{case} on {}: {:?}, reason: {}",
        sandbox.backend(),
        outcome.termination,
        outcome.reason()
    );
    outcome
}

fn assert_contained_failure(case: &str, outcome: &Outcome) {
    let stdout = String::from_utf8_lossy(&outcome.stdout);
    assert!(
        !outcome.success() && !stdout.contains("ESCAPED"),
        "{case} on {} was not contained: {outcome:?}",
        outcome.backend
    );
    assert!(!outcome.reason().is_empty());
}

fn quick() -> Limits {
    Limits {
        cpu_time: Duration::from_secs(2),
        wall_time: Duration::from_secs(5),
        ..Limits::default()
    }
}

#[test]
fn an_ordinary_program_runs_with_stdin_files_and_a_writable_workdir() {
    for sandbox in sandboxes() {
        let request = SandboxRequest {
            argv: vec![sandbox.python().to_string(), "pkg/main.py".into()],
            files: vec![
                ("pkg/main.py".into(), b"import sys, os\nsys.path.insert(0, 'pkg')\nimport helper\nopen('out.txt', 'w').write('x')\nprint(helper.double(int(sys.stdin.read())), os.getcwd(), open('out.txt').read())\n".to_vec()),
                ("pkg/helper.py".into(), b"def double(n):\n    return 2 * n\n".to_vec()),
            ],
            stdin: b"21".to_vec(),
            limits: Limits::default(),
        };
        let outcome = sandbox.run(&request).unwrap();
        assert!(outcome.success(), "{outcome:?}");
        assert_eq!(String::from_utf8_lossy(&outcome.stdout), "42 /tmp x\n");
        assert_eq!(outcome.reason(), "exited normally");
        let failing = SandboxRequest {
            argv: vec![
                sandbox.python().to_string(),
                "-c".into(),
                "raise ValueError('boom')".into(),
            ],
            ..SandboxRequest::default()
        };
        let outcome = sandbox.run(&failing).unwrap();
        assert_eq!(outcome.termination, Termination::Exited(1));
        assert!(
            outcome.reason().contains("ValueError: boom"),
            "{}",
            outcome.reason()
        );
    }
}

#[test]
fn bad_requests_are_errors_naming_the_problem() {
    let sandbox = Sandbox::with_backend(Backend::Namespaces).unwrap();
    let bad_path = SandboxRequest {
        argv: vec![sandbox.python().to_string()],
        files: vec![("../escape.py".into(), Vec::new())],
        ..SandboxRequest::default()
    };
    let err = sandbox.run(&bad_path).unwrap_err().to_string();
    assert!(err.contains("../escape.py"), "{err}");
    let err = sandbox
        .run(&SandboxRequest::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("argv is empty"), "{err}");
    let missing = SandboxRequest {
        argv: vec!["no-such-program-anywhere".into()],
        ..SandboxRequest::default()
    };
    let err = sandbox.run(&missing).unwrap_err().to_string();
    assert!(err.contains("no-such-program-anywhere"), "{err}");
}

#[test]
fn no_network_not_even_loopback() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let program = format!(
        "import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('ESCAPED')\n"
    );
    for sandbox in sandboxes() {
        let outcome = run(&sandbox, "socket", &program, quick());
        assert_contained_failure("socket", &outcome);
        assert!(
            matches!(listener.accept(), Err(err) if err.kind() == ErrorKind::WouldBlock),
            "the host listener saw a connection from {}",
            sandbox.backend()
        );
    }
}

#[test]
fn host_files_are_invisible() {
    let secret_dir =
        std::env::temp_dir().join(format!("chorus-hostile-secret-{}", std::process::id()));
    std::fs::create_dir_all(&secret_dir).unwrap();
    let secret_file = secret_dir.join("secret.txt");
    std::fs::write(&secret_file, "the-host-secret-1234").unwrap();
    let cargo_toml = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    assert!(cargo_toml.exists());
    let targets = [
        "/etc/shadow".to_string(),
        "/etc/passwd".to_string(),
        cargo_toml.display().to_string(),
        secret_file.display().to_string(),
        "/root/.bash_history".to_string(),
    ];
    let shadow = std::fs::read_to_string("/etc/shadow").unwrap_or_default();
    let shadow_first = shadow.lines().next().unwrap_or("").to_string();
    for sandbox in sandboxes() {
        for target in &targets {
            let program = format!(
                "data = open({target:?}, 'rb').read()\nprint(data[:200])\nprint('ESCAPED')\n"
            );
            let outcome = run(&sandbox, "read", &program, quick());
            assert_contained_failure(&format!("read {target}"), &outcome);
            let everything = format!(
                "{}{}",
                String::from_utf8_lossy(&outcome.stdout),
                String::from_utf8_lossy(&outcome.stderr)
            );
            assert!(!everything.contains("the-host-secret-1234"));
            assert!(!everything.contains("chorus-environments"), "{everything}");
            assert!(shadow_first.is_empty() || !everything.contains(&shadow_first));
        }
        // The filesystem root shows only what the interpreter needs.
        let listing = run(
            &sandbox,
            "listing",
            "import os\nprocs = [p for p in os.listdir('/proc') if p.isdigit()]\nprint(len(procs), sorted(os.listdir('/')), sorted(os.listdir('/root')) if os.path.isdir('/root') else [])\n",
            quick(),
        );
        let text = String::from_utf8_lossy(&listing.stdout);
        assert!(listing.success(), "{listing:?}");
        // Only the sandbox's own processes are visible (the host has hundreds).
        let visible: usize = text.split_whitespace().next().unwrap().parse().unwrap();
        assert!(visible <= 3, "{text}");
        assert!(
            !text.contains("'home'") && !text.contains("'work'") && !text.contains("'.cargo'"),
            "{text}"
        );
    }
    std::fs::remove_dir_all(&secret_dir).unwrap();
}

#[test]
fn nothing_outside_the_workdir_is_writable() {
    let outside_dir =
        std::env::temp_dir().join(format!("chorus-hostile-outside-{}", std::process::id()));
    std::fs::create_dir_all(&outside_dir).unwrap();
    let outside_file = outside_dir.join("keep.txt");
    std::fs::write(&outside_file, "unchanged").unwrap();
    let repo_target = Path::new(env!("CARGO_MANIFEST_DIR")).join("pwned-by-sandbox.txt");
    let targets = [
        "/pwned".to_string(),
        "/etc/pwned".to_string(),
        "/usr/pwned".to_string(),
        "/root/pwned".to_string(),
        "/dev/pwned".to_string(),
        "/proc/sys/kernel/hostname".to_string(),
        outside_file.display().to_string(),
        outside_dir.join("new.txt").display().to_string(),
        repo_target.display().to_string(),
    ];
    for sandbox in sandboxes() {
        let program = format!(
            "import sys\nwritten = []\nfor path in {targets:?}:\n    try:\n        open(path, 'w').write('pwned')\n        written.append(path)\n    except OSError as err:\n        print(path, err, file=sys.stderr)\nif written:\n    print('ESCAPED', written)\n    sys.exit(0)\nsys.exit(3)\n"
        );
        let outcome = run(&sandbox, "write", &program, quick());
        assert_contained_failure("write outside", &outcome);
        assert_eq!(outcome.termination, Termination::Exited(3));
        assert_eq!(std::fs::read_to_string(&outside_file).unwrap(), "unchanged");
        assert!(!outside_dir.join("new.txt").exists());
        assert!(!repo_target.exists());
        assert!(!Path::new("/pwned").exists());
    }
    std::fs::remove_dir_all(&outside_dir).unwrap();
}

#[test]
fn a_fork_bomb_is_capped_and_cleaned_up() {
    let program = "import os, sys, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n            time.sleep(60)\n            os._exit(0)\n        n += 1\nexcept OSError:\n    print('forks', n, flush=True)\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n";
    let limits = Limits {
        max_processes: 16,
        cpu_time: Duration::from_secs(2),
        wall_time: Duration::from_secs(3),
        ..Limits::default()
    };
    for sandbox in sandboxes().into_iter().chain(sandboxes_without_cgroups()) {
        println!("{}", sandbox.describe());
        let outcome = run(&sandbox, "forkbomb", program, limits.clone());
        assert_contained_failure("fork bomb", &outcome);
        assert!(
            matches!(
                outcome.termination,
                Termination::WallTimeLimit | Termination::CpuTimeLimit
            ),
            "{outcome:?}"
        );
        let stdout = String::from_utf8_lossy(&outcome.stdout);
        let forks: u32 = stdout
            .trim()
            .strip_prefix("forks ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("the fork limit was never hit: {stdout:?}"));
        assert!(forks <= limits.max_processes, "{forks} forks");
    }
}

#[test]
fn an_infinite_loop_hits_the_cpu_limit() {
    let limits = Limits {
        cpu_time: Duration::from_secs(1),
        wall_time: Duration::from_secs(20),
        ..Limits::default()
    };
    for sandbox in sandboxes() {
        let outcome = run(&sandbox, "spin", "while True:\n    pass\n", limits.clone());
        assert_contained_failure("infinite loop", &outcome);
        assert_eq!(outcome.termination, Termination::CpuTimeLimit);
        assert!(
            outcome.reason().contains("CPU time"),
            "{}",
            outcome.reason()
        );
    }
}

#[test]
fn sleeping_forever_hits_the_wall_limit() {
    let limits = Limits {
        wall_time: Duration::from_secs(1),
        ..Limits::default()
    };
    for sandbox in sandboxes() {
        let outcome = run(
            &sandbox,
            "sleep",
            "import time\ntime.sleep(600)\nprint('ESCAPED')\n",
            limits.clone(),
        );
        assert_contained_failure("sleep", &outcome);
        assert_eq!(outcome.termination, Termination::WallTimeLimit);
        assert!(
            outcome.reason().contains("wall time"),
            "{}",
            outcome.reason()
        );
    }
}

#[test]
fn a_memory_bomb_hits_the_memory_limit() {
    let limits = Limits {
        memory_bytes: 128 << 20,
        ..quick()
    };
    let program = "x = []\nwhile True:\n    x.append(bytearray(16 << 20))\n";
    for sandbox in sandboxes().into_iter().chain(sandboxes_without_cgroups()) {
        println!("{}", sandbox.describe());
        let outcome = run(&sandbox, "membomb", program, limits.clone());
        assert_contained_failure("memory bomb", &outcome);
        assert_eq!(outcome.termination, Termination::MemoryLimit, "{outcome:?}");
        assert!(outcome.reason().contains("memory"), "{}", outcome.reason());
        // With a memory cgroup (v1 or v2), the group's OOM kill stops the bomb long before
        // the address-space backstop (twice the limit) makes the interpreter raise
        // MemoryError; without one, that MemoryError is the limit.
        let memory_error = String::from_utf8_lossy(&outcome.stderr).contains("MemoryError");
        assert_eq!(
            memory_error,
            !sandbox.cgroups().1,
            "{}: {outcome:?}",
            sandbox.describe()
        );
    }
}

#[test]
fn gigabytes_of_output_hit_the_output_limit() {
    let limits = Limits {
        max_output_bytes: 64 << 10,
        ..quick()
    };
    let stdout_bomb = "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(4096):\n    sys.stdout.write(chunk)\nprint('ESCAPED')\n";
    let stderr_bomb = "import sys\nchunk = 'y' * (1 << 20)\nfor _ in range(4096):\n    sys.stderr.write(chunk)\nprint('ESCAPED')\n";
    let file_bomb = "chunk = b'z' * (1 << 20)\nwith open('big', 'wb') as f:\n    for _ in range(4096):\n        f.write(chunk)\nprint('ESCAPED')\n";
    for sandbox in sandboxes() {
        for (case, program) in [("stdout", stdout_bomb), ("stderr", stderr_bomb)] {
            let outcome = run(&sandbox, case, program, limits.clone());
            assert_contained_failure(case, &outcome);
            assert_eq!(outcome.termination, Termination::OutputLimit);
            assert!(outcome.stdout.len() + outcome.stderr.len() <= limits.max_output_bytes);
        }
        // A 4 GiB file stops at the working directory's size limit.
        let outcome = run(&sandbox, "file", file_bomb, limits.clone());
        assert_contained_failure("file bomb", &outcome);
    }
}

#[test]
fn signalling_the_parent_or_everyone_reaches_nobody_outside() {
    let mut sentinel = Command::new("sleep").arg("120").spawn().unwrap();
    let sentinel_pid = sentinel.id();
    let program = format!(
        "import os, signal, sys, time\nppid = os.getppid()\nfor target in (ppid, -1, {sentinel_pid}, {test_pid}):\n    try:\n        os.kill(target, signal.SIGKILL)\n    except OSError as err:\n        print(target, err, file=sys.stderr)\ntime.sleep(0.2)\ntry:\n    os.kill(ppid, 0)\nexcept ProcessLookupError:\n    print('ESCAPED: parent gone')\n    sys.exit(0)\nsys.exit(3)\n",
        test_pid = std::process::id()
    );
    for sandbox in sandboxes() {
        let outcome = run(&sandbox, "signals", &program, quick());
        assert_contained_failure("signals", &outcome);
        assert!(
            sentinel.try_wait().unwrap().is_none(),
            "the sentinel outside was killed from {}",
            sandbox.backend()
        );
    }
    sentinel.kill().unwrap();
    sentinel.wait().unwrap();
}

/// A program trying the calls the seccomp filter denies, each in a form whose error without
/// the filter differs from `EPERM` (`ptrace(PTRACE_CONT)` on a process it does not trace:
/// `ESRCH`; `mount` onto a missing directory: `ENOENT`; `bpf` with an unknown command:
/// `EINVAL`; `clone3` with a zero size: `EINVAL`; `keyctl` and `unshare(CLONE_NEWUSER)`,
/// `clone(CLONE_NEWUSER)`: allowed, or refused otherwise than `EPERM`), then what a judge
/// needs: `os.fork`, `subprocess`, threads. Prints one JSON object.
fn syscalls_program() -> String {
    format!(
        r#"import ctypes, json, os, subprocess, sys, threading
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.ptrace.restype = ctypes.c_long
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
L = ctypes.c_long
def err(result):
    return ctypes.get_errno() if result == -1 else 0
out = {{}}
out['seccomp_mode'] = [l.split()[1] for l in open('/proc/self/status') if l.startswith('Seccomp:')][0]
ctypes.set_errno(0)
out['ptrace'] = err(libc.ptrace(7, os.getppid(), None, None))
out['mount'] = err(libc.mount(b'none', b'/no-such-mount-point', b'tmpfs', L(0), None))
out['bpf'] = err(libc.syscall(L({bpf}), L(9999), None, L(0)))
out['keyctl'] = err(libc.syscall(L({keyctl}), L(0), L(-3), L(0)))
pid = libc.syscall(L({clone}), L(0x10000000 | 17), None, None, None, None)
if pid == 0:
    os._exit(0)
out['clone_newuser'] = err(pid)
if pid > 0:
    os.waitpid(pid, 0)
out['clone3'] = err(libc.syscall(L({clone3}), None, L(0)))
# Last: a new user namespace would change what the calls above see.
out['unshare_newuser'] = err(libc.unshare(0x10000000))
child = os.fork()
if child == 0:
    os._exit(7)
out['fork'] = os.WEXITSTATUS(os.waitpid(child, 0)[1])
out['subprocess'] = subprocess.run([sys.executable, '-c', 'print(1)'], capture_output=True, text=True).stdout
popen = subprocess.Popen([sys.executable, '-c', 'import sys; print(int(sys.stdin.read()) * 2)'], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
out['popen'] = popen.communicate(b'21')[0].decode()
results = []
threads = [threading.Thread(target=lambda i=i: results.append(i * i)) for i in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
out['threads'] = sorted(results)
print(json.dumps(out))
"#,
        bpf = libc::SYS_bpf,
        keyctl = libc::SYS_keyctl,
        clone = libc::SYS_clone,
        clone3 = libc::SYS_clone3,
    )
}

fn syscall_results(sandbox: &Sandbox, case: &str) -> std::collections::BTreeMap<String, String> {
    let outcome = run(sandbox, case, &syscalls_program(), quick());
    assert!(
        outcome.success(),
        "{case} on {}: {outcome:?}",
        sandbox.backend()
    );
    let text = String::from_utf8_lossy(&outcome.stdout);
    let value: std::collections::BTreeMap<String, serde_json::Value> =
        serde_json::from_str(text.trim()).unwrap_or_else(|err| panic!("{err}: {text}"));
    value.into_iter().map(|(k, v)| (k, v.to_string())).collect()
}

#[test]
fn seccomp_denies_debugging_mounts_bpf_keyrings_and_namespaces_but_not_fork_or_threads() {
    let denied = [
        "ptrace",
        "mount",
        "bpf",
        "keyctl",
        "clone_newuser",
        "unshare_newuser",
    ];
    for sandbox in sandboxes() {
        assert!(sandbox.seccomp(), "{}", sandbox.describe());
        println!("{}", sandbox.describe());
        let filtered = syscall_results(&sandbox, "seccomp");
        println!("with the filter on {}: {filtered:?}", sandbox.backend());
        // Mode 2: a filter.
        assert_eq!(filtered["seccomp_mode"], "\"2\"", "{filtered:?}");
        for call in denied {
            assert_eq!(
                filtered[call],
                libc::EPERM.to_string(),
                "{call} on {}: {filtered:?}",
                sandbox.backend()
            );
        }
        assert_eq!(filtered["clone3"], libc::ENOSYS.to_string(), "{filtered:?}");
        assert_eq!(filtered["fork"], "7");
        assert_eq!(filtered["subprocess"], "\"1\\n\"");
        assert_eq!(filtered["popen"], "\"42\\n\"");
        assert_eq!(filtered["threads"], "[0,1,4,9]");

        // Without the filter the same calls fail otherwise (or succeed): the EPERMs above are
        // the filter's.
        let unfiltered = syscall_results(&sandbox.without_seccomp(), "no-seccomp");
        println!("without the filter: {unfiltered:?}");
        assert_eq!(unfiltered["seccomp_mode"], "\"0\"", "{unfiltered:?}");
        for call in denied.iter().chain(&["clone3"]) {
            assert_ne!(
                unfiltered[*call], filtered[*call],
                "{call} without the filter: {unfiltered:?}"
            );
        }
        assert_eq!(unfiltered["subprocess"], "\"1\\n\"");
    }
}
