//! Every shipped config loads: model configs under configs/models/ as NemotronH configs, run
//! configs (configs/*.toml) as run configurations.

use chorus_model::NemotronHConfig;
use chorus_orchestrator::config::RunConfig;

#[test]
fn every_shipped_config_loads() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut seen = 0;
    let mut stack = vec![root];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            match path.extension().and_then(|e| e.to_str()) {
                Some("json") => {
                    NemotronHConfig::from_file(&path)
                        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                }
                Some("toml") => {
                    RunConfig::from_file(&path)
                        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                }
                _ => panic!(
                    "{}: unexpected file in configs/ (only .json model configs and .toml run configs)",
                    path.display()
                ),
            }
            seen += 1;
        }
    }
    assert!(seen >= 2, "found {seen} configs");
}
