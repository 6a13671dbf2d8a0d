//! `chorus`: the command-line entry point. Parses arguments, runs one subcommand, maps errors to
//! an exit code; everything else lives in the library crates and `cli/`.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // First: in a sandbox spawner process (started by this binary) this serves and exits.
    chorus_environments::sandbox::spawner::serve_or_enable();
    // SAFETY: first thing in `main` (a spawner never gets here), before any other thread exists.
    unsafe { chorus_model::threads::fit_to_allowed_cpus() };
    chorus_model::allocator::keep_freed_memory();
    let args = cli::Cli::parse();
    cli::forget_credentials();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
