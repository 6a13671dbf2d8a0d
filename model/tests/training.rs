//! The training forward pass: gradients reach every parameter (backbone and MTP head), agree
//! with finite differences, and the fused f32 CPU ops agree with the composed ones.

mod common;

use candle_core::{D, DType, Device, IndexOp, Tensor};
use chorus_model::{NemotronH, Params};
use common::*;

/// Next-token cross-entropy plus the MTP head's losses at depths 1 and 2.
fn loss(model: &NemotronH, ids: &Tensor) -> Tensor {
    let (_, t) = ids.dims2().unwrap();
    let hidden = model.hidden(ids).unwrap();
    let logits = model.logits(&hidden).unwrap();
    let ce = |logits: &Tensor, targets: &Tensor| {
        let v = logits.dim(D::Minus1).unwrap();
        candle_nn::loss::cross_entropy(
            &logits.reshape(((), v)).unwrap(),
            &targets.flatten_all().unwrap(),
        )
        .unwrap()
    };
    let mut total = ce(
        &logits.narrow(1, 0, t - 1).unwrap(),
        &ids.narrow(1, 1, t - 1).unwrap(),
    );
    for (k, l) in model
        .mtp_logits(ids, &hidden, 2)
        .unwrap()
        .iter()
        .enumerate()
    {
        let depth = k + 1;
        let len = t - depth - 1;
        let part = ce(
            &l.narrow(1, 0, len).unwrap(),
            &ids.narrow(1, depth + 1, len).unwrap(),
        );
        total = (total + (part * 0.3).unwrap()).unwrap();
    }
    total
}

fn batch() -> Tensor {
    let rows: Vec<Vec<u32>> = (0..2)
        .map(|b| {
            (0..11)
                .map(|i| ((i * 7 + b * 13 + 3) % 40) as u32)
                .collect()
        })
        .collect();
    Tensor::new(rows, &Device::Cpu).unwrap()
}

fn setup() -> (chorus_model::NemotronHConfig, Params) {
    let cfg = small_config("MEM*-E", Some(16), true);
    let params = random_params(&cfg, 5);
    (cfg, params)
}

/// The same model in f64, so that finite differences are not drowned in rounding.
fn setup_f64() -> (chorus_model::NemotronHConfig, Params) {
    let (cfg, params) = setup();
    (cfg, params.to_dtype(DType::F64).unwrap())
}

#[test]
fn every_parameter_gets_a_nonzero_gradient() {
    let (cfg, params) = setup();
    let model = NemotronH::new(&cfg, &params).unwrap();
    let grads = loss(&model, &batch()).backward().unwrap();
    let mut missing = vec![];
    for (name, var) in params.vars() {
        // The routing bias is a buffer updated by load balancing, not by gradients.
        if name.ends_with("e_score_correction_bias") {
            continue;
        }
        let g = grads.get(var.as_tensor());
        let norm = g
            .map(|g| {
                g.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            })
            .unwrap_or(0.0);
        if !(norm > 0.0 && norm.is_finite()) {
            missing.push(name.clone());
        }
    }
    assert!(
        params.vars().keys().any(|n| n.starts_with("mtp.")),
        "config has an MTP head"
    );
    assert!(missing.is_empty(), "no gradient for {missing:?}");
}

#[test]
fn gradients_agree_with_finite_differences() {
    let (cfg, params) = setup_f64();
    let model = NemotronH::new(&cfg, &params).unwrap();
    let ids = batch();
    let grads = loss(&model, &ids).backward().unwrap();
    let probes = [
        ("backbone.layers.0.mixer.A_log", 1),
        ("backbone.layers.0.mixer.dt_bias", 2),
        ("backbone.layers.0.mixer.conv1d.weight", 5),
        ("backbone.layers.0.mixer.in_proj.weight", 40),
        ("backbone.layers.3.mixer.q_proj.weight", 17),
        ("backbone.layers.1.mixer.gate.weight", 3),
        ("backbone.layers.1.mixer.fc1_latent_proj.weight", 9),
        ("backbone.layers.4.mixer.up_proj.weight", 21),
        ("backbone.norm_f.weight", 4),
        ("mtp.eh_proj.weight", 30),
    ];
    let eval = || loss(&model, &ids).to_scalar::<f64>().unwrap();
    for (name, index) in probes {
        let var = &params.vars()[name];
        let analytic = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .i(index)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let original = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let eps = 1e-5f64;
        let at = |delta: f64| {
            let mut v = original.clone();
            v[index] += delta;
            var.set(&Tensor::from_vec(v, var.dims(), &Device::Cpu).unwrap())
                .unwrap();
            eval()
        };
        let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
        var.set(&Tensor::from_vec(original, var.dims(), &Device::Cpu).unwrap())
            .unwrap();
        let tol = 1e-3 * analytic.abs().max(numeric.abs()) + 1e-7;
        assert!(
            (analytic - numeric).abs() <= tol,
            "{name}[{index}]: analytic {analytic:.6} vs numeric {numeric:.6}"
        );
        assert!(
            analytic.abs() > 1e-7,
            "{name}[{index}] has a zero gradient; pick another probe"
        );
    }
}

/// In f32 on the CPU the Mamba-2 conv, scan and gated norm, attention and the routed experts
/// run as fused ops with their own backward passes; in f64 they are composed from candle's ops,
/// whose gradients the test above checks against finite differences. The two must agree on
/// every parameter's gradient, and on the loss.
#[test]
fn fused_f32_gradients_agree_with_the_composed_f64_gradients() {
    let (cfg, params) = setup();
    let params64 = params.to_dtype(DType::F64).unwrap();
    let ids = batch();
    let model = NemotronH::new(&cfg, &params).unwrap();
    let model64 = NemotronH::new(&cfg, &params64).unwrap();
    let (loss32, loss64) = (loss(&model, &ids), loss(&model64, &ids));
    let (l32, l64) = (
        loss32.to_scalar::<f32>().unwrap() as f64,
        loss64.to_scalar::<f64>().unwrap(),
    );
    assert!((l32 - l64).abs() <= 1e-5 * l64.abs(), "loss {l32} vs {l64}");
    let (g32, g64) = (loss32.backward().unwrap(), loss64.backward().unwrap());
    let mut compared = 0;
    for (name, var) in params.vars() {
        if name.ends_with("e_score_correction_bias") {
            continue;
        }
        let flat = |g: &Tensor| -> Vec<f64> {
            g.to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let got = flat(g32.get(var.as_tensor()).expect("f32 gradient"));
        let want = flat(
            g64.get(params64.vars()[name].as_tensor())
                .expect("f64 gradient"),
        );
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        let diff = got
            .iter()
            .zip(&want)
            .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            diff <= 1e-3 * scale + 1e-7,
            "{name}: f32 gradient off by {diff} (largest {scale})"
        );
        compared += 1;
    }
    assert!(compared > 20, "compared {compared} parameters");
}
