//! Property tests of checkpoint reading: a safetensors file with any header (absurd shapes,
//! overlapping or out-of-range offsets, unknown dtypes, NVFP4 tensor names with nonsense
//! sizes) is refused with an error that names the file, never a panic or a huge allocation.

use candle_core::Device;
use chorus_model::checkpoint::{load_tensors, tensor_names};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

fn dtype() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("F32".to_string()),
        Just("BF16".to_string()),
        Just("F16".to_string()),
        Just("U8".to_string()),
        Just("F8_E4M3".to_string()),
        Just("I64".to_string()),
        "[A-Z0-9_]{1,6}",
    ]
}

fn dimension() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..8,
        Just(1 << 20),
        Just(1 << 31),
        Just(1 << 40),
        Just(u64::MAX / 3)
    ]
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("backbone.embeddings.weight".to_string()),
        Just("backbone.layers.0.mixer.in_proj.weight".to_string()),
        Just("backbone.layers.0.mixer.in_proj.weight_scale".to_string()),
        Just("backbone.layers.0.mixer.in_proj.weight_scale_2".to_string()),
        Just("backbone.layers.0.mixer.in_proj.input_scale".to_string()),
        "[a-z_.]{1,12}",
    ]
}

fn header() -> impl Strategy<Value = (Value, usize)> {
    let entry = (
        name(),
        dtype(),
        prop::collection::vec(dimension(), 0..4),
        0u64..200,
        0u64..200,
    );
    (prop::collection::vec(entry, 0..5), 0usize..256).prop_map(|(entries, data_len)| {
        let mut map = Map::new();
        for (name, dtype, shape, a, b) in entries {
            map.insert(
                name,
                json!({"dtype": dtype, "shape": shape, "data_offsets": [a, b]}),
            );
        }
        (Value::Object(map), data_len)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn any_safetensors_header_is_read_or_refused_by_name((header, data_len) in header()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let text = header.to_string();
        let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
        bytes.extend(text.as_bytes());
        bytes.extend(std::iter::repeat_n(7u8, data_len));
        std::fs::write(&path, &bytes).unwrap();
        let _ = tensor_names(dir.path());
        if let Err(e) = load_tensors(dir.path(), &Device::Cpu) {
            let message = e.to_string();
            prop_assert!(message.contains("model.safetensors"), "{message}");
        }
    }

    #[test]
    fn a_header_length_beyond_the_file_is_refused(len in 0u64..u64::MAX, body in prop::collection::vec(any::<u8>(), 0..64)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let mut bytes = len.to_le_bytes().to_vec();
        bytes.extend(&body);
        std::fs::write(&path, &bytes).unwrap();
        prop_assert!(tensor_names(dir.path()).is_err() || len as usize <= body.len());
        let loaded = load_tensors(dir.path(), &Device::Cpu);
        prop_assert!(loaded.is_err() || len as usize <= body.len());
    }
}

/// A well-formed safetensors file whose tensors are each valid but may disagree with one
/// another: NVFP4 packed weights, block scales and global scales of mismatched sizes.
fn consistent_file() -> impl Strategy<Value = Vec<u8>> {
    let tensor = (
        prop_oneof![
            Just("backbone.layers.0.mixer.in_proj.weight"),
            Just("backbone.layers.0.mixer.in_proj.weight_scale"),
            Just("backbone.layers.0.mixer.in_proj.weight_scale_2"),
            Just("backbone.layers.0.mixer.in_proj.input_scale"),
            Just("backbone.norm_f.weight"),
        ],
        prop_oneof![
            Just(("U8", 1usize)),
            Just(("F8_E4M3", 1)),
            Just(("F32", 4)),
            Just(("BF16", 2))
        ],
        prop::collection::vec(0usize..6, 0..3),
    );
    prop::collection::vec(tensor, 1..6).prop_map(|tensors| {
        let mut map = Map::new();
        let mut offset = 0usize;
        for (name, (dtype, size), shape) in tensors {
            let bytes = shape.iter().product::<usize>() * size;
            map.insert(
                name.to_string(),
                json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes]}),
            );
            offset += bytes;
        }
        let text = Value::Object(map).to_string();
        let mut file = (text.len() as u64).to_le_bytes().to_vec();
        file.extend(text.as_bytes());
        file.extend(std::iter::repeat_n(0x3Cu8, offset));
        file
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn valid_files_of_mismatched_nvfp4_tensors_are_read_or_refused_without_a_panic(file in consistent_file()) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model.safetensors"), &file).unwrap();
        prop_assert!(tensor_names(dir.path()).is_ok());
        if let Err(e) = load_tensors(dir.path(), &Device::Cpu) {
            let message = e.to_string();
            prop_assert!(!message.is_empty());
        }
    }
}

/// A valid one-tensor safetensors file.
fn small_file() -> Vec<u8> {
    let text =
        json!({"backbone.norm_f.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})
            .to_string();
    let mut file = (text.len() as u64).to_le_bytes().to_vec();
    file.extend(text.as_bytes());
    file.extend([0u8; 8]);
    file
}

/// What an index's `weight_map` may name as a tensor's shard.
#[derive(Clone, Debug)]
enum Shard {
    /// A valid shard inside the directory.
    Inside,
    /// A file inside that does not exist.
    Missing,
    /// A valid file outside the directory, reached by `..`.
    Parent,
    /// The same file by its absolute path.
    Absolute,
    /// A directory, not a file.
    Directory,
    /// Not a string at all.
    NotAString(Value),
    /// The empty name.
    Empty,
}

fn shard() -> impl Strategy<Value = Shard> {
    prop_oneof![
        3 => Just(Shard::Inside),
        1 => Just(Shard::Missing),
        1 => Just(Shard::Parent),
        1 => Just(Shard::Absolute),
        1 => Just(Shard::Directory),
        1 => prop_oneof![Just(Value::Null), Just(json!(7)), Just(json!(["a"]))].prop_map(Shard::NotAString),
        1 => Just(Shard::Empty),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, .. ProptestConfig::default() })]

    /// An index whose `weight_map` names shards outside the checkpoint directory, missing
    /// ones, directories or non-strings is refused naming the index or the shard, and nothing
    /// outside the directory is read.
    #[test]
    fn an_index_naming_shards_outside_the_directory_is_refused(shards in prop::collection::vec(shard(), 1..4)) {
        let outer = tempfile::tempdir().unwrap();
        let dir = outer.path().join("ckpt");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(outer.path().join("outside.safetensors"), small_file()).unwrap();
        std::fs::write(dir.join("inside.safetensors"), small_file()).unwrap();
        let mut map = Map::new();
        for (i, s) in shards.iter().enumerate() {
            let v = match s {
                Shard::Inside => json!("inside.safetensors"),
                Shard::Missing => json!("missing.safetensors"),
                Shard::Parent => json!("../outside.safetensors"),
                Shard::Absolute => json!(outer.path().join("outside.safetensors").display().to_string()),
                Shard::Directory => json!("sub"),
                Shard::NotAString(v) => v.clone(),
                Shard::Empty => json!(""),
            };
            map.insert(format!("t{i}"), v);
        }
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            json!({"weight_map": map}).to_string(),
        )
        .unwrap();
        let all_inside = shards.iter().all(|s| matches!(s, Shard::Inside));
        for result in [
            tensor_names(&dir).map(drop),
            load_tensors(&dir, &Device::Cpu).map(drop),
        ] {
            match result {
                Ok(()) => prop_assert!(all_inside, "{shards:?} was read"),
                Err(e) => {
                    prop_assert!(!all_inside, "{e}");
                    let message = e.to_string();
                    prop_assert!(
                        message.contains("model.safetensors.index.json")
                            || message.contains("missing.safetensors")
                            || message.contains("sub"),
                        "{message}"
                    );
                }
            }
        }
    }
}

/// A `config.json` size: tiny, or big enough that its tensors overflow or pass the limit.
fn size() -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => 1u64..5,
        1 => Just(1 << 20),
        1 => Just(1 << 40),
        1 => Just(u64::MAX / 3),
        1 => Just(u64::MAX),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, .. ProptestConfig::default() })]

    /// A `config.json` of any sizes is refused, or initialises a model; one whose tensors would
    /// pass `MAX_INIT_PARAMETERS` (or overflow) is refused before anything is allocated.
    #[test]
    fn a_config_of_absurd_sizes_is_refused_before_allocating(
        (vocab, hidden, heads, head_dim, inter) in (size(), size(), size(), size(), size()),
    ) {
        let text = json!({
            "model_type": "nemotron_h", "vocab_size": vocab, "hidden_size": hidden,
            "hybrid_override_pattern": "*-", "num_attention_heads": heads,
            "num_key_value_heads": 1, "head_dim": head_dim, "intermediate_size": inter,
        })
        .to_string();
        let Ok(cfg) = chorus_model::NemotronHConfig::from_json_str(&text) else {
            return Ok(());
        };
        // The largest tensors: embeddings and head, the query and output projections, the MLP.
        let product = |dims: &[u64]| dims.iter().fold(2u128, |a, &d| a.saturating_mul(d as u128));
        let parameters = product(&[vocab, hidden])
            .saturating_add(product(&[heads, head_dim, hidden]))
            .saturating_add(product(&[inter, hidden]));
        match chorus_model::checkpoint::init_params(&cfg, 0, &Device::Cpu) {
            Ok(_) => prop_assert!(parameters < 1 << 37, "{parameters} parameters were allocated"),
            Err(e) => {
                let message = e.to_string();
                prop_assert!(parameters >= chorus_model::checkpoint::MAX_INIT_PARAMETERS as u128, "{message}");
                prop_assert!(message.contains("parameters") && message.contains('`'), "{message}");
            }
        }
    }
}
