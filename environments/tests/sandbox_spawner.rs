//! The sandbox spawner ([`chorus_environments::sandbox::spawner`]), as the `chorus` binary uses
//! it: this test is its own `main` (no harness), so it can serve as its own spawner.
//!
//! Checked: the shared sandbox starts a spawner that runs this executable; runs' results come
//! back whole (output, exit status, limits); a run's processes descend from the spawner and
//! this process forks nothing; after the spawner is killed, runs still work, from this process.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use chorus_environments::sandbox::{self, Limits, SandboxRequest, Termination, spawner};

fn parent_of(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// This process's children, over all its threads.
fn children() -> Vec<u32> {
    let mut out = vec![];
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let text = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        out.extend(
            text.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// The process whose command line contains `marker`, other than this one.
fn find_process(marker: &str) -> Option<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            (pid != me && String::from_utf8_lossy(&cmdline).contains(marker)).then_some(pid)
        })
}

fn python_run(sandbox: &sandbox::Sandbox, code: &str) -> SandboxRequest {
    SandboxRequest {
        argv: vec![sandbox.python().to_string(), "-c".into(), code.into()],
        ..SandboxRequest::default()
    }
}

fn main() {
    spawner::serve_or_enable();
    let sandbox = match sandbox::shared() {
        Ok(sandbox) => sandbox,
        Err(err) => {
            println!("SKIPPED: no sandbox here: {err}");
            return;
        }
    };
    let spawner = sandbox
        .spawner_pid()
        .expect("the shared sandbox started a spawner");
    assert_eq!(parent_of(spawner), Some(std::process::id()));
    let exe = std::fs::read_link(format!("/proc/{spawner}/exe")).unwrap();
    assert_eq!(exe, std::env::current_exe().unwrap());
    assert!(
        sandbox
            .describe()
            .contains(&format!("spawner process {spawner}")),
        "{}",
        sandbox.describe()
    );
    println!("spawner {spawner}: {}", sandbox.describe());

    // Results come back whole: files, stdin, output, exit status.
    let request = SandboxRequest {
        files: vec![("data/x.txt".into(), b"seven".to_vec())],
        stdin: b"six\n".to_vec(),
        ..python_run(
            sandbox,
            "import sys\nprint(input(), open('data/x.txt').read())\nprint('oops', file=sys.stderr)\nsys.exit(3)",
        )
    };
    let outcome = sandbox.run(&request).unwrap();
    assert_eq!(outcome.termination, Termination::Exited(3), "{outcome:?}");
    assert_eq!(outcome.stdout, b"six seven\n");
    assert_eq!(outcome.stderr, b"oops\n");
    assert_eq!(outcome.backend, sandbox.backend());
    // Limits are the request's: a tiny output limit ends the run.
    let flood = SandboxRequest {
        limits: Limits {
            max_output_bytes: 1000,
            ..Limits::default()
        },
        ..python_run(sandbox, "print('x' * 100000)")
    };
    let outcome = sandbox.run(&flood).unwrap();
    assert_eq!(outcome.termination, Termination::OutputLimit, "{outcome:?}");
    // A malformed request is refused, by name.
    let err = sandbox.run(&SandboxRequest::default()).unwrap_err();
    assert!(err.to_string().contains("invalid sandbox request"), "{err}");

    // A run's processes descend from the spawner; this process forks nothing.
    let marker = "chorus-spawner-test-sleeper";
    let sleeper = SandboxRequest {
        limits: Limits {
            wall_time: Duration::from_secs(300),
            cpu_time: Duration::from_secs(300),
            ..Limits::default()
        },
        ..python_run(
            sandbox,
            &format!("import time\n# {marker}\ntime.sleep(600)"),
        )
    };
    let outcome = std::thread::scope(|scope| {
        let run = scope.spawn(|| sandbox.run(&sleeper).unwrap());
        let started = Instant::now();
        let pid = loop {
            if let Some(pid) = find_process(marker) {
                break pid;
            }
            assert!(
                !run.is_finished(),
                "the sleeper ended before it was seen: {:?}",
                run.join()
            );
            assert!(
                started.elapsed() < Duration::from_secs(240),
                "the sleeper never showed up"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut chain = vec![pid];
        while let Some(parent) = parent_of(*chain.last().unwrap()) {
            if parent <= 1 || chain.len() > 16 {
                break;
            }
            chain.push(parent);
        }
        let at = chain.iter().position(|&p| p == spawner);
        assert!(
            at.is_some(),
            "the sleeper's ancestors {chain:?} skip the spawner {spawner}"
        );
        assert_eq!(chain.get(at.unwrap() + 1), Some(&std::process::id()));
        assert_eq!(children(), vec![spawner], "this process forked");
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        run.join().unwrap()
    });
    assert_eq!(
        outcome.termination,
        Termination::Signaled(libc::SIGKILL),
        "{outcome:?}"
    );

    // A dead spawner loses nothing: runs start from this process instead.
    // SAFETY: as above.
    unsafe { libc::kill(spawner as i32, libc::SIGKILL) };
    let proc_dir = PathBuf::from(format!("/proc/{spawner}"));
    let started = Instant::now();
    while std::fs::read_to_string(proc_dir.join("stat")).is_ok_and(|stat| !stat.contains(") Z ")) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the spawner outlived SIGKILL"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    for _ in 0..2 {
        let outcome = sandbox.run(&python_run(sandbox, "print(6*7)")).unwrap();
        assert!(outcome.success(), "{outcome:?}");
        assert_eq!(outcome.stdout, b"42\n");
    }
    println!("sandbox spawner: all checks passed");
}
