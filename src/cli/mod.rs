//! Argument definitions (clap) and one function per subcommand.

/// `println!` for command output: a reader that went away (`chorus inspect ... | head`) ends
/// the command quietly with success, as ripgrep does, instead of a panic about a broken pipe.
/// Any other failure to write standard output still panics, as `println!` would.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let written = writeln!(std::io::stdout().lock(), $($arg)*);
        $crate::cli::written(written);
    }};
}

/// The end of a write to standard output: a broken pipe exits the process with success.
pub(crate) fn written(result: std::io::Result<()>) {
    match result {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => panic!("failed printing to stdout: {e}"),
    }
}

mod audit;
mod dashboard;
mod env;
mod generate;
mod inspect;
mod launch;
mod logging;
mod loss;
mod metrics;
mod model;
mod plot;
mod progress;
mod quantize;
mod run;
mod serve;
mod shell;

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
    /// How log lines on standard error are written: text (for people) or json (one object per
    /// event, with the run, stage, step and request ids of its spans). Filter them with
    /// RUST_LOG, e.g. RUST_LOG=debug or RUST_LOG=chorus_orchestrator=debug.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t,
        env = "CHORUS_LOG_FORMAT"
    )]
    pub log_format: logging::LogFormat,
    /// Serve Prometheus metrics on http://ADDR/metrics (e.g. 0.0.0.0:9100) while the command
    /// runs: queue depths, requests in flight, tokens and trajectories, learner steps,
    /// staleness, weight syncs, environment calls and faults, ledger write lag (docs/metrics.md).
    /// A standby learner or worker hands the address to the service it starts for each run.
    #[arg(long, global = true, env = "CHORUS_METRICS", value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// TLS for every service this command serves and every `https://` service it calls
/// (`chorus_proto::tls`): the same three flags on every command.
#[derive(clap::Args, Debug, Default)]
pub struct TlsArgs {
    /// This process's TLS certificate chain (PEM). With --tls-key, every service it serves
    /// speaks TLS (its URL is https://…), and it presents this certificate to https:// services
    /// that ask for one (mutual TLS).
    #[arg(long, global = true, env = "CHORUS_TLS_CERT", value_name = "PEM")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, global = true, env = "CHORUS_TLS_KEY", value_name = "PEM")]
    pub tls_key: Option<std::path::PathBuf>,
    /// A CA certificate (PEM). Services served here require clients to present a certificate
    /// signed by it (mutual TLS); https:// services called from here must have a certificate
    /// signed by it (without it: the system's roots).
    #[arg(long, global = true, env = "CHORUS_TLS_CA", value_name = "PEM")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// Check https:// services' certificates against this DNS name instead of the host of the
    /// URL dialed: for services reached at addresses no certificate names in advance (pod
    /// IPs), all serving a certificate for this name.
    #[arg(
        long,
        global = true,
        env = "CHORUS_TLS_SERVER_NAME",
        value_name = "NAME"
    )]
    pub tls_server_name: Option<String>,
}

impl TlsArgs {
    /// The files, as `chorus_proto::tls` takes them.
    pub fn files(&self) -> chorus_proto::tls::TlsFiles {
        chorus_proto::tls::TlsFiles {
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            ca: self.tls_ca.clone(),
            server_name: self.tls_server_name.clone(),
        }
    }
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
    Dashboard(dashboard::DashboardArgs),
    Plot(plot::PlotArgs),
    Audit(audit::AuditArgs),
    Quantize(quantize::QuantizeArgs),
    Loss(loss::LossArgs),
    /// List, sample and self-check environments, score given completions, scaffold new ones.
    #[command(subcommand)]
    Env(env::EnvCommand),
    Completions(shell::CompletionsArgs),
    Man(shell::ManArgs),
}

/// Removes the credentials (the shared token, the plugins' token) from this process's environment once the arguments are parsed, so
/// that no process it starts (a vLLM server, a sandboxed program, a plugin) inherits it; the
/// services that need it (a standby's child, the PyTorch learner) are handed it explicitly.
///
/// Call it from `main` before any thread starts.
pub fn forget_credentials() {
    // SAFETY: called from `main` before any other thread exists, so nothing reads the
    // environment concurrently.
    unsafe {
        std::env::remove_var("CHORUS_TOKEN");
        std::env::remove_var("CHORUS_PLUGIN_TOKEN");
    }
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    logging::init(cli.log_format)?;
    if let Some(tls) = cli.tls.files().load()? {
        if matches!(cli.command, Command::Serve(_)) && tls.files().ca.is_some() && !tls.serves() {
            anyhow::bail!(
                "--tls-ca makes a service require client certificates signed by that CA: give \
                 the service's own --tls-cert and --tls-key too"
            );
        }
        chorus_proto::tls::install(tls)?;
    }
    // A standby service exports nothing itself: the service it starts per run does.
    if let Some(addr) = cli.metrics
        && !matches!(&cli.command, Command::Serve(cmd) if serve::stands_by(cmd))
    {
        metrics::install(addr)?;
    }
    match cli.command {
        Command::Model(cmd) => model::run(cmd),
        Command::Generate(args) => generate::run(args),
        Command::Env(cmd) => env::run(cmd),
        Command::Quantize(args) => quantize::run(args),
        Command::Loss(args) => loss::run(args),
        Command::Run(args) => run::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Dashboard(args) => dashboard::run(args),
        Command::Plot(args) => plot::run(args),
        Command::Audit(args) => audit::run(args),
        Command::Serve(cmd) => serve::run(cmd, cli.metrics),
        Command::Launch(args) => launch::run(args),
        Command::Watch(args) => launch::watch(args),
        Command::Completions(args) => shell::completions(args),
        Command::Man(args) => shell::man(args),
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

/// A tokio runtime with `threads` worker threads, for one command.
fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?)
}

/// The line scripts wait for once a service serves (standard output, flushed at once). A
/// service whose reader went away once it had the line (`... | head -1`) goes on serving.
fn print_listening(url: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "listening on {url}").and_then(|()| stdout.flush());
}

/// Prints the line scripts wait for once the standby service `s` is registered.
fn print_standing_by(s: &chorus_runtime::Standby) -> impl FnOnce() + use<> {
    let line = format!(
        "standing by: {} {} at the orchestrator {}",
        s.role.name(),
        s.id,
        s.orchestrator
    );
    move || {
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
    }
}
