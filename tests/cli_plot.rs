//! `chorus plot` writes a real run's curves as SVG and PNG, with the ledger's points.

mod harness;

use chorus_orchestrator::ledger::Ledger;
use harness::*;

const RUN: &str = r#"
name = "plots"
[model]
init_config = "model.json"
[workers]
count = 1
[[stages]]
name = "warmup"
kind = "sft"
steps = 2
prompts_per_step = 4
environments = [{ name = "arithmetic" }]
[[stages]]
name = "rl"
kind = "rlvr"
steps = 3
prompts_per_step = 3
group_size = 4
max_new_tokens = 4
environments = [{ name = "arithmetic" }]
"#;

#[test]
fn plot_writes_every_curve_as_svg_and_png_with_the_ledgers_points() {
    let has_font = std::fs::read_dir("/usr/share/fonts").is_ok();
    if !has_font {
        cannot_run("no fonts under /usr/share/fonts: apt-get install fonts-dejavu-core");
        return;
    }
    let h = Harness::new();
    std::fs::write(h.path("model.json"), TINY_DENSE_MODEL).unwrap();
    std::fs::write(h.path("run.toml"), RUN).unwrap();
    h.ok(&["run", "run.toml", "--eval-tasks", "2"]);
    let db = h.ledger_url("plots");
    let out = h.ok(&["plot", "--db", &db, "--out", "plots"]);
    assert!(out.contains("wrote 13 curves"), "{out}");
    for key in [
        "reward",
        "accuracy",
        "loss",
        "kl",
        "entropy",
        "grad_norm",
        "learning_rate",
        "clip_fraction",
        "mismatch",
        "trajectories_per_second",
        "tokens_per_second",
        "weight_sync",
        "lag",
    ] {
        let svg = std::fs::read_to_string(h.path(&format!("plots/{key}.svg"))).unwrap();
        assert!(svg.starts_with("<svg"), "{key}.svg");
        let png = std::fs::read(h.path(&format!("plots/{key}.png"))).unwrap();
        assert!(png.starts_with(b"\x89PNG"), "{key}.png");
    }
    // The loss curve is the first series: one point per learner step that has a loss.
    let summary = h.json("runs/plots/summary.json");
    let run_id = summary["run"].as_str().unwrap().to_string();
    let (steps, syncs) = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let ledger = Ledger::open(&db).await.unwrap();
        (
            ledger.list_learner_steps(&run_id).await.unwrap(),
            ledger.weight_sync(&run_id).await.unwrap(),
        )
    });
    // The workers' weight transfers reached the ledger, one series point per version.
    assert!(!syncs.is_empty(), "no weight transfers recorded");
    let sync_svg = std::fs::read_to_string(h.path("plots/weight_sync.svg")).unwrap();
    let sync_series = sync_svg
        .split("<polyline")
        .find(|p| p.contains("stroke=\"#3461E0\""))
        .expect("the mean transfer series");
    let start = sync_series.find("points=\"").unwrap() + "points=\"".len();
    let sync_points = sync_series[start..start + sync_series[start..].find('"').unwrap()]
        .split_whitespace()
        .count();
    assert_eq!(sync_points, syncs.len(), "{sync_series}");
    let with_loss = steps.iter().filter(|s| s.step.loss.is_some()).count();
    let svg = std::fs::read_to_string(h.path("plots/loss.svg")).unwrap();
    let series = svg
        .split("<polyline")
        .find(|p| p.contains("stroke=\"#3461E0\""))
        .expect("the loss series");
    let start = series.find("points=\"").unwrap() + "points=\"".len();
    let points = series[start..start + series[start..].find('"').unwrap()]
        .split_whitespace()
        .count();
    assert_eq!(points, with_loss, "{series}");
    // A missing run is named.
    let err = h.fails(&["plot", "nope", "--db", &db, "--out", "plots"]);
    assert!(err.contains("no run `nope`"), "{err}");
}
