//! `chorus loss` against a second implementation of the objective definitions, written here
//! from the contract alone: the loss literally as defined, its gradient by central differences
//! in f64, on random batches through every algorithm, correction, aggregation and KL estimator.
//! The batch goes in and the result comes out through safetensors files written and read with
//! the `safetensors` crate, not with the code under test.

mod harness;

use std::collections::HashMap;

use harness::*;

#[derive(Clone)]
struct Batch {
    b: usize,
    t: usize,
    lp: Vec<f64>,
    old: Vec<f64>,
    beh: Vec<f64>,
    adv: Vec<f64>,
    mask: Vec<u8>,
    reference: Vec<f64>,
}

struct Settings {
    algorithm: &'static str,
    correction: &'static str,
    aggregation: &'static str,
    estimator: &'static str,
    eps_low: f64,
    eps_high: f64,
    tis_cap: f64,
    icepop_low: f64,
    icepop_high: f64,
    kl_coef: f64,
}

fn clip(x: f64, lo: f64, hi: f64) -> f64 {
    x.max(lo).min(hi)
}

/// The loss exactly as the contract states it.
fn reference_loss(s: &Settings, x: &Batch, lp: &[f64]) -> f64 {
    let (b, t) = (x.b, x.t);
    let m = |i: usize, j: usize| x.mask[i * t + j] as f64;
    let rho = |p: usize| (x.old[p] - x.beh[p]).exp();
    let mut w = vec![0.0; b * t];
    for i in 0..b {
        let n: f64 = (0..t).map(|j| m(i, j)).sum();
        let log_gm: f64 = (0..t)
            .map(|j| m(i, j) * (x.old[i * t + j] - x.beh[i * t + j]))
            .sum();
        let gm = if n > 0.0 { (log_gm / n).exp() } else { 1.0 };
        for j in 0..t {
            let p = i * t + j;
            w[p] = match s.correction {
                "none" => 1.0,
                "tis" => rho(p).min(s.tis_cap),
                "icepop" if rho(p) >= s.icepop_low && rho(p) <= s.icepop_high => rho(p),
                "icepop" => 0.0,
                "seq_mask_tis" if gm >= s.icepop_low && gm <= s.icepop_high => {
                    rho(p).min(s.tis_cap)
                }
                "seq_mask_tis" => 0.0,
                other => panic!("{other}"),
            };
        }
    }
    let (lo, hi) = (1.0 - s.eps_low, 1.0 + s.eps_high);
    let mut loss_tok = vec![0.0; b * t];
    for i in 0..b {
        let a = x.adv[i];
        let n: f64 = (0..t).map(|j| m(i, j)).sum();
        let seq_ratio = if n > 0.0 {
            ((0..t)
                .map(|j| m(i, j) * (lp[i * t + j] - x.old[i * t + j]))
                .sum::<f64>()
                / n)
                .exp()
        } else {
            1.0
        };
        let seq_w = if n > 0.0 {
            (0..t).map(|j| m(i, j) * w[i * t + j]).sum::<f64>() / n
        } else {
            0.0
        };
        for j in 0..t {
            let p = i * t + j;
            let r = (lp[p] - x.old[p]).exp();
            let o = match s.algorithm {
                "grpo" | "dapo" | "dr_grpo" => w[p] * (r * a).min(clip(r, lo, hi) * a),
                "cispo" => w[p] * clip(r, lo, hi) * a * lp[p],
                "reinforce" => w[p] * a * lp[p],
                "gspo" => seq_w * (seq_ratio * a).min(clip(seq_ratio, lo, hi) * a),
                other => panic!("{other}"),
            };
            let kl = if s.kl_coef > 0.0 {
                let d = x.reference[p] - lp[p];
                match s.estimator {
                    "k1" => lp[p] - x.reference[p],
                    _ => d.exp() - d - 1.0,
                }
            } else {
                0.0
            };
            loss_tok[p] = -o + s.kl_coef * kl;
        }
    }
    match s.aggregation {
        "token_mean" => {
            let num: f64 = (0..b * t).map(|p| loss_tok[p] * x.mask[p] as f64).sum();
            let den: f64 = x.mask.iter().map(|&v| v as f64).sum();
            num / den
        }
        "seq_mean_token_mean" => {
            let mut sum = 0.0;
            let mut count = 0.0;
            for i in 0..b {
                let n: f64 = (0..t).map(|j| m(i, j)).sum();
                if n > 0.0 {
                    sum += (0..t).map(|j| loss_tok[i * t + j] * m(i, j)).sum::<f64>() / n;
                    count += 1.0;
                }
            }
            sum / count
        }
        "seq_mean_token_sum_norm" => {
            (0..b * t)
                .map(|p| loss_tok[p] * x.mask[p] as f64)
                .sum::<f64>()
                / (b * t) as f64
        }
        other => panic!("{other}"),
    }
}

fn random_batch(seed: u64, b: usize, t: usize) -> Batch {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut u = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let old: Vec<f64> = (0..b * t).map(|_| -4.0 * u() - 0.05).collect();
    // f32 on the way in: the reference must see the very values the CLI reads.
    let f = |v: f64| v as f32 as f64;
    let lp: Vec<f64> = old.iter().map(|o| f(o + 0.6 * u() - 0.3)).collect();
    let beh: Vec<f64> = old.iter().map(|o| f(o + 1.0 * u() - 0.5)).collect();
    let reference: Vec<f64> = old.iter().map(|o| f(o + 0.8 * u() - 0.4)).collect();
    let adv: Vec<f64> = (0..b).map(|_| f(4.0 * u() - 2.0)).collect();
    let mut mask: Vec<u8> = (0..b * t).map(|_| (u() < 0.75) as u8).collect();
    // Every sequence keeps a token except the last, which has none (it must not count).
    for i in 0..b - 1 {
        mask[i * t] = 1;
    }
    for j in 0..t {
        mask[(b - 1) * t + j] = 0;
    }
    Batch {
        b,
        t,
        lp,
        old: old.into_iter().map(f).collect(),
        beh,
        adv,
        mask,
        reference,
    }
}

fn f32_bytes(v: &[f64]) -> Vec<u8> {
    v.iter().flat_map(|x| (*x as f32).to_le_bytes()).collect()
}

fn write_batch(path: &std::path::Path, x: &Batch) {
    use safetensors::Dtype;
    use safetensors::tensor::TensorView;
    let bt = vec![x.b, x.t];
    let data: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = vec![
        ("logprobs", Dtype::F32, bt.clone(), f32_bytes(&x.lp)),
        ("old_logprobs", Dtype::F32, bt.clone(), f32_bytes(&x.old)),
        (
            "behaviour_logprobs",
            Dtype::F32,
            bt.clone(),
            f32_bytes(&x.beh),
        ),
        ("advantages", Dtype::F32, vec![x.b], f32_bytes(&x.adv)),
        ("mask", Dtype::U8, bt.clone(), x.mask.clone()),
        ("ref_logprobs", Dtype::F32, bt, f32_bytes(&x.reference)),
    ];
    let views: Vec<(&str, TensorView<'_>)> = data
        .iter()
        .map(|(n, d, s, b)| (*n, TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn read_output(path: &std::path::Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            assert_eq!(v.dtype(), safetensors::Dtype::F32, "{n}");
            let values = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (n, (v.shape().to_vec(), values))
        })
        .collect()
}

fn defaults(algorithm: &str) -> (f64, f64, &'static str) {
    match algorithm {
        "grpo" => (0.2, 0.2, "seq_mean_token_mean"),
        "dapo" => (0.2, 0.28, "token_mean"),
        "dr_grpo" => (0.2, 0.2, "seq_mean_token_sum_norm"),
        "gspo" => (3e-4, 4e-4, "seq_mean_token_mean"),
        _ => (0.2, 0.28, "token_mean"),
    }
}

#[test]
fn the_loss_and_its_gradient_agree_with_a_second_implementation() {
    let h = Harness::new();
    let input = h.path("batch.safetensors");
    let output = h.path("out.safetensors");
    let mut checked = 0;
    for (seed, algorithm) in ["grpo", "dapo", "dr_grpo", "gspo", "cispo", "reinforce"]
        .into_iter()
        .enumerate()
    {
        let batch = random_batch(seed as u64 + 1, 4, 6);
        write_batch(&input, &batch);
        for correction in ["none", "tis", "icepop", "seq_mask_tis"] {
            for (aggregation, estimator, kl_coef) in [
                (None, "k3", 0.0),
                (Some("token_mean"), "k1", 0.2),
                (Some("seq_mean_token_mean"), "k3", 0.2),
                (Some("seq_mean_token_sum_norm"), "k3", 0.05),
            ] {
                let (mut eps_low, mut eps_high, default_aggregation) = defaults(algorithm);
                if algorithm == "gspo" {
                    // The published range is so narrow that every sequence would be clipped.
                    (eps_low, eps_high) = (0.1, 0.1);
                }
                let settings = Settings {
                    algorithm,
                    correction,
                    aggregation: aggregation.unwrap_or(default_aggregation),
                    estimator,
                    eps_low,
                    eps_high,
                    tis_cap: 1.5,
                    icepop_low: 0.7,
                    icepop_high: 1.6,
                    kl_coef,
                };
                let mut options = vec![
                    format!("correction={correction}"),
                    "tis_cap=1.5".into(),
                    "icepop_low=0.7".into(),
                    "icepop_high=1.6".into(),
                    format!("kl_coef={kl_coef}"),
                    format!("kl_estimator={estimator}"),
                    format!("eps_low={eps_low}"),
                    format!("eps_high={eps_high}"),
                ];
                if let Some(a) = aggregation {
                    options.push(format!("aggregation={a}"));
                }
                let mut args = vec!["loss", "--algorithm", algorithm];
                for o in &options {
                    args.extend(["--option", o.as_str()]);
                }
                args.extend(["--input", s(&input), "--output", s(&output)]);
                h.ok(&args);
                let out = read_output(&output);
                let (loss_shape, loss) = &out["loss"];
                assert!(loss_shape.is_empty(), "loss is a scalar: {loss_shape:?}");
                let (grad_shape, grad) = &out["grad_logprobs"];
                assert_eq!(grad_shape, &vec![batch.b, batch.t]);

                let what = format!(
                    "{algorithm} {correction} {} {estimator}",
                    settings.aggregation
                );
                let want = reference_loss(&settings, &batch, &batch.lp);
                assert!(
                    (loss[0] as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "{what}: loss {} but the definition gives {want}",
                    loss[0]
                );
                for (p, &analytic) in grad.iter().enumerate() {
                    let step = 1e-6;
                    // CISPO's weight clip(r) is a stop-gradient: its derivative holds r and
                    // rho fixed, so `old` and `beh` move with `lp` there.
                    let moved = |d: f64| {
                        let mut b = batch.clone();
                        b.lp[p] += d;
                        if algorithm == "cispo" {
                            b.old[p] += d;
                            b.beh[p] += d;
                        }
                        reference_loss(&settings, &b, &b.lp)
                    };
                    let numeric = (moved(step) - moved(-step)) / (2.0 * step);
                    assert!(
                        (analytic as f64 - numeric).abs() <= 1e-4 * (1.0 + numeric.abs()),
                        "{what}: gradient at {p} is {analytic} but differences give {numeric}"
                    );
                    if batch.mask[p] == 0 {
                        assert_eq!(analytic, 0.0, "{what}: masked position {p}");
                    }
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 6 * 4 * 4);
}

#[test]
fn bad_batches_and_settings_are_named() {
    let h = Harness::new();
    let input = h.path("batch.safetensors");
    let output = h.path("out.safetensors");
    let mut batch = random_batch(9, 2, 3);
    write_batch(&input, &batch);
    let err = h.fails(&[
        "loss",
        "--algorithm",
        "ppo",
        "--input",
        s(&input),
        "--output",
        s(&output),
    ]);
    assert!(
        err.contains("grpo, dapo, dr_grpo, gspo, cispo, reinforce"),
        "{err}"
    );
    let err = h.fails(&[
        "loss",
        "--option",
        "eps=0.1",
        "--input",
        s(&input),
        "--output",
        s(&output),
    ]);
    assert!(
        err.contains("eps") && err.contains("allowed: algorithm, eps_low"),
        "{err}"
    );
    let err = h.fails(&[
        "loss",
        "--option",
        "eps_high",
        "--input",
        s(&input),
        "--output",
        s(&output),
    ]);
    assert!(err.contains("KEY=VALUE"), "{err}");
    batch.mask[1] = 2;
    write_batch(&input, &batch);
    let err = h.fails(&["loss", "--input", s(&input), "--output", s(&output)]);
    assert!(err.contains("`mask` holds 2; allowed: 0 or 1"), "{err}");
    std::fs::write(&input, b"not a tensor file").unwrap();
    let err = h.fails(&["loss", "--input", s(&input), "--output", s(&output)]);
    assert!(err.contains("safetensors"), "{err}");
}
