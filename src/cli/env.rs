//! `chorus env …`: list, sample and self-check the verifiable environments.

use anyhow::{Context, bail};
use chorus_environments::{
    CheckOptions, Environment, Split, builtin_registry, chat, check_environment,
};
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
    Check(CheckArgs),
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
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    name: Option<String>,
    /// Check every built-in environment.
    #[arg(long)]
    all: bool,
    /// Tasks sampled per split and difficulty.
    #[arg(long, default_value_t = 8)]
    tasks: usize,
}

pub fn run(cmd: EnvCommand) -> anyhow::Result<()> {
    let registry = builtin_registry();
    match cmd {
        EnvCommand::List(a) => {
            let list = registry.list();
            if a.json {
                let v: Vec<_> = list
                    .iter()
                    .map(|e| json!({"name": e.name, "category": e.category, "turns": e.turns, "description": e.description, "max_turns": e.max_turns, "default_weight": e.default_weight, "max_difficulty": e.max_difficulty}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{:<24} {:<24} {:<7} description",
                    "name", "category", "turns"
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
                    println!("{:<24} {:<24} {:<7} {}", e.name, cat, turns, e.description);
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
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &json!({"task": task, "prompt": prompt, "reference": reference, "reference_score": score})
                    )?
                );
            } else {
                println!("task       {}", task.id);
                println!("prompt     {prompt:?}");
                println!("reference  {reference:?}");
                println!("score      {} ({})", score.reward, score.reason);
            }
            Ok(())
        }
        EnvCommand::Check(a) => {
            let names: Vec<String> = match (&a.name, a.all) {
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
                println!(
                    "{:<24} {:<4} {} tasks, difficulties {:?}",
                    r.env,
                    if r.passed { "ok" } else { "FAIL" },
                    r.tasks_checked,
                    r.difficulties
                );
                for f in r.failures.iter().take(10) {
                    println!(
                        "    {:?} (seed {}, {:?}, difficulty {}): {}",
                        f.kind, f.seed, f.split, f.difficulty, f.message
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
    }
}
