//! Argument definitions (clap) and one function per subcommand.

mod env;
mod generate;
mod inspect;
mod model;
mod quantize;
mod registration;
mod run;
mod serve;

use clap::{Parser, Subcommand};

/// Chorus: asynchronous multi-environment RL post-training for Nemotron-3-style hybrid
/// (Mamba-2 + attention + MoE) policies.
///
/// Start with `chorus run configs/quickstart.toml` (a whole post-training run on this machine),
/// or `chorus model init` to create a small policy and `chorus generate` to sample from it.
#[derive(Parser, Debug)]
#[command(name = "chorus", version, about, long_about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create, inspect and run policy checkpoints (HF NemotronH layout).
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// Generate tokens from a checkpoint through the incremental (cached) decoding path.
    Generate(generate::GenerateArgs),
    /// Run a staged post-training job (SFT warm-up, RL) from a TOML config, all services in
    /// this process talking gRPC on loopback.
    Run(run::RunArgs),
    /// Run one service of a run (learner, worker, orchestrator, or an environment as a plugin
    /// server) as its own process.
    #[command(subcommand)]
    Serve(serve::ServeCommand),
    /// Read a run's ledger: runs, rollouts, one trajectory, learner steps.
    Inspect(inspect::InspectArgs),
    /// Convert a checkpoint to NVFP4 (ModelOpt layout) or back.
    Quantize(quantize::QuantizeArgs),
    /// List, sample and self-check environments, score given completions, scaffold new ones.
    #[command(subcommand)]
    Env(env::EnvCommand),
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Model(cmd) => model::run(cmd),
        Command::Generate(args) => generate::run(args),
        Command::Env(cmd) => env::run(cmd),
        Command::Quantize(args) => quantize::run(args),
        Command::Run(args) => run::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Serve(cmd) => serve::run(cmd),
    }
}

/// The device a command runs on; only the CPU exists in builds without the `cuda` feature.
pub fn parse_device(spec: &str) -> anyhow::Result<candle_core::Device> {
    match spec {
        "cpu" => Ok(candle_core::Device::Cpu),
        s if s.starts_with("cuda") => anyhow::bail!(
            "device `{s}`: this build of chorus has no CUDA support (rebuild with `--features cuda` on a machine with the CUDA toolkit); allowed here: cpu"
        ),
        s => anyhow::bail!("unknown device `{s}`; allowed: cpu, cuda:N"),
    }
}
