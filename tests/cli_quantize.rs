//! `chorus quantize` end to end: the golden NVFP4 vectors through the checkpoint path, the
//! ModelOpt layout on tiny_a, and the way back.

mod harness;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use harness::*;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn raw(path: &std::path::Path) -> HashMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect()
}

#[test]
fn golden_vectors_come_out_byte_for_byte() {
    let h = Harness::new();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("nvfp4/vectors.json")).unwrap())
            .unwrap();
    for case in v["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let shape: Vec<usize> = case["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        let input: Vec<f32> = case["input"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        let file = h.path(&format!("{name}.safetensors"));
        let t = Tensor::from_vec(input, shape.clone(), &Device::Cpu).unwrap();
        candle_core::safetensors::save(
            &HashMap::from([("w.up_proj.weight".to_string(), t)]),
            &file,
        )
        .unwrap();
        let out = h.path(&format!("{name}-q"));
        h.ok(&["quantize", "--input", s(&file), "--output", s(&out)]);
        let q = raw(&out.join("model.safetensors"));
        assert_eq!(
            hex(&q["w.up_proj.weight"].2),
            case["packed_hex"].as_str().unwrap(),
            "{name}: packed"
        );
        assert_eq!(q["w.up_proj.weight_scale"].0, safetensors::Dtype::F8_E4M3);
        assert_eq!(
            hex(&q["w.up_proj.weight_scale"].2),
            case["scales_e4m3_hex"].as_str().unwrap(),
            "{name}: scales"
        );
        let g = f32::from_le_bytes(q["w.up_proj.weight_scale_2"].2.clone().try_into().unwrap());
        assert_eq!(
            g,
            case["global_decode_scale"].as_f64().unwrap() as f32,
            "{name}: global scale"
        );
    }
}

#[test]
fn tiny_a_round_trips_in_the_modelopt_layout() {
    let h = Harness::new();
    let src = fixture("nemotron_h/tiny_a");
    let q = h.path("q");
    h.ok(&[
        "quantize",
        "--input",
        s(&src),
        "--output",
        s(&q),
        "--exclude",
        "*.q_proj.weight",
    ]);
    let t = raw(&q.join("model.safetensors"));
    let (dt, shape, _) = &t["backbone.layers.0.mixer.in_proj.weight"];
    assert_eq!(
        (*dt, shape.clone()),
        (safetensors::Dtype::U8, vec![196, 32])
    );
    assert_eq!(
        t["backbone.layers.0.mixer.in_proj.weight_scale"].1,
        vec![196, 4]
    );
    assert_eq!(
        t["backbone.layers.1.mixer.experts.3.up_proj.weight"].1,
        vec![32, 16]
    );
    assert!(
        t["backbone.layers.0.mixer.in_proj.weight_scale_2"]
            .1
            .is_empty()
    );
    // Kept in full precision: excluded, embeddings, lm_head, router gates, norms.
    for name in [
        "backbone.layers.2.mixer.q_proj.weight",
        "backbone.embeddings.weight",
        "lm_head.weight",
        "backbone.layers.1.mixer.gate.weight",
        "backbone.norm_f.weight",
    ] {
        assert_eq!(t[name].0, safetensors::Dtype::F32, "{name}");
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(q.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["quantization_config"]["quant_algo"], "NVFP4");

    let back = h.path("back");
    h.ok(&[
        "quantize",
        "--dequantize",
        "--input",
        s(&q),
        "--output",
        s(&back),
    ]);
    let orig = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let deq = candle_core::safetensors::load(back.join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(orig.len(), deq.len());
    for (name, o) in &orig {
        let d = &deq[name];
        assert_eq!(d.dtype(), DType::F32);
        let err = (o - d)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let norm = o
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        if name.ends_with("_proj.weight") && !name.contains("q_proj") {
            let rel = err / norm;
            assert!(
                rel > 0.0 && rel < 0.02,
                "{name}: relative squared error {rel}"
            );
        } else {
            assert_eq!(err, 0.0, "{name} should be copied unchanged");
        }
    }
    // The dequantized checkpoint is a working model.
    let out = h.ok(&[
        "generate",
        "--checkpoint",
        s(&back),
        "--prompt-ids",
        "5,6,7",
        "--max-new-tokens",
        "4",
        "--json",
    ]);
    assert!(out.contains("tokens"));
    // Int8 activations need NVFP4 projections: the quantized checkpoint has them, the
    // dequantized one none.
    fn int8(checkpoint: &std::path::Path) -> [&str; 8] {
        [
            "generate",
            "--checkpoint",
            s(checkpoint),
            "--prompt-ids",
            "5,6,7",
            "--max-new-tokens",
            "4",
            "--int8-activations",
        ]
    }
    let out = h.ok(&int8(&q));
    assert!(out.contains("int8 activations"), "{out}");
    let err = h.fails(&int8(&back));
    assert!(err.contains("--quantize nvfp4"), "{err}");
}
