//! `chorus run CONFIG`: a whole post-training run in one process (learner, rollout workers and
//! orchestrator as separate gRPC services on loopback), assembled by `chorus_runtime`.

use std::path::PathBuf;

use chorus_runtime::{LocalRun, RunPlan, run_local};
use clap::Args;

/// Run a staged post-training job from a TOML config, all services in this process.
///
/// The learner, each rollout worker and the orchestrator talk gRPC on 127.0.0.1 with a shared
/// token. Everything is recorded in runs/<name>/ledger.sqlite (or --db), and the run ends by
/// writing the trained policy to runs/<name>/checkpoint/ (HF layout, with its tokenizer) and
/// runs/<name>/summary.json with held-out accuracy before and after RL. Progress (one line per
/// learner step) goes to standard error; the summary is printed on standard output. A second
/// run of a config started while one is going writes to runs/<name>/<run id>/ instead.
///
/// The learner saves itself (weights, optimizer state) every `[learner] checkpoint_every` steps
/// and at each stage boundary, into runs/<name>/learner-checkpoints/. After a crash,
/// `chorus run CONFIG --resume` continues the unfinished run of that name: finished stages are
/// not repeated, and the ledger drops the prompts whose updates were lost.
///
/// Examples:
///   chorus run configs/quickstart.toml
///   chorus run configs/quickstart.toml --resume
///   chorus run configs/nemotron3-recipe.toml --from-stage rlvr --checkpoint runs/old/stages/warmup/checkpoint
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct RunArgs {
    /// The run configuration (TOML).
    config: PathBuf,
    /// Ledger database: sqlite://PATH or postgres://USER:PASS@HOST/DB. Default:
    /// sqlite://runs/<name>/ledger.sqlite.
    #[arg(long)]
    db: Option<String>,
    /// Directory for run outputs.
    #[arg(long, default_value = "runs")]
    runs_dir: PathBuf,
    /// Held-out tasks per environment for the before/after evaluation. Every accuracy is
    /// printed with its 95% interval: about ±6 points at 256 tasks, ±12 at 64. One greedy
    /// answer per task, or `[evaluation] samples` per task at a temperature (the run config).
    #[arg(long, default_value_t = 256)]
    eval_tasks: usize,
    /// Also evaluate every N RL steps while training, recording a learning curve (policy
    /// version, seconds since start, accuracy) in summary.json; 0 turns it off.
    #[arg(long, default_value_t = 0)]
    eval_every: u64,
    /// Shared token of the services (generated when absent).
    #[arg(long, env = "CHORUS_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The token the run's environment plugins check: the one each plugin was started with
    /// (`chorus serve environment --token T`). The services' own token is never sent to plugins.
    #[arg(long, env = "CHORUS_PLUGIN_TOKEN", hide_env_values = true)]
    plugin_token: Option<String>,
    /// Continue the unfinished run of this config's name (same config, same ledger) from the
    /// learner's newest checkpoint.
    #[arg(long)]
    resume: bool,
    /// Start at this stage, skipping the ones before it (with --checkpoint: the policy to start
    /// from, e.g. an earlier run's runs/<run>/stages/<stage>/checkpoint).
    #[arg(long, value_name = "NAME")]
    from_stage: Option<String>,
    /// Start from this policy checkpoint (HF layout) instead of the config's [model].
    #[arg(long, value_name = "DIR")]
    checkpoint: Option<PathBuf>,
}

/// Runs `chorus run`.
pub fn run(a: RunArgs) -> anyhow::Result<()> {
    let (mut cfg, config_toml) = super::load_config(&a.config)?;
    if let Some(dir) = &a.checkpoint {
        if !dir.join("config.json").is_file() {
            anyhow::bail!(
                "--checkpoint {}: not a policy checkpoint (no config.json there); give a \
                 directory in HF layout, e.g. runs/<run>/stages/<stage>/checkpoint",
                dir.display()
            );
        }
        cfg.checkpoint = Some(dir.clone());
        cfg.init_config = None;
    }
    let plan = RunPlan::new(cfg, config_toml, a.eval_tasks, a.eval_every)?;
    let local = LocalRun {
        db: a.db,
        runs_dir: a.runs_dir,
        token: a.token,
        plugin_token: a.plugin_token.map(Into::into),
        resume: a.resume,
        from_stage: a.from_stage.clone(),
    };
    let summary = super::runtime(2)?.block_on(run_local(&plan, local))?;
    outln!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}
