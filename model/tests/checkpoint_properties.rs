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
