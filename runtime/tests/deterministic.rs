//! `deterministic = true` makes a run repeat bit for bit whatever the timing: the same short
//! config runs twice through the library with two workers, the second time with one worker
//! slowed down on every decode step, and the ledgers (every trajectory by id, every learner
//! step, every published version's digest, the last one being the final weights) and the
//! held-out curve must be identical.

use std::collections::BTreeMap;
use std::time::Duration;

use chorus_orchestrator::config::RunConfig;
use chorus_orchestrator::ledger::{Ledger, NewTrajectory, RolloutFilter};
use chorus_runtime::{LocalRun, RunPlan, Summary, run_local};

const MODEL: &str = r#"{"model_type": "nemotron_h", "vocab_size": 272, "hidden_size": 32,
  "hybrid_override_pattern": "M*E", "mamba_num_heads": 4, "mamba_head_dim": 8,
  "ssm_state_size": 8, "n_groups": 1, "conv_kernel": 4, "chunk_size": 8,
  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
  "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
  "moe_shared_expert_intermediate_size": 16, "eos_token_id": 2}"#;

// A warm-up (groups of a step reach the learner in any order) and RL on an environment with
// graded rewards (so advantages are not all zero) at max_staleness = 1, sampled at temperature
// 1 so that a different version or batch would change the tokens.
const CONFIG: &str = r#"
name = "det"
seed = 11
deterministic = true
[model]
init_config = "model.json"
[workers]
count = 2
max_batch = 4
max_in_flight = 4
[[stages]]
name = "warmup"
kind = "sft"
steps = 2
prompts_per_step = 3
environments = [{ name = "arithmetic" }]
[[stages]]
name = "rl"
kind = "rl"
steps = 4
prompts_per_step = 2
group_size = 4
max_new_tokens = 6
max_staleness = 1
drop_zero_variance = false
environments = [{ name = "chat_rm" }]
sampling = { temperature = 1.0 }
"#;

/// The slowed worker sleeps this long after each decode step: many times a step's own time.
const DELAY: Duration = Duration::from_millis(25);

/// What a run left behind, with the run id taken out of every id.
struct Outcome {
    trajectories: BTreeMap<String, NewTrajectory>,
    steps: Vec<String>,
    versions: Vec<(u64, u64, String, u64)>,
    curve: Vec<(u64, u64)>,
    /// Generation time of each trajectory, in milliseconds.
    generate_ms: BTreeMap<String, u64>,
}

fn run(slow: Option<&str>) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("model.json"), MODEL).unwrap();
    let cfg = RunConfig::from_toml_relative_to(CONFIG, "det.toml", dir.path()).unwrap();
    assert!(cfg.deterministic);
    // Two held-out tasks, evaluated after every RL step too (pinned to their versions).
    let mut plan = RunPlan::new(cfg, CONFIG.to_string(), 2, 1).unwrap();
    if let Some(worker) = slow {
        plan.test_decode_delay.insert(worker.to_string(), DELAY);
    }
    let local = LocalRun {
        db: None,
        runs_dir: dir.path().join("runs"),
        token: None,
        plugin_token: None,
        resume: false,
        from_stage: None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let summary: Summary = rt.block_on(run_local(&plan, local)).unwrap();
    let db = format!(
        "sqlite://{}",
        dir.path().join("runs/det/ledger.sqlite").display()
    );
    let run_id = summary.run.clone();
    let strip = |s: &str| s.replace(&run_id, "RUN");
    rt.block_on(async {
        let ledger = Ledger::open(&db).await.unwrap();
        let listed = ledger
            .list_rollouts(&RolloutFilter {
                run_id: Some(run_id.clone()),
                limit: 100_000,
                ..Default::default()
            })
            .await
            .unwrap();
        let mut trajectories = BTreeMap::new();
        let mut generate_ms = BTreeMap::new();
        for r in listed {
            let mut t = ledger
                .get_trajectory(&r.id)
                .await
                .unwrap()
                .unwrap()
                .trajectory;
            let id = strip(&t.id);
            generate_ms.insert(id.clone(), t.timings.generate_ms);
            // Timings are how the run happened, not what it produced.
            t.timings = Default::default();
            for s in [&mut t.id, &mut t.run_id, &mut t.prompt_id, &mut t.group_id] {
                *s = strip(s);
            }
            trajectories.insert(id, t);
        }
        let steps = ledger
            .list_learner_steps(&run_id)
            .await
            .unwrap()
            .into_iter()
            .map(|r| {
                let s = r.step;
                let bits = |x: Option<f64>| x.map(f64::to_bits);
                format!(
                    "{} {} {:?} {:?} {:?} {:?} {:?} {:?} {} {} {:?} {:?}",
                    s.step,
                    s.policy_version,
                    bits(s.loss),
                    bits(s.kl),
                    bits(s.entropy),
                    bits(s.grad_norm),
                    bits(s.learning_rate),
                    bits(s.clip_fraction),
                    s.num_tokens,
                    s.num_trajectories,
                    bits(s.mean_abs_logprob_diff),
                    s.skip_reason
                )
            })
            .collect();
        let versions = ledger
            .list_policy_versions(&run_id)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.version)
            .map(|v| (v.version, v.learner_step, v.weights_digest, v.num_bytes))
            .collect();
        Outcome {
            trajectories,
            steps,
            versions,
            curve: summary
                .curve
                .iter()
                .map(|p| (p.version, p.mean_accuracy.to_bits()))
                .collect(),
            generate_ms,
        }
    })
}

#[test]
fn a_deterministic_run_repeats_bit_for_bit_with_a_slowed_worker() {
    let a = run(None);
    let b = run(Some("w1"));

    // The slowed run really ran differently: the slowed worker generated trajectories (each
    // at least one sleep per token after the first long), and the pool, which prefers the less loaded
    // worker, spread the rollouts over the workers in another way.
    let slowed: Vec<&String> = b
        .trajectories
        .iter()
        .filter(|(_, t)| t.worker_id == "w1" && !t.completion_token_ids.is_empty())
        .map(|(id, _)| id)
        .collect();
    assert!(!slowed.is_empty(), "the slowed worker generated nothing");
    for id in &slowed {
        // A job is answered within the step of its last token, before that step's sleep.
        let sleeps = b.trajectories[*id].completion_token_ids.len() as u64 - 1;
        assert!(
            b.generate_ms[*id] >= sleeps * DELAY.as_millis() as u64,
            "{id}: {} ms with {sleeps} sleeps",
            b.generate_ms[*id]
        );
    }
    let workers = |o: &Outcome| -> BTreeMap<String, String> {
        o.trajectories
            .iter()
            .map(|(id, t)| (id.clone(), t.worker_id.clone()))
            .collect()
    };
    assert_ne!(
        workers(&a),
        workers(&b),
        "the slowed run placed every rollout on the same worker as the other"
    );

    // Everything a run produced is the same; only which worker produced it differs.
    let produced = |o: &Outcome| -> BTreeMap<String, NewTrajectory> {
        o.trajectories
            .iter()
            .map(|(id, t)| {
                let mut t = t.clone();
                t.worker_id.clear();
                (id.clone(), t)
            })
            .collect()
    };
    let (pa, pb) = (produced(&a), produced(&b));
    assert_eq!(
        pa.keys().collect::<Vec<_>>(),
        pb.keys().collect::<Vec<_>>(),
        "different trajectory ids"
    );
    let rl: Vec<&NewTrajectory> = pa.values().filter(|t| !t.logprobs.is_empty()).collect();
    assert!(rl.len() >= 4 * 2 * 4, "{} RL trajectories", rl.len());
    for (id, ta) in &pa {
        let tb = &pb[id];
        let bits = |t: &NewTrajectory| t.logprobs.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(ta), bits(tb), "{id}: logprobs");
        assert_eq!(
            ta.reward.map(f64::to_bits),
            tb.reward.map(f64::to_bits),
            "{id}: reward"
        );
        assert_eq!(ta, tb, "{id}");
    }
    // Pinned: every RL token of step s comes from one version, and not always the first.
    let mut seen_versions = std::collections::BTreeSet::new();
    for t in &rl {
        let v = t.policy_versions[0];
        assert!(
            t.policy_versions.iter().all(|&x| x == v),
            "{}: {:?}",
            t.id,
            t.policy_versions
        );
        seen_versions.insert(v);
    }
    assert!(seen_versions.len() >= 3, "{seen_versions:?}");

    assert_eq!(a.steps.len(), 6, "{:?}", a.steps);
    assert_eq!(a.steps, b.steps, "learner steps");
    assert_eq!(a.versions.len(), 6);
    assert_eq!(
        a.versions, b.versions,
        "published versions (the last: the final weights)"
    );
    assert_eq!(a.curve, b.curve, "held-out curve");
}
