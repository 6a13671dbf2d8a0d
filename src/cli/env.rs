//! `chorus env …`: list, sample and self-check the verifiable environments, score given
//! completions against a dataset, and scaffold new environments.

use anyhow::{Context, bail};
use chorus_environments::{
    CheckOptions, Environment, Split, builtin_registry, chat, check_environment,
};
use std::path::PathBuf;

use chorus_environments::offline::OfflineDataset;
use clap::{Args, Subcommand};
use serde_json::json;

#[derive(Subcommand, Debug)]
pub enum EnvCommand {
    /// List the built-in environments: name, category, turns, description.
    List(ListArgs),
    /// Show one task of an environment: the prompt the model sees and a reference solution.
    ///
    /// Example: chorus env sample arithmetic --seed 3 --split heldout --difficulty 2
    Sample(SampleArgs),
    /// Self-test environments: reference solutions score full reward, corrupted ones do not,
    /// sampling is deterministic and the train and heldout splits are disjoint.
    ///
    /// Also checks a plugin server through the wire: chorus env check --url http://HOST:PORT --token T
    ///
    /// and a NeMo Gym resources server against its data rows:
    /// chorus env check --kind nemo_gym --url http://HOST:PORT --dataset rows.jsonl [--max-turns N]
    /// (health route, sampling, and on some rows: a session, /verify accepting Chorus' responses
    /// for a non-answer, a text answer and a tool call with a finite reward, no full reward for
    /// the non-answer; with --max-turns above 1, a route for every tool the rows offer).
    Check(CheckArgs),
    /// Score given completions of a dataset with an environment's verifier, offline.
    ///
    /// The dataset is a file in a format the environment reads (math_word: GSM8K JSONL; mcqa:
    /// ARC/MMLU JSONL; instruction_following: IFEval JSONL; code_python: HumanEval or MBPP
    /// JSONL; nemo_gym: NeMo Gym rows, with --url of the resources server). The completions file has one JSON object a line,
    /// {"id": ..., "completion": "..."}, where id is the dataset row's line number counted from
    /// 0, or the row's own `task_id` as a string (else its `id`, `uuid` or IFEval `key`). Prints
    /// each item's reward and reason, then the mean.
    ///
    /// Example: chorus env score math_word --dataset gsm8k_test.jsonl --completions answers.jsonl
    Score(ScoreArgs),
    /// Start a new environment from a working template (it asks the model to repeat a word).
    ///
    /// --lang rust writes DIR/NAME.rs: a type implementing the Environment trait, how to
    /// register it, and a test running the self-check (needs chorus-environments, rand, serde and
    /// serde_json as dependencies). --lang python writes the plugin project DIR/NAME/
    /// (pyproject.toml, NAME.py on the chorus-env SDK, test_NAME.py, README.md); serve it and
    /// put { url = "http://host:port" } in a run config. docs/plugins.md has the whole guide.
    ///
    /// Example: chorus env new word_sort --lang python --dir plugins
    New(NewArgs),
}

#[derive(Args, Debug)]
pub struct NewArgs {
    /// Name of the new environment: lowercase letters, digits and `_`, starting with a letter.
    name: String,
    /// Language of the new environment.
    #[arg(long, value_enum)]
    lang: Lang,
    /// Directory to write into (created if missing).
    #[arg(long, default_value = ".")]
    dir: PathBuf,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Lang {
    /// A Rust file implementing the Environment trait.
    Rust,
    /// A Python plugin project on the chorus-env SDK (gRPC).
    Python,
}

#[derive(Args, Debug)]
pub struct ScoreArgs {
    /// Environment whose verifier scores: math_word, mcqa, instruction_following, code_python
    /// or nemo_gym.
    name: String,
    /// The dataset (JSONL) the completions answer.
    #[arg(long)]
    dataset: PathBuf,
    /// JSONL of {"id": LINE_OR_TASK_ID, "completion": "..."}.
    #[arg(long)]
    completions: PathBuf,
    /// For nemo_gym: the resources server, e.g. http://127.0.0.1:8000.
    #[arg(long)]
    url: Option<String>,
    /// Print {"items": [{id, line, task_id, reward, reason, components}], "mean", "count"}.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Print a JSON list of objects with keys name, category, turns, description.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct SampleArgs {
    /// Environment name (see `chorus env list`).
    name: String,
    /// Seed; the same seed gives the same task.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// train or heldout (disjoint).
    #[arg(long, default_value = "train")]
    split: String,
    /// Difficulty level, 0 = learnable by a freshly initialised tiny model.
    #[arg(long, default_value_t = 0)]
    difficulty: u32,
    /// Print the task, the rendered prompt and the reference as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Environment to check.
    #[arg(required_unless_present_any = ["all", "url"], conflicts_with_all = ["all", "url"])]
    name: Option<String>,
    /// Check every built-in environment.
    #[arg(long, conflicts_with = "url")]
    all: bool,
    /// Check a server instead: an environment plugin, e.g. http://127.0.0.1:50051 (with
    /// --token), or with --kind nemo_gym a NeMo Gym resources server (with --dataset).
    #[arg(long)]
    url: Option<String>,
    /// What --url serves.
    #[arg(long, value_enum, default_value = "plugin", requires = "url")]
    kind: ServerKind,
    /// The plugin's shared token (for --url).
    #[arg(long, env = "CHORUS_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// For --kind nemo_gym: the NeMo Gym JSONL data rows the server verifies.
    #[arg(long, requires = "url")]
    dataset: Option<PathBuf>,
    /// For --kind nemo_gym: policy turns per episode, as the run config's `max_turns`.
    #[arg(long, default_value_t = 1)]
    max_turns: u32,
    /// Tasks sampled per split and difficulty (for --kind nemo_gym: rows checked).
    #[arg(long, default_value_t = 8)]
    tasks: usize,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum ServerKind {
    /// An environment plugin (gRPC `Environment` service).
    Plugin,
    /// A NeMo Gym resources server (HTTP, with its data rows).
    #[value(name = "nemo_gym")]
    NemoGym,
}

/// `chorus env check --kind nemo_gym`: the server's self-check, a line per check.
fn check_nemo_gym(a: &CheckArgs) -> anyhow::Result<()> {
    let url = a.url.clone().unwrap_or_default();
    let dataset = a.dataset.as_ref().with_context(|| {
        format!("--kind nemo_gym: give --dataset, the JSONL rows {url} verifies")
    })?;
    let env = chorus_environments::NemoGym::from_jsonl_file(
        chorus_environments::offline::NEMO_GYM,
        &url,
        dataset,
    )?
    .with_max_turns(a.max_turns)
    .map_err(|e| anyhow::anyhow!("--max-turns: {e}"))?;
    let report = env.check_server(a.tasks);
    outln!(
        "{} {}: {} rows ({} train, {} heldout), max_turns {}",
        url,
        dataset.display(),
        report.rows,
        report.train_rows,
        report.heldout_rows,
        report.max_turns
    );
    for line in &report.lines {
        outln!(
            "  {:<4} {:<20} {}",
            if line.ok { "ok" } else { "FAIL" },
            line.check,
            line.detail
        );
    }
    if report.verify_calls > 0 {
        outln!(
            "  {} verify calls, {:.0} ms each on average (session included)",
            report.verify_calls,
            report.verify_ms / report.verify_calls as f64
        );
    }
    let failed = report.lines.iter().filter(|l| !l.ok).count();
    if failed > 0 {
        bail!("{failed} of {} checks of {url} failed", report.lines.len());
    }
    Ok(())
}

/// `chorus env score`: every completion's reward and reason, then the mean.
fn score(a: ScoreArgs) -> anyhow::Result<()> {
    if a.url.is_some() && a.name != chorus_environments::offline::NEMO_GYM {
        bail!("--url is only for nemo_gym (the NeMo Gym resources server)");
    }
    let data = OfflineDataset::open(&a.name, &a.dataset, a.url.as_deref())?;
    let text = std::fs::read_to_string(&a.completions)
        .with_context(|| format!("reading {}", a.completions.display()))?;
    let source = a.completions.display().to_string();
    let mut items = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{source} line {}", index + 1);
        let value: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{at}: not JSON"))?;
        let id = value.get("id").cloned().with_context(|| {
            format!("{at}: missing `id` (a dataset line number from 0 or a task_id)")
        })?;
        let completion = value
            .get("completion")
            .and_then(|c| c.as_str())
            .with_context(|| format!("{at}: missing string `completion`"))?
            .to_string();
        let row = data.find(&id).map_err(|e| anyhow::anyhow!("{at}: {e}"))?;
        items.push((id, row, completion));
    }
    if items.is_empty() {
        bail!("{source} has no completions");
    }
    let mut out = Vec::new();
    let (mut sum, mut scored, mut full, mut failed) = (0.0, 0usize, 0usize, 0usize);
    // On a terminal a bar counts the items (scoring code runs each in the sandbox); the
    // results still go to standard output, one line each.
    let bar = super::progress::bar(items.len() as u64, "score", "completions");
    for (id, row, completion) in items {
        if let Some(bar) = &bar {
            bar.inc(1);
        }
        let (env, task) = data.task(row)?;
        let id_text = match &id {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        match env.score(&task, &completion) {
            Ok(score) => {
                sum += score.reward;
                scored += 1;
                full += usize::from(env.is_solved(&score));
                if !a.json {
                    outln!(
                        "{id_text:<16} reward {:>6.3}  {}",
                        score.reward,
                        score.reason
                    );
                }
                out.push(
                    json!({"id": id, "line": row, "task_id": task.id, "reward": score.reward,
                    "reason": score.reason, "components": score.components_map()}),
                );
            }
            Err(e) => {
                failed += 1;
                if !a.json {
                    outln!("{id_text:<16} FAILED  {e}");
                }
                out.push(
                    json!({"id": id, "line": row, "task_id": task.id, "error": e.to_string()}),
                );
            }
        }
    }
    if let Some(bar) = bar {
        // Drawn whole, whatever the refresh rate skipped, and left above the mean.
        bar.finish();
    }
    let mean = if scored > 0 { sum / scored as f64 } else { 0.0 };
    if a.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"items": out, "mean": mean, "count": scored, "full": full, "failed": failed})
            )?
        );
    } else {
        outln!("mean reward {mean:.4} over {scored} completions ({full} with full reward)");
    }
    if failed > 0 {
        bail!(
            "{failed} completions could not be scored (see FAILED above); the mean leaves them out"
        );
    }
    Ok(())
}

/// `chorus env new`: writes the template, refusing to overwrite anything.
fn new(a: NewArgs) -> anyhow::Result<()> {
    use chorus_environments::plugin::scaffold;
    scaffold::check_name(&a.name).map_err(anyhow::Error::msg)?;
    if builtin_registry().get(&a.name).is_ok() {
        bail!(
            "`{}` is a built-in environment; choose another name",
            a.name
        );
    }
    let files: Vec<(PathBuf, String)> = match a.lang {
        Lang::Rust => vec![(
            a.dir.join(format!("{}.rs", a.name)),
            scaffold::rust_source(&a.name).map_err(anyhow::Error::msg)?,
        )],
        Lang::Python => {
            let project = a.dir.join(&a.name);
            if project.exists() {
                bail!(
                    "{} already exists; remove it or choose another --dir",
                    project.display()
                );
            }
            scaffold::python_files(&a.name)
                .map_err(anyhow::Error::msg)?
                .into_iter()
                .map(|(path, text)| (project.join(path), text))
                .collect()
        }
    };
    for (path, _) in &files {
        if path.exists() {
            bail!(
                "{} already exists; remove it or choose another --dir",
                path.display()
            );
        }
    }
    for (path, text) in &files {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        outln!("wrote {}", path.display());
    }
    let ty = scaffold::type_name(&a.name);
    match a.lang {
        Lang::Rust => outln!(
            "next: add the file to a crate depending on chorus-environments, rand, serde and serde_json, \
             register it with `registry.register({ty})?` and use {{ name = \"{}\" }} in a run config; \
             `cargo test` runs its self-check",
            a.name
        ),
        Lang::Python => outln!(
            "next: pip install environments/python (the chorus-env SDK), then in {dir}: \
             python test_{name}.py, and serve it with python {name}.py --port 50051 --token T; \
             a run uses it with {{ url = \"http://127.0.0.1:50051\" }} and --token T",
            dir = a.dir.join(&a.name).display(),
            name = a.name
        ),
    }
    Ok(())
}

pub fn run(cmd: EnvCommand) -> anyhow::Result<()> {
    let cmd = match cmd {
        EnvCommand::Score(a) => return score(a),
        EnvCommand::New(a) => return new(a),
        other => other,
    };
    let registry = builtin_registry();
    match cmd {
        EnvCommand::List(a) => {
            let list = registry.list();
            if a.json {
                let v: Vec<_> = list
                    .iter()
                    .map(|e| json!({"name": e.name, "category": e.category, "turns": e.turns, "description": e.description, "max_turns": e.max_turns, "default_weight": e.default_weight, "max_difficulty": e.max_difficulty}))
                    .collect();
                outln!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                outln!(
                    "{:<24} {:<24} {:<7} description",
                    "name",
                    "category",
                    "turns"
                );
                for e in list {
                    let cat = serde_json::to_value(e.category)?
                        .as_str()
                        .unwrap_or_default()
                        .to_string();
                    let turns = serde_json::to_value(e.turns)?
                        .as_str()
                        .unwrap_or_default()
                        .to_string();
                    outln!("{:<24} {:<24} {:<7} {}", e.name, cat, turns, e.description);
                }
            }
            Ok(())
        }
        EnvCommand::Sample(a) => {
            let env = registry.get(&a.name)?;
            let split: Split = a
                .split
                .parse()
                .map_err(|e| anyhow::anyhow!("--split: {e}"))?;
            let task = env.sample(a.seed, split, a.difficulty)?;
            let prompt = chat::render_prompt(&task.prompt);
            let reference = env.reference(&task)?;
            let score = env.score(&task, &reference)?;
            if a.json {
                outln!(
                    "{}",
                    serde_json::to_string_pretty(
                        &json!({"task": task, "prompt": prompt, "reference": reference, "reference_score": score})
                    )?
                );
            } else {
                outln!("task       {}", task.id);
                outln!("prompt     {prompt:?}");
                outln!("reference  {reference:?}");
                outln!("score      {} ({})", score.reward, score.reason);
            }
            Ok(())
        }
        EnvCommand::Check(a) if a.kind == ServerKind::NemoGym => check_nemo_gym(&a),
        EnvCommand::Check(a) => {
            if a.dataset.is_some() {
                bail!("--dataset is only read with --kind nemo_gym");
            }
            let mut registry = registry;
            let names: Vec<String> = match (&a.name, a.all) {
                _ if a.url.is_some() => {
                    let url = a.url.clone().unwrap_or_default();
                    let token = a.token.as_deref().with_context(|| {
                        format!("--url {url}: give the plugin's token with --token or CHORUS_TOKEN")
                    })?;
                    let env = chorus_environments::plugin::RemoteEnvironment::connect(&url, token)?;
                    registry.replace(std::sync::Arc::new(env));
                    vec![url]
                }
                (Some(n), _) => vec![n.clone()],
                (None, true) => registry.list().into_iter().map(|e| e.name).collect(),
                (None, false) => bail!("give an environment name or --all"),
            };
            let opts = CheckOptions {
                tasks_per_split: a.tasks,
                ..CheckOptions::default()
            };
            let mut failed = 0;
            for n in &names {
                let env = registry
                    .get(n)
                    .with_context(|| format!("environment `{n}`"))?;
                let r = check_environment(env.as_ref() as &dyn Environment, &opts);
                outln!(
                    "{:<24} {:<4} {} tasks, difficulties {:?}",
                    r.env,
                    if r.passed { "ok" } else { "FAIL" },
                    r.tasks_checked,
                    r.difficulties
                );
                for f in r.failures.iter().take(10) {
                    outln!(
                        "    {:?} (seed {}, {:?}, difficulty {}): {}",
                        f.kind,
                        f.seed,
                        f.split,
                        f.difficulty,
                        f.message
                    );
                }
                if !r.passed {
                    failed += 1;
                }
            }
            if failed > 0 {
                bail!(
                    "{failed} of {} environments failed their self-check",
                    names.len()
                );
            }
            Ok(())
        }
        EnvCommand::Score(_) | EnvCommand::New(_) => unreachable!("handled above"),
    }
}
