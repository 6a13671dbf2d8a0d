//! Golden NVFP4 vectors (from the TransformerEngine reference, via the design fixtures):
//! quantization must match byte for byte, dequantization value for value.

use chorus_kernels::{Nvfp4Tensor, QuantizeOptions};
use serde_json::Value;

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn cases() -> Vec<Value> {
    let text = include_str!("fixtures/nvfp4_vectors.json");
    let root: Value = serde_json::from_str(text).unwrap();
    root["cases"].as_array().unwrap().clone()
}

#[test]
fn fixture_has_the_expected_cases() {
    let names: Vec<String> = cases()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names.len(), 7, "{names:?}");
}

#[test]
fn quantize_matches_golden_vectors_byte_for_byte() {
    for case in cases() {
        let name = case["name"].as_str().unwrap();
        let shape: Vec<usize> = case["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let input: Vec<f32> = case["input"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let q = Nvfp4Tensor::quantize(
            name,
            &input,
            shape[0],
            shape[1],
            &QuantizeOptions::default(),
        )
        .unwrap();
        assert_eq!(q.rows(), shape[0]);
        assert_eq!(q.cols(), shape[1]);
        assert_eq!(
            q.packed(),
            &hex(case["packed_hex"].as_str().unwrap())[..],
            "{name}: packed"
        );
        assert_eq!(
            q.scales(),
            &hex(case["scales_e4m3_hex"].as_str().unwrap())[..],
            "{name}: scales"
        );
        let s_dec = case["global_decode_scale"].as_f64().unwrap() as f32;
        assert_eq!(
            q.global_decode_scale(),
            s_dec,
            "{name}: global decode scale"
        );

        let want: Vec<f32> = case["dequantized"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let got = q.dequantize();
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            // Zeros compare by value (+0 and -0 are both fine).
            assert_eq!(g, w, "{name}: dequantized[{i}]");
        }

        // Rebuilding from the stored parts gives the same tensor.
        let (rows, cols, packed, scales, s) = q.clone().into_parts();
        let again = Nvfp4Tensor::from_parts(name, rows, cols, packed, scales, s).unwrap();
        assert_eq!(again, q);
    }
}
