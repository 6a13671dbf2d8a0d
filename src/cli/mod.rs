//! Argument definitions (clap) and one function per subcommand.

mod env;
mod generate;
mod inspect;
mod launch;
mod model;
mod quantize;
mod registration;
mod run;
mod serve;
mod standby;

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
    Generate(generate::GenerateArgs),
    Run(run::RunArgs),
    /// Run one service of a run (learner, worker, orchestrator, or an environment as a plugin server) as its own process.
    ///
    /// Every service prints `listening on URL` once it serves and checks the shared token (--token
    /// or CHORUS_TOKEN) on every call. Three ways to connect them:
    ///
    /// A standing fleet: start the orchestrator without a config; start learners and workers
    /// without a config, standing by at the orchestrator; launch runs with `chorus launch`. Each
    /// run is handed to one standby learner and every standby worker, one run after another:
    ///   chorus serve orchestrator --listen 0.0.0.0:7010 --token T
    ///   chorus serve learner --orchestrator http://HOST:7010 --listen 0.0.0.0:7000 --token T
    ///   chorus serve worker --orchestrator http://HOST:7010 --listen 0.0.0.0:7001 --id w0 --token T
    ///   chorus launch run.toml --orchestrator http://HOST:7010 --token T
    ///
    /// Registration for one run: start the orchestrator with the run's config and --listen; the
    /// learner and the workers register with it (--orchestrator URL) and send heartbeats; it waits
    /// for the learner and `workers.count` workers, then runs (workers may join and leave while it
    /// runs):
    ///   chorus serve orchestrator --config run.toml --listen 127.0.0.1:7010 --run-id r1 --token T
    ///   chorus serve learner --config run.toml --listen 127.0.0.1:7000 --orchestrator http://127.0.0.1:7010 --run-id r1 --token T
    ///   chorus serve worker --config run.toml --learner http://127.0.0.1:7000 --orchestrator http://127.0.0.1:7010 --run-id r1 --token T
    ///
    /// Fixed addresses: start the learner, then the workers (pointing at the learner), then the
    /// orchestrator pointing at both:
    ///   chorus serve learner --config run.toml --listen 127.0.0.1:7000 --run-id r1 --token T
    ///   chorus serve worker --config run.toml --learner http://127.0.0.1:7000 --listen 127.0.0.1:7001 --run-id r1 --token T
    ///   chorus serve orchestrator --config run.toml --learner http://127.0.0.1:7000 --worker http://127.0.0.1:7001 --run-id r1 --token T
    #[command(subcommand, verbatim_doc_comment)]
    Serve(serve::ServeCommand),
    Launch(launch::LaunchArgs),
    Watch(launch::WatchArgs),
    Inspect(inspect::InspectArgs),
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
        Command::Launch(args) => launch::run(args),
        Command::Watch(args) => launch::watch(args),
    }
}

/// Reads and validates a run config: a TOML file, whose relative paths are relative to it, or
/// `-` for standard input, whose relative paths are relative to the working directory. Returns
/// the config and its text (recorded in the ledger).
pub fn load_config(
    path: &std::path::Path,
) -> anyhow::Result<(chorus_orchestrator::config::RunConfig, String)> {
    use std::io::Read;

    use anyhow::Context;
    use chorus_orchestrator::config::RunConfig;
    if path == std::path::Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading the run config from standard input")?;
        let cfg = RunConfig::from_toml_relative_to(&text, "<stdin>", std::path::Path::new("."))?;
        return Ok((cfg, text));
    }
    let cfg = RunConfig::from_file(path)?;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok((cfg, text))
}

/// The address other machines reach a service at. `advertise` is a host name or IP (the port is
/// the bound one), `HOST:PORT`, or a URL; without it, the bound URL, with a wildcard host
/// (`0.0.0.0`, `[::]`) replaced by this machine's host name, since nobody can connect to those.
pub fn advertised_url(bound: &str, advertise: Option<&str>) -> anyhow::Result<String> {
    let rest = bound
        .strip_prefix("http://")
        .ok_or_else(|| anyhow::anyhow!("`{bound}` is not an http:// address"))?;
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| anyhow::anyhow!("`{bound}` has no port"))?;
    Ok(match advertise {
        Some(a) if a.starts_with("http://") || a.starts_with("https://") => {
            a.trim_end_matches('/').to_string()
        }
        Some("") => {
            anyhow::bail!("--advertise is empty; allowed: a host name or IP, HOST:PORT, or a URL")
        }
        Some(a) if a.contains(':') && !a.starts_with('[') => format!("http://{a}"),
        Some(a) => format!("http://{a}:{port}"),
        None if host == "0.0.0.0" || host == "[::]" => format!("http://{}:{port}", host_name()?),
        None => bound.to_string(),
    })
}

fn host_name() -> anyhow::Result<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that much.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    anyhow::ensure!(
        rc == 0,
        "this machine's host name: {}",
        std::io::Error::last_os_error()
    );
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).into_owned();
    anyhow::ensure!(
        !name.is_empty(),
        "this machine has no host name: give --advertise HOST"
    );
    Ok(name)
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

#[cfg(test)]
mod tests {
    use super::advertised_url;

    #[test]
    fn services_advertise_an_address_others_can_reach() {
        let at = |bound: &str, a: Option<&str>| advertised_url(bound, a).unwrap();
        assert_eq!(at("http://127.0.0.1:7000", None), "http://127.0.0.1:7000");
        assert_eq!(
            at("http://0.0.0.0:7000", Some("10.0.0.3")),
            "http://10.0.0.3:7000"
        );
        assert_eq!(
            at("http://0.0.0.0:7000", Some("gpu-3:9000")),
            "http://gpu-3:9000"
        );
        assert_eq!(
            at("http://0.0.0.0:7000", Some("https://w.example/")),
            "https://w.example"
        );
        let wildcard = at("http://0.0.0.0:7000", None);
        assert!(
            wildcard.ends_with(":7000") && !wildcard.contains("0.0.0.0"),
            "{wildcard}"
        );
        assert!(!at("http://[::]:7000", None).contains("[::]"));
        assert!(advertised_url("http://0.0.0.0:7000", Some("")).is_err());
    }
}
