//! What the sandbox adds to one execution: the median wall time of `python3 -c pass` run
//! directly and in each available backend, side by side in one run.
//!
//! `cargo bench -p chorus-environments --bench sandbox_overhead [-- RUNS] [--ballast-gib N]`
//! (default 60 runs per column, after 5 warm-up runs; the two are interleaved). Medians are
//! what the goal is about; minimums show the cost on an idle machine, since load only ever adds
//! time. Each backend is compared with the same interpreter run directly (the bubblewrap
//! backend may use a different one, see `Sandbox::python`).
//!
//! A second table shows why runs start from a spawner process (`sandbox::spawner`): after this
//! process has touched N GiB (default 2, like a training process holding a model), the same
//! run started from this process and from the spawner, interleaved.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chorus_environments::sandbox::{self, Backend, Limits, Sandbox, SandboxRequest, spawner};

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort_unstable();
    samples[samples.len() / 2]
}

fn percentile(mut samples: Vec<Duration>, p: f64) -> Duration {
    samples.sort_unstable();
    let index = ((samples.len() - 1) as f64 * p).round() as usize;
    samples[index]
}

fn time_direct(python: &str, runs: usize) -> Vec<Duration> {
    (0..runs)
        .map(|_| {
            let start = Instant::now();
            let status = Command::new(python)
                .args(["-c", "pass"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .output()
                .expect("python runs");
            assert!(status.status.success());
            start.elapsed()
        })
        .collect()
}

fn time_sandboxed(sandbox: &Sandbox, runs: usize) -> Vec<Duration> {
    let request = SandboxRequest {
        argv: vec![sandbox.python().to_string(), "-c".into(), "pass".into()],
        limits: Limits::default(),
        ..SandboxRequest::default()
    };
    (0..runs)
        .map(|_| {
            let start = Instant::now();
            let outcome = sandbox.run(&request).expect("sandbox runs");
            assert!(outcome.success(), "{outcome:?}");
            start.elapsed()
        })
        .collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    spawner::serve_or_enable();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut runs = 60;
    let mut ballast_gib = 2;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--ballast-gib" => {
                i += 1;
                ballast_gib = args
                    .get(i)
                    .and_then(|v| v.parse().ok())
                    .expect("--ballast-gib takes a whole number of GiB");
            }
            other => {
                if let Ok(n) = other.parse() {
                    runs = n;
                }
            }
        }
        i += 1;
    }
    println!("python3 -c pass, {runs} runs per column (after 5 warm-up runs), wall time in ms");
    println!(
        "{:<22} {:<44} {:>11} {:>12} {:>10} {:>11} {:>12} {:>10}",
        "backend",
        "interpreter",
        "direct p50",
        "sandbox p50",
        "added p50",
        "direct min",
        "sandbox min",
        "added min"
    );
    for (backend, cgroups) in [
        (Backend::Namespaces, true),
        (Backend::Namespaces, false),
        (Backend::Bubblewrap, true),
        (Backend::Bubblewrap, false),
    ] {
        let sandbox = match Sandbox::with_backend(backend) {
            Ok(sandbox) if cgroups => sandbox,
            Ok(sandbox) => sandbox.without_cgroups(),
            Err(err) => {
                println!("{:<22} skipped: {err}", backend.as_str());
                continue;
            }
        };
        let label = format!(
            "{}{}",
            backend.as_str(),
            if cgroups { "" } else { " (no cgroups)" }
        );
        let python = sandbox.python().to_string();
        time_direct(&python, 5);
        time_sandboxed(&sandbox, 5);
        // Interleave the two so load changes affect both columns alike.
        let mut direct = Vec::with_capacity(runs);
        let mut boxed = Vec::with_capacity(runs);
        for _ in 0..runs {
            direct.extend(time_direct(&python, 1));
            boxed.extend(time_sandboxed(&sandbox, 1));
        }
        let (d50, s50) = (median(direct.clone()), median(boxed.clone()));
        let (dmin, smin) = (percentile(direct, 0.0), percentile(boxed, 0.0));
        println!(
            "{:<22} {:<44} {:>11.2} {:>12.2} {:>10.2} {:>11.2} {:>12.2} {:>10.2}",
            label,
            python,
            ms(d50),
            ms(s50),
            ms(s50) - ms(d50),
            ms(dmin),
            ms(smin),
            ms(smin) - ms(dmin),
        );
    }
    spawner_table(runs, ballast_gib);
}

/// The same run started from this process, grown to `ballast_gib` GiB, and from the spawner.
fn spawner_table(runs: usize, ballast_gib: usize) {
    let local = match Sandbox::detect() {
        Ok(sandbox) => sandbox,
        Err(err) => {
            println!("spawner table skipped: {err}");
            return;
        }
    };
    let shared = match sandbox::shared() {
        Ok(sandbox) if sandbox.spawner_pid().is_some() => sandbox,
        Ok(_) => {
            println!("spawner table skipped: the spawner did not start");
            return;
        }
        Err(err) => {
            println!("spawner table skipped: {err}");
            return;
        }
    };
    // Touched, so every page is mapped (and its page-table entry copied by a fork).
    let ballast = vec![1u8; ballast_gib << 30];
    println!();
    println!(
        "{} backend, this process holding {ballast_gib} GiB; {runs} runs per column, interleaved, ms",
        local.backend()
    );
    println!(
        "{:<28} {:>10} {:>10} {:>10}",
        "started from", "p50", "min", "p50 ratio"
    );
    time_sandboxed(&local, 5);
    time_sandboxed(shared, 5);
    let mut from_here = Vec::with_capacity(runs);
    let mut from_spawner = Vec::with_capacity(runs);
    for _ in 0..runs {
        from_here.extend(time_sandboxed(&local, 1));
        from_spawner.extend(time_sandboxed(shared, 1));
    }
    let here50 = median(from_here.clone());
    let spawner50 = median(from_spawner.clone());
    for (label, samples, p50) in [
        ("this process", from_here, here50),
        ("the spawner process", from_spawner, spawner50),
    ] {
        println!(
            "{:<28} {:>10.2} {:>10.2} {:>10.2}",
            label,
            ms(p50),
            ms(percentile(samples, 0.0)),
            ms(p50) / ms(spawner50),
        );
    }
    std::hint::black_box(&ballast);
}
