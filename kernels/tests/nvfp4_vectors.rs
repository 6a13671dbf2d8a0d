//! Golden NVFP4 vectors (from the TransformerEngine reference, via the design fixtures):
//! quantization must match byte for byte, dequantization value for value.

use chorus_kernels::{Nvfp4Tensor, QuantizeOptions};

mod support;
use support::golden_cases;

#[test]
fn fixture_has_the_expected_cases() {
    let names: Vec<String> = golden_cases().into_iter().map(|c| c.name).collect();
    assert_eq!(names.len(), 7, "{names:?}");
}

#[test]
fn quantize_matches_golden_vectors_byte_for_byte() {
    for case in golden_cases() {
        let name = case.name.as_str();
        let q = Nvfp4Tensor::quantize(
            name,
            &case.input,
            case.rows,
            case.cols,
            &QuantizeOptions::default(),
        )
        .unwrap();
        assert_eq!(q.rows(), case.rows);
        assert_eq!(q.cols(), case.cols);
        assert_eq!(q.packed(), &case.packed[..], "{name}: packed");
        assert_eq!(q.scales(), &case.scales[..], "{name}: scales");
        assert_eq!(
            q.global_decode_scale(),
            case.global_decode_scale,
            "{name}: global decode scale"
        );

        let got = q.dequantize();
        assert_eq!(got.len(), case.dequantized.len());
        for (i, (g, w)) in got.iter().zip(&case.dequantized).enumerate() {
            // Zeros compare by value (+0 and -0 are both fine).
            assert_eq!(g, w, "{name}: dequantized[{i}]");
        }

        // Rebuilding from the stored parts gives the same tensor.
        let (rows, cols, packed, scales, s) = q.clone().into_parts();
        let again = Nvfp4Tensor::from_parts(name, rows, cols, packed, scales, s).unwrap();
        assert_eq!(again, q);
    }
}
