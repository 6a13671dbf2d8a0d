//! Property tests of the run configuration: a valid file with any of its values replaced
//! (negative, huge, non-finite, of the wrong type), keys removed, unknown keys added, or its
//! stage list emptied is either read or refused with a [`ConfigError`] that names the key it
//! comes from. No file makes reading it panic.

use chorus_orchestrator::config::{ConfigError, RunConfig};
use proptest::prelude::*;
use toml::{Table, Value};

/// A valid configuration that uses most tables and keys, so mutations reach them.
const BASE: &str = r#"
name = "props"
seed = 3
deterministic = false

[model]
init_config = "m.json"
init_seed = 1

[workers]
count = 2
max_batch = 8
max_in_flight = 16
device = "cpu"

[learner]
max_grad_norm = 1.0
eps_low = 0.2
eps_high = 0.28
checkpoint_every = 5
checkpoint_keep = 2
router_bias_rate = 0.001

[environment_faults]
deadline_seconds = 30.0
error_budget = 5
probe_seconds = 10.0

[[stages]]
name = "warmup"
kind = "sft"
steps = 3
prompts_per_step = 4
lr = 1e-3
warmup_steps = 1
environments = [{ name = "arithmetic" }]

[[stages]]
name = "rl"
kind = "rlvr"
algorithm = "dapo"
steps = 5
prompts_per_step = 4
group_size = 4
max_staleness = 1
max_prompt_tokens = 256
max_new_tokens = 16
lr = 3e-4
lr_decay = "cosine"
min_lr = 1e-5
kl_coef = 0.1
kl_estimator = "k3"
advantage = "leave_one_out"
advantage_clip = 5.0
curriculum = "pass_rate"
curriculum_samples = 4
max_turns = 2
until = { metric = "heldout_accuracy", at_least = 0.9, every = 2 }
environments = [
  { name = "arithmetic", weight = 2.0, difficulty = 1 },
  { url = "http://127.0.0.1:9000", weight = 1.0 },
]
sampling = { temperature = 0.9, top_p = 0.95, top_k = 20, think_budget = 64 }
"#;

/// One step of a path into the TOML document.
#[derive(Clone, Debug, PartialEq)]
enum Seg {
    Key(String),
    Index(usize),
}

/// The dotted key [`ConfigError`] uses: `stages[1].environments[0].weight`.
fn dotted(path: &[Seg]) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Seg::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

/// Every key of the document (tables and arrays too), depth first.
fn paths(value: &Value, prefix: &mut Vec<Seg>, out: &mut Vec<Vec<Seg>>) {
    match value {
        Value::Table(t) => {
            for (k, v) in t {
                prefix.push(Seg::Key(k.clone()));
                out.push(prefix.clone());
                paths(v, prefix, out);
                prefix.pop();
            }
        }
        Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                if v.is_table() {
                    prefix.push(Seg::Index(i));
                    paths(v, prefix, out);
                    prefix.pop();
                }
            }
        }
        _ => {}
    }
}

/// The value at `path`'s parent, as a table or array.
fn parent_mut<'a>(root: &'a mut Value, path: &[Seg]) -> Option<&'a mut Value> {
    let mut at = root;
    for seg in &path[..path.len() - 1] {
        at = match (seg, at) {
            (Seg::Key(k), Value::Table(t)) => t.get_mut(k)?,
            (Seg::Index(i), Value::Array(a)) => a.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(at)
}

/// Keys the raw structs know that the base file leaves out, by table: setting them reaches
/// checks (and arithmetic) the base never exercises.
const OPTIONAL_STAGE_KEYS: &[&str] = &[
    "group_size",
    "prompts_per_step",
    "max_prompt_tokens",
    "max_new_tokens",
    "curriculum_pool",
    "curriculum_samples",
    "norm_length",
    "tis_cap",
    "icepop_low",
    "icepop_high",
    "correction",
    "aggregation",
    "invalid_advantage",
    "length_coef_answer",
    "length_coef_reasoning",
    "data",
    "data_weight",
    "router",
    "rm",
    "reward_model",
    "comparisons",
    "pairs_from",
    "train_pairs",
    "heldout_pairs",
    "domain_ratios",
    "drop_zero_variance",
    "advantage_std_normalize",
    "steps",
    "max_staleness",
    "warmup_steps",
];

/// A value of any TOML type, biased towards the edges: negative, zero, huge, non-finite, the
/// names of enum values, empty collections.
fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Integer(-1)),
        Just(Value::Integer(0)),
        Just(Value::Integer(1)),
        Just(Value::Integer(1_000_000_000)),
        Just(Value::Integer(i64::MAX)),
        Just(Value::Integer(i64::MIN)),
        any::<i64>().prop_map(Value::Integer),
        Just(Value::Float(f64::NAN)),
        Just(Value::Float(f64::INFINITY)),
        Just(Value::Float(f64::NEG_INFINITY)),
        Just(Value::Float(-0.5)),
        Just(Value::Float(0.0)),
        Just(Value::Float(1e300)),
        any::<f64>().prop_map(Value::Float),
        any::<bool>().prop_map(Value::Boolean),
        prop_oneof![
            Just("".to_string()),
            Just("sft".to_string()),
            Just("rlvr".to_string()),
            Just("reward_model".to_string()),
            Just("mtp_heal".to_string()),
            Just("genrm".to_string()),
            Just("grpo".to_string()),
            Just("cosine".to_string()),
            Just("pass_rate".to_string()),
            Just("nvfp4".to_string()),
            Just("vllm".to_string()),
            Just("torch".to_string()),
            Just("cuda:99999999999999999999".to_string()),
            Just("arithmetic".to_string()),
            "\\PC{0,12}",
        ]
        .prop_map(Value::String),
        Just(Value::Array(vec![])),
        prop::collection::vec(any::<i64>().prop_map(Value::Integer), 1..3).prop_map(Value::Array),
        Just(Value::Table(Table::new())),
    ]
}

/// One change to the document.
#[derive(Clone, Debug)]
enum Mutation {
    /// Replace the value of the `n`th key (modulo the number of keys).
    Set(usize, Value),
    /// Remove the `n`th key.
    Remove(usize),
    /// Add a key no raw struct knows to the table holding the `n`th key.
    Unknown(usize, String),
    /// Set a key the base leaves out in stage `n` (modulo the stages).
    Optional(usize, usize, Value),
    /// Empty the list of stages.
    NoStages,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), value()).prop_map(|(n, v)| Mutation::Set(n, v)),
        2 => any::<usize>().prop_map(Mutation::Remove),
        1 => (any::<usize>(), "[a-z_]{1,10}").prop_map(|(n, k)| Mutation::Unknown(n, k)),
        3 => (any::<usize>(), 0..OPTIONAL_STAGE_KEYS.len(), value())
            .prop_map(|(n, k, v)| Mutation::Optional(n, k, v)),
        1 => Just(Mutation::NoStages),
    ]
}

/// Applies `m` to `doc`, returning the path of the key it changed (`None` when it changed
/// nothing: the key was already gone, or an "unknown" key happens to be a known one).
fn apply(doc: &mut Value, m: &Mutation) -> Option<Vec<Seg>> {
    let mut all = vec![];
    paths(doc, &mut vec![], &mut all);
    let pick = |n: usize| all[n % all.len()].clone();
    match m {
        Mutation::Set(n, v) => {
            let path = pick(*n);
            set(doc, &path, v.clone())?;
            Some(path)
        }
        Mutation::Remove(n) => {
            let path = pick(*n);
            let Seg::Key(key) = path.last()? else {
                return None;
            };
            match parent_mut(doc, &path)? {
                Value::Table(t) => t.remove(key)?,
                _ => return None,
            };
            Some(path)
        }
        Mutation::Unknown(n, key) => {
            let mut path = pick(*n);
            path.pop();
            let table = if path.is_empty() {
                doc.as_table_mut()?
            } else {
                let mut probe = path.clone();
                probe.push(Seg::Key(String::new()));
                match parent_mut(doc, &probe)? {
                    Value::Table(t) => t,
                    _ => return None,
                }
            };
            // A name a raw struct knows is not unknown; skip it rather than guess which.
            if table.contains_key(key) || known(key) {
                return None;
            }
            table.insert(key.clone(), Value::Integer(1));
            path.push(Seg::Key(key.clone()));
            Some(path)
        }
        Mutation::Optional(n, k, v) => {
            let stages = doc.get("stages")?.as_array()?.len();
            if stages == 0 {
                return None;
            }
            let path = vec![
                Seg::Key("stages".into()),
                Seg::Index(n % stages),
                Seg::Key(OPTIONAL_STAGE_KEYS[*k].into()),
            ];
            let Some(Value::Table(t)) = parent_mut(doc, &path) else {
                return None;
            };
            t.insert(OPTIONAL_STAGE_KEYS[*k].into(), v.clone());
            Some(path)
        }
        Mutation::NoStages => {
            doc.as_table_mut()?
                .insert("stages".into(), Value::Array(vec![]));
            Some(vec![Seg::Key("stages".into())])
        }
    }
}

/// Whether some raw struct of the configuration may know `key` (then an "unknown" key of that
/// name is not one).
fn known(key: &str) -> bool {
    let mut all = vec![];
    paths(
        &BASE.parse::<Table>().unwrap().into(),
        &mut vec![],
        &mut all,
    );
    OPTIONAL_STAGE_KEYS.contains(&key)
        || all
            .iter()
            .any(|p| matches!(p.last(), Some(Seg::Key(k)) if k == key))
        || [
            "kind",
            "url",
            "dataset",
            "tokenizer",
            "checkpoint",
            "quantize",
            "backend",
            "vllm",
            "torch",
            "keep_attention_f32",
            "quantize_forward",
            "tis_cap",
            "aggregation",
            "metric",
            "at_least",
            "every",
            "weight",
            "name",
            "difficulty",
            "max_turns",
        ]
        .contains(&key)
}

fn set(doc: &mut Value, path: &[Seg], v: Value) -> Option<()> {
    match (path.last()?, parent_mut(doc, path)?) {
        (Seg::Key(k), Value::Table(t)) => {
            t.insert(k.clone(), v);
        }
        (Seg::Index(i), Value::Array(a)) => *a.get_mut(*i)? = v,
        _ => return None,
    }
    Some(())
}

/// The key names of a path (no indices): `stages[1].sampling.top_p` → `stages`, `sampling`,
/// `top_p`.
fn names(path: &[Seg]) -> Vec<&str> {
    path.iter()
        .filter_map(|s| match s {
            Seg::Key(k) => Some(k.as_str()),
            Seg::Index(_) => None,
        })
        .collect()
}

/// Whether `e` names the key `changed` or one it is checked together with: the key itself or
/// the table holding it (`model` for a missing `model.init_config`), a sibling in the same
/// table (`stages[1].algorithm` when `stages[1].kind` became `sft`), a key of the same name
/// elsewhere (a duplicate stage name), or the key in its message (a TOML type error names the
/// line's key, an unknown one its name).
fn names_key(e: &ConfigError, changed: &[Seg]) -> bool {
    let key = dotted(changed);
    let parent = dotted(&changed[..changed.len() - 1]);
    let leaf = names(changed).last().copied().unwrap_or_default();
    // `stages[1].top_p`, or a TOML table header `[stages.sampling.top_p]` from the parser.
    let err_leaf = e
        .key
        .trim_matches(['[', ']'])
        .rsplit('.')
        .next()
        .unwrap_or_default()
        .split('[')
        .next()
        .unwrap_or_default();
    key == e.key
        || key.starts_with(&format!("{}.", e.key))
        || key.starts_with(&format!("{}[", e.key))
        || (!parent.is_empty() && e.key.starts_with(&format!("{parent}.")))
        || err_leaf == leaf
        || e.message.contains(&format!("`{leaf}`"))
        || names(changed).iter().any(|n| *n == e.key)
}

#[test]
fn the_base_configuration_is_valid() {
    RunConfig::from_toml_str(BASE, "base.toml").unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, .. ProptestConfig::default() })]

    #[test]
    fn any_mutated_config_is_read_or_refused_by_key(mutations in prop::collection::vec(mutation(), 1..3)) {
        let mut doc: Value = BASE.parse::<Table>().unwrap().into();
        let changed: Vec<Vec<Seg>> = mutations.iter().filter_map(|m| apply(&mut doc, m)).collect();
        let text = toml::to_string(&doc).unwrap();
        match RunConfig::from_toml_str(&text, "mutated.toml") {
            Ok(_) => {}
            Err(e) => {
                prop_assert!(e.file == "mutated.toml", "{e}");
                prop_assert!(!e.key.is_empty() && e.key != "<file>", "no key named: {e}\n{text}");
                prop_assert!(!e.message.is_empty(), "{e}");
                prop_assert!(
                    changed.iter().any(|c| names_key(&e, c)),
                    "the error names none of the changed keys {:?}: {e}\n{text}",
                    changed.iter().map(|c| dotted(c)).collect::<Vec<_>>()
                );
            }
        }
    }

    /// Arbitrary text, and TOML-looking lines of arbitrary keys and values, never panic the
    /// reader, and a refusal always names the file.
    #[test]
    fn any_text_is_read_or_refused(lines in prop::collection::vec(
        prop_oneof![
            "[a-z_\\[\\]\\.]{1,16} = [-0-9.e\"a-z\\[\\]{}, ]{0,16}",
            Just("[[stages]]".to_string()),
            Just("[model]".to_string()),
            "\\PC{0,24}",
        ],
        0..12,
    )) {
        let text = lines.join("\n");
        if let Err(e) = RunConfig::from_toml_str(&text, "any.toml") {
            prop_assert!(e.to_string().starts_with("any.toml: `"), "{e}");
            prop_assert!(!e.key.is_empty(), "{e}");
        }
    }
}

/// Every key of the base file and every optional stage key, set in turn to each value at the
/// edges (negative, zero, huge, non-finite, of the wrong type): read, or refused by its key.
/// Exhaustive where the random search above is sparse (one key among fifty meets one edge
/// value among twenty).
#[test]
fn every_key_at_every_edge_is_read_or_refused_by_key() {
    let base: Value = BASE.parse::<Table>().unwrap().into();
    let mut keys = vec![];
    paths(&base, &mut vec![], &mut keys);
    let stages = base["stages"].as_array().unwrap().len();
    for i in 0..stages {
        for k in OPTIONAL_STAGE_KEYS {
            let key = vec![
                Seg::Key("stages".into()),
                Seg::Index(i),
                Seg::Key((*k).into()),
            ];
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
    }
    let edges = [
        Value::Integer(-1),
        Value::Integer(0),
        Value::Integer(i64::MAX),
        Value::Integer(i64::MIN),
        Value::Integer(1 << 40),
        Value::Float(f64::NAN),
        Value::Float(f64::INFINITY),
        Value::Float(-1e300),
        Value::Float(1e300),
        Value::String(String::new()),
        Value::Boolean(true),
        Value::Array(vec![]),
    ];
    let mut refused = 0;
    let mut failures = vec![];
    for key in &keys {
        for v in &edges {
            let mut doc = base.clone();
            if set(&mut doc, key, v.clone()).is_none() {
                continue;
            }
            let text = toml::to_string(&doc).unwrap();
            let read = std::panic::catch_unwind(|| RunConfig::from_toml_str(&text, "edge.toml"));
            match read {
                Err(_) => failures.push(format!("`{}` = {v}: reading it panicked", dotted(key))),
                Ok(Err(e)) => {
                    refused += 1;
                    if !names_key(&e, key) {
                        failures.push(format!(
                            "`{}` = {v}: the error does not name it: {e}",
                            dotted(key)
                        ));
                    }
                }
                Ok(Ok(_)) => {}
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Most edge values are wrong somewhere: the loop did reach the checks.
    assert!(
        refused > keys.len(),
        "{refused} refusals of {} keys",
        keys.len()
    );
}
