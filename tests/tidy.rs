//! Tidy checks over the workspace's own source (in the spirit of rust-analyzer's tidy test):
//! every source file opens with its `//!` doc, every library denies `missing_docs`, library
//! crates log through `tracing` instead of printing, and `src/cli/` stays argument parsing and
//! output formatting.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The library crates: the workspace's members, as the root Cargo.toml lists them.
fn library_crates() -> Vec<String> {
    let manifest: toml::Table = std::fs::read_to_string(root().join("Cargo.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let members = manifest["workspace"]["members"].as_array().unwrap();
    let crates: Vec<String> = members
        .iter()
        .map(|m| m.as_str().unwrap().to_string())
        .collect();
    assert!(crates.len() >= 8, "the workspace lists {crates:?}");
    crates
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every `.rs` file under `<crate>/src`, the binary's included.
fn sources(crates: &[String]) -> Vec<PathBuf> {
    let mut files = vec![];
    for c in crates {
        rust_files(&root().join(c).join("src"), &mut files);
    }
    files
}

/// A file's code outside its unit tests and comments: lines before `#[cfg(test)]`, comment
/// lines dropped.
fn code_of(text: &str) -> String {
    let end = text.find("#[cfg(test)]").unwrap_or(text.len());
    text[..end]
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn every_source_file_opens_with_its_module_doc() {
    let mut crates = library_crates();
    crates.push(".".into());
    let missing: Vec<String> = sources(&crates)
        .into_iter()
        .filter(|p| {
            let text = std::fs::read_to_string(p).unwrap();
            !text
                .lines()
                .find(|l| !l.trim().is_empty())
                .is_some_and(|l| l.starts_with("//!"))
        })
        .map(|p| p.strip_prefix(root()).unwrap().display().to_string())
        .collect();
    assert!(
        missing.is_empty(),
        "these files do not open with a `//!` doc saying what they are for: {missing:#?}"
    );
}

#[test]
fn every_library_denies_missing_docs() {
    let missing: Vec<String> = library_crates()
        .into_iter()
        .filter(|c| {
            let lib = std::fs::read_to_string(root().join(c).join("src/lib.rs")).unwrap();
            !lib.contains("#![deny(missing_docs)]")
        })
        .collect();
    assert!(
        missing.is_empty(),
        "these crates' lib.rs lack `#![deny(missing_docs)]`: {missing:?}"
    );
}

#[test]
fn libraries_log_through_tracing_instead_of_printing() {
    let printing: Vec<String> = sources(&library_crates())
        .into_iter()
        .filter(|p| {
            let code = code_of(&std::fs::read_to_string(p).unwrap());
            ["println!", "eprintln!", "print!(", "eprint!(", "dbg!("]
                .iter()
                .any(|m| code.contains(m))
        })
        .map(|p| p.strip_prefix(root()).unwrap().display().to_string())
        .collect();
    assert!(
        printing.is_empty(),
        "library code prints instead of logging through `tracing`: {printing:#?}"
    );
}

#[test]
fn the_cli_only_parses_arguments_and_formats_output() {
    // What a run is made of lives in chorus-runtime; the CLI calls it.
    let forbidden = [
        "tokio::spawn",
        "chorus_learner::",
        "chorus_rollout_worker::",
        "chorus_orchestrator::scheduler",
        "chorus_orchestrator::remote",
        "chorus_orchestrator::service",
        "Server::builder",
    ];
    let mut files = vec![];
    rust_files(&root().join("src"), &mut files);
    let offending: Vec<String> = files
        .into_iter()
        .flat_map(|p| {
            let code = code_of(&std::fs::read_to_string(&p).unwrap());
            let name = p.strip_prefix(root()).unwrap().display().to_string();
            forbidden
                .iter()
                .filter(move |f| code.contains(**f))
                .map(move |f| format!("{name}: {f}"))
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(
        offending.is_empty(),
        "src/ assembles services itself instead of calling chorus-runtime: {offending:#?}"
    );
}

#[test]
fn the_code_of_a_file_drops_its_tests_and_comments() {
    let text = "//! doc\nfn a() {}\n// println!(\"no\")\n#[cfg(test)]\nmod t { fn b() { println!(\"x\") } }";
    let code = code_of(text);
    assert!(code.contains("fn a()") && !code.contains("println!") && !code.contains("//!"));
}
