//! `chorus completions` and `chorus man`: shell completion scripts and manual pages, generated
//! from the same command definitions as `--help`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, CommandFactory};

/// Print a shell completion script for chorus.
///
/// Examples:
///   chorus completions bash > ~/.local/share/bash-completion/completions/chorus
///   chorus completions zsh > "${fpath[1]}/_chorus"
///   chorus completions fish > ~/.config/fish/completions/chorus.fish
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct CompletionsArgs {
    /// The shell: bash, zsh, fish, elvish or powershell.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

/// Write manual pages: chorus(1) and one per subcommand (chorus-run(1), chorus-serve-learner(1)…).
///
/// Examples:
///   chorus man --out ~/.local/share/man/man1 && man chorus-run
///   chorus man | man -l -          (chorus(1) alone, to standard output)
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct ManArgs {
    /// Directory to write every page into (created if missing); without it, chorus(1) goes to
    /// standard output.
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn completions(a: CompletionsArgs) -> anyhow::Result<()> {
    let mut cmd = super::Cli::command();
    let mut script = Vec::new();
    clap_complete::generate(a.shell, &mut cmd, "chorus", &mut script);
    outln!("{}", String::from_utf8_lossy(&script).trim_end());
    Ok(())
}

pub fn man(a: ManArgs) -> anyhow::Result<()> {
    let cmd = super::Cli::command();
    let Some(dir) = a.out else {
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd).render(&mut page)?;
        outln!("{}", String::from_utf8_lossy(&page).trim_end());
        return Ok(());
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = 0;
    write_pages(&cmd, "chorus", &dir, &mut written)?;
    outln!("wrote {written} manual pages to {}", dir.display());
    Ok(())
}

/// Writes `name.1` for `cmd` and, recursively, `name-sub.1` for each visible subcommand.
fn write_pages(
    cmd: &clap::Command,
    name: &str,
    dir: &std::path::Path,
    written: &mut usize,
) -> anyhow::Result<()> {
    let page_cmd = cmd.clone().name(name.to_string());
    let path = dir.join(format!("{name}.1"));
    let mut page = Vec::new();
    clap_mangen::Man::new(page_cmd).render(&mut page)?;
    std::fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
    *written += 1;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        if sub.get_name() == "help" {
            continue;
        }
        write_pages(sub, &format!("{name}-{}", sub.get_name()), dir, written)?;
    }
    Ok(())
}
