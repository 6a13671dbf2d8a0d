//! `deploy/slurm/chorus.sbatch` on a real one-node Slurm cluster that the test starts itself
//! (slurmctld and slurmd of Debian's `slurm-wlm`, authenticated by `munge`): the job places the
//! orchestrator daemon, a standby learner and a standby worker with `srun`, launches a run,
//! ends with the run's success and leaves no service behind; the run's ledger passes the audit.
//!
//! Needs root and the packages (`.ci/run` installs them); elsewhere it says it was skipped,
//! and under CI it fails without them.

mod harness;

use std::path::Path;
use std::process::{Child, Command, Stdio};

use harness::*;

/// Why this machine cannot run the cluster, if it cannot.
fn missing() -> Option<String> {
    for tool in [
        "slurmctld",
        "slurmd",
        "sbatch",
        "scontrol",
        "munged",
        "munge",
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!(
                "{tool} is not installed (apt-get install slurm-wlm munge)"
            ));
        }
    }
    if sh("id -u") != "0" {
        return Some("the test cluster's daemons run as root".into());
    }
    None
}

/// slurmctld and slurmd of a one-node cluster configured in `dir`, stopped when dropped.
struct Cluster {
    daemons: Vec<Child>,
    conf: std::path::PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SIGTERM lets each daemon stop its helpers (slurmscriptd, slurmstepd); then SIGKILL.
        for d in &mut self.daemons {
            let _ = Command::new("kill").arg(d.id().to_string()).status();
        }
        for d in &mut self.daemons {
            let stopped = eventually(15, || d.try_wait().is_ok_and(|s| s.is_some()));
            if !stopped {
                let _ = d.kill();
                let _ = d.wait();
            }
        }
    }
}

fn sh(script: &str) -> String {
    let out = Command::new("sh").args(["-c", script]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn start_cluster(dir: &Path) -> Cluster {
    // munge: the package made the key; its daemon wants its socket directory.
    if sh("pgrep -x munged").is_empty() {
        sh("mkdir -p /run/munge && chown munge:munge /run/munge");
        let started = Command::new("munged")
            .arg("--force")
            .status()
            .expect("start munged");
        assert!(started.success(), "munged did not start");
    }
    let host = sh("hostname -s");
    for sub in ["state", "spool", "log"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    let d = dir.display();
    let conf = dir.join("slurm.conf");
    std::fs::write(
        &conf,
        format!(
            "ClusterName=choruscluster\nSlurmctldHost={host}(127.0.0.1)\nSlurmUser=root\n\
             SlurmdUser=root\nAuthType=auth/munge\nStateSaveLocation={d}/state\n\
             SlurmdSpoolDir={d}/spool\nSlurmctldPidFile={d}/slurmctld.pid\n\
             SlurmdPidFile={d}/slurmd.pid\nSlurmctldPort={}\nSlurmdPort={}\n\
             SlurmctldLogFile={d}/log/slurmctld.log\nSlurmdLogFile={d}/log/slurmd.log\n\
             ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nReturnToService=2\n\
             SchedulerType=sched/builtin\nSelectType=select/cons_tres\n\
             SelectTypeParameters=CR_Core\nMpiDefault=none\nJobCompType=jobcomp/none\n\
             JobAcctGatherType=jobacct_gather/none\n\
             AccountingStorageType=accounting_storage/none\n\
             NodeName={host} NodeAddr=127.0.0.1 CPUs=2 RealMemory=4000 State=UNKNOWN\n\
             PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP \
             OverSubscribe=FORCE:8\n",
            free_port(),
            free_port()
        ),
    )
    .unwrap();
    let daemon = |name: &str| {
        Command::new(name)
            .args(["-D", "-f"])
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"))
    };
    let cluster = Cluster {
        daemons: vec![daemon("slurmctld"), daemon("slurmd")],
        conf,
    };
    let idle = eventually(120, || {
        let out = Command::new("sinfo")
            .args(["-h", "-o", "%t"])
            .env("SLURM_CONF", &cluster.conf)
            .output();
        out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("idle"))
    });
    assert!(
        idle,
        "the test cluster never came up: {}",
        std::fs::read_to_string(dir.join("log/slurmctld.log")).unwrap_or_default()
    );
    cluster
}

#[test]
fn the_sbatch_script_runs_a_whole_run_on_a_one_node_cluster_and_ends_cleanly() {
    if let Some(why) = missing() {
        cannot_run(&why);
        return;
    }
    let h = Harness::new();
    let cluster = start_cluster(&h.path("cluster"));
    std::fs::write(h.path("model.json"), TINY_HYBRID_MODEL).unwrap();
    let config = format!(
        r#"
name = "slurm"
[model]
init_config = "{}"
[workers]
count = 1
max_batch = 16
[[stages]]
name = "warmup"
kind = "sft"
steps = 2
prompts_per_step = 4
environments = [{{ name = "arithmetic" }}]
[[stages]]
name = "rl"
kind = "rl"
steps = 3
prompts_per_step = 4
group_size = 2
max_new_tokens = 4
environments = [{{ name = "arithmetic" }}]
"#,
        s(&h.path("model.json"))
    );
    std::fs::write(h.path("run.toml"), config).unwrap();
    let port = free_port().to_string();
    let out = Command::new("sbatch")
        .arg("--parsable")
        .arg(format!("--chdir={}", s(h.dir.path())))
        .arg(format!("--output={}", s(&h.path("job.out"))))
        .arg(format!(
            "--export=ALL,CHORUS_CONFIG={},CHORUS_BIN={},CHORUS_EVAL_TASKS=2,CHORUS_PORT={port}",
            s(&h.path("run.toml")),
            env!("CARGO_BIN_EXE_chorus")
        ))
        .arg(repo().join("deploy/slurm/chorus.sbatch"))
        .env("SLURM_CONF", &cluster.conf)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sbatch: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let job = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let mut state = String::new();
    let ended = eventually(900, || {
        let out = Command::new("scontrol")
            .args(["show", "job", &job])
            .env("SLURM_CONF", &cluster.conf)
            .output()
            .unwrap();
        state = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .find_map(|w| w.strip_prefix("JobState="))
            .unwrap_or_default()
            .to_string();
        !matches!(
            state.as_str(),
            "" | "PENDING" | "RUNNING" | "CONFIGURING" | "COMPLETING"
        )
    });
    let log = std::fs::read_to_string(h.path("job.out")).unwrap_or_default();
    assert!(ended, "job {job} still {state}: {log}");
    assert_eq!(state, "COMPLETED", "{log}");
    assert!(
        log.contains("succeeded") && log.contains("the run ended with status 0"),
        "{log}"
    );
    // The job stopped every service it started (the orchestrator listened on its own port).
    let listen = format!("0.0.0.0:{port}");
    assert!(
        eventually(60, || pids_with_args(&[
            "orchestrator",
            "--listen",
            &listen
        ])
        .is_empty()),
        "the orchestrator outlived the job"
    );
    h.audit_clean(&format!("sqlite://{}", s(&h.path("runs/ledger.sqlite"))));
}
