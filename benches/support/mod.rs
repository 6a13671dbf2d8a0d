//! What the run benchmarks share: config variants written elsewhere, and running `chorus run`.

use std::path::Path;
use std::process::Command;

/// The run config at `config` as a TOML table, renamed to `name`, with its model paths made
/// absolute so that the variant can be written anywhere.
pub fn load_variant(config: &Path, name: &str) -> toml::Table {
    let text = std::fs::read_to_string(config)
        .unwrap_or_else(|e| panic!("reading {}: {e}", config.display()));
    let mut doc: toml::Table =
        toml::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", config.display()));
    let base = config.parent().unwrap_or(Path::new("."));
    doc.insert("name".into(), toml::Value::String(name.into()));
    if let Some(model) = doc.get_mut("model").and_then(|m| m.as_table_mut()) {
        for key in ["init_config", "checkpoint", "tokenizer"] {
            if let Some(toml::Value::String(p)) = model.get(key) {
                let abs = base
                    .join(p)
                    .canonicalize()
                    .unwrap_or_else(|e| panic!("model path {p}: {e}"));
                model.insert(key.into(), toml::Value::String(abs.display().to_string()));
            }
        }
    }
    doc
}

/// The `[[stages]]` tables of a config whose `kind` is `kind`.
pub fn stages_of<'a>(
    doc: &'a mut toml::Table,
    kind: &'a str,
) -> impl Iterator<Item = &'a mut toml::Table> {
    doc.get_mut("stages")
        .and_then(|s| s.as_array_mut())
        .expect("the config has [[stages]]")
        .iter_mut()
        .map(|s| s.as_table_mut().expect("a stage is a table"))
        .filter(move |s| s.get("kind").and_then(|k| k.as_str()) == Some(kind))
}

/// Writes `doc` to `<dir>/<name>.toml`, runs `chorus run` on it with `args` (progress on this
/// process's standard error), and returns its `summary.json`.
pub fn run(dir: &Path, name: &str, doc: &toml::Table, args: &[String]) -> serde_json::Value {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, toml::to_string(doc).expect("serialise the config")).unwrap();
    eprintln!("== chorus run {} {}", path.display(), args.join(" "));
    let status = Command::new(env!("CARGO_BIN_EXE_chorus"))
        .arg("run")
        .arg(&path)
        .args(args)
        .arg("--runs-dir")
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("start chorus");
    assert!(status.success(), "chorus run {} failed", path.display());
    let summary = dir.join(name).join("summary.json");
    serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap()
}
