//! `chorus dashboard` in a real browser: headless Chromium loads the page against the ledger of
//! a real short run, and the curves, the rollout browser and one trajectory show that run's
//! numbers. Needs `chromium` (Debian's package; `.ci/run` installs it): skipped without it,
//! failing under CI.

mod harness;

use std::process::Command;

use chorus_orchestrator::ledger::{Ledger, RolloutFilter};
use harness::*;

const RUN: &str = r#"
name = "dash"
seed = 3
[model]
init_config = "model.json"
[workers]
count = 1
[[stages]]
name = "warmup"
kind = "sft"
steps = 3
prompts_per_step = 4
environments = [{ name = "arithmetic" }]
[[stages]]
name = "rl"
kind = "rlvr"
steps = 4
prompts_per_step = 3
group_size = 4
max_new_tokens = 6
environments = [{ name = "arithmetic" }]
"#;

fn chromium() -> Option<String> {
    for candidate in ["chromium", "chromium-browser", "google-chrome"] {
        if Command::new(candidate)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return Some(candidate.to_string());
        }
    }
    cannot_run("no chromium: apt-get install chromium");
    None
}

/// The page at `url` after its scripts ran, as Chromium's DOM; a screenshot to `png` as well.
fn render(browser: &str, url: &str, png: Option<&std::path::Path>) -> String {
    let mut cmd = Command::new(browser);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
    ])
    .args(["--virtual-time-budget=15000", "--window-size=1400,2600"]);
    match png {
        Some(p) => cmd.arg(format!("--screenshot={}", p.display())),
        None => cmd.arg("--dump-dom"),
    };
    let out = cmd.arg(url).output().expect("run chromium");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn attr(dom: &str, metric: &str, name: &str) -> String {
    let at = dom
        .find(&format!("data-metric=\"{metric}\""))
        .unwrap_or_else(|| panic!("no {metric} chart in the page"));
    let rest = &dom[at..];
    let key = format!("{name}=\"");
    let start = rest.find(&key).unwrap() + key.len();
    rest[start..start + rest[start..].find('"').unwrap()].to_string()
}

#[test]
fn the_dashboard_shows_a_real_runs_curves_rollouts_and_tokens_in_chromium() {
    let Some(browser) = chromium() else { return };
    let h = Harness::new();
    std::fs::write(h.path("model.json"), TINY_DENSE_MODEL).unwrap();
    std::fs::write(h.path("run.toml"), RUN).unwrap();
    h.ok(&["run", "run.toml", "--eval-tasks", "2"]);
    let summary = h.json("runs/dash/summary.json");
    let run_id = summary["run"].as_str().unwrap().to_string();
    let db = h.ledger_url("dash");
    let (steps, newest, one) = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let ledger = Ledger::open(&db).await.unwrap();
        let steps = ledger.list_learner_steps(&run_id).await.unwrap();
        let rows = ledger
            .list_rollouts(&RolloutFilter {
                run_id: Some(run_id.clone()),
                limit: 5,
                ..Default::default()
            })
            .await
            .unwrap();
        let newest = rows[0].id.clone();
        let one = rows
            .iter()
            .find(|r| r.worker_id == "w0" && r.num_completion_tokens > 0)
            .unwrap()
            .id
            .clone();
        let t = ledger.get_trajectory(&one).await.unwrap().unwrap();
        (steps, newest, t)
    });
    let dashboard = h.service(&["dashboard", "--db", &db, "--listen", "127.0.0.1:0"]);
    let page = format!("{}/#run={run_id}", dashboard.url);
    let dom = render(&browser, &page, None);

    // The run, its stages and its curves, with the ledger's numbers.
    assert!(dom.contains(&run_id), "the run is not listed");
    assert!(
        dom.contains(">warmup<") && dom.contains(">rl<"),
        "the stages are not shown"
    );
    assert!(
        dom.contains(&format!("{} learner steps", steps.len())),
        "the run summary is missing"
    );
    let with_loss = steps.iter().filter(|s| s.step.loss.is_some()).count();
    assert_eq!(attr(&dom, "loss", "data-points"), with_loss.to_string());
    let last_loss: f64 = attr(&dom, "loss", "data-last").parse().unwrap();
    let want = steps.last().unwrap().step.loss.unwrap();
    assert!(
        (last_loss - want).abs() < 1e-9,
        "last loss {last_loss}, ledger {want}"
    );
    assert!(
        attr(&dom, "accuracy", "data-points")
            .parse::<usize>()
            .unwrap()
            >= 2
    );
    assert!(
        attr(&dom, "reward", "data-points")
            .parse::<usize>()
            .unwrap()
            >= 1
    );
    // The rollout browser lists the run's newest rollout.
    assert!(
        dom.contains(&format!("data-id=\"{newest}\"")),
        "rollout {newest} not listed"
    );

    // The JSON API: curves from the ledger's views, rollout filters applied in SQL.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let get = |path: String| {
        rt.block_on(async {
            let base = chorus_proto::http::BaseUrl::parse(&dashboard.url).unwrap();
            let answer = chorus_proto::http::send_once(&base, &path, None, None)
                .await
                .unwrap();
            let body: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
            (answer.status, body)
        })
    };
    let (by_step, staleness, stage1, unsolved, syncs) = rt.block_on(async {
        let ledger = Ledger::open(&db).await.unwrap();
        let filter = RolloutFilter::default().run(run_id.clone()).limit(1000);
        (
            ledger.reward_by_step(&run_id).await.unwrap(),
            ledger.trained_staleness(&run_id).await.unwrap(),
            ledger
                .list_rollouts(&filter.clone().stage(1))
                .await
                .unwrap(),
            ledger.list_rollouts(&filter.max_reward(0.0)).await.unwrap(),
            ledger.weight_sync(&run_id).await.unwrap(),
        )
    });
    let (status, curves) = get(format!("/api/runs/{run_id}/curves"));
    assert_eq!(status, 200, "{curves}");
    let points: usize = curves["reward"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_array().unwrap().len())
        .sum();
    assert_eq!(points, by_step.len(), "{curves}");
    let lagged: u64 = curves["lag"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[1].as_u64().unwrap())
        .sum();
    assert_eq!(
        lagged,
        staleness.iter().map(|s| s.trajectories).sum::<u64>()
    );
    assert!(lagged > 0, "{curves}");
    // Weight transfers: the ledger holds some, and the page draws two points per version.
    assert!(!syncs.is_empty(), "no weight transfers recorded");
    assert_eq!(curves["weight_sync"].as_array().unwrap().len(), syncs.len());
    assert_eq!(
        attr(&dom, "weight_sync", "data-points"),
        (2 * syncs.len()).to_string()
    );
    let (_, rows) = get(format!("/api/rollouts?run={run_id}&stage=1&limit=1000"));
    assert_eq!(rows.as_array().unwrap().len(), stage1.len(), "{rows}");
    assert!(!stage1.is_empty());
    let (_, rows) = get(format!(
        "/api/rollouts?run={run_id}&max_reward=0&limit=1000"
    ));
    assert_eq!(rows.as_array().unwrap().len(), unsolved.len(), "{rows}");
    let (status, error) = get(format!("/api/rollouts?run={run_id}&finish=sideways"));
    assert_eq!(status, 400, "{error}");
    assert!(
        error["error"].as_str().unwrap().contains("stop, length"),
        "{error}"
    );

    // One trajectory token by token, each with its log-probability and version.
    let tr = &one.trajectory;
    let page = format!("{}/#run={run_id}&trajectory={}", dashboard.url, tr.id);
    let dom = render(&browser, &page, None);
    let tokens = dom.matches("class=\"tok").count();
    assert_eq!(tokens, tr.completion_token_ids.len(), "tokens shown");
    let first = format!("token {} · logprob ", tr.completion_token_ids[0]);
    assert!(dom.contains(&first), "the first token's title is missing");
    let version = format!("data-version=\"{}\"", tr.policy_versions[0]);
    assert!(
        dom.contains(&version),
        "the first token's version is missing"
    );

    // And a screenshot renders.
    let png = h.path("dashboard.png");
    render(
        &browser,
        &format!("{}/#run={run_id}", dashboard.url),
        Some(&png),
    );
    let bytes = std::fs::read(&png).expect("a screenshot");
    assert!(
        bytes.starts_with(b"\x89PNG") && bytes.len() > 20_000,
        "{} bytes",
        bytes.len()
    );
}
