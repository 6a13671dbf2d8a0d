//! How the training benchmarks time a step: forward and backward of next-token
//! cross-entropy on candle, as the learner's step does before its optimizer update.

use std::time::Instant;

use candle_core::{Device, Tensor};
use chorus_model::NemotronH;

/// Token ids of a `(batch, seq)` training batch: `((k * 13 + 5) % (vocab - 3)) + 3` for the
/// k-th id in row-major order (the peers benchmark's PyTorch side builds the same batch).
pub fn training_batch(batch: usize, seq: usize, vocab: usize) -> Tensor {
    let ids: Vec<u32> = (0..batch * seq)
        .map(|k| ((k * 13 + 5) % (vocab - 3) + 3) as u32)
        .collect();
    Tensor::from_vec(ids, (batch, seq), &Device::Cpu).unwrap()
}

/// Trained tokens per second (batch x seq per forward + backward), the best of `repeats` runs
/// after one untimed warm-up.
pub fn training_tokens_per_second(model: &NemotronH, ids: &Tensor, repeats: usize) -> f64 {
    let (batch, seq) = ids.dims2().unwrap();
    let step = || {
        let logits = model.forward(ids).unwrap();
        let vocab = logits.dim(2).unwrap();
        let predicted = logits
            .narrow(1, 0, seq - 1)
            .unwrap()
            .reshape(((), vocab))
            .unwrap();
        let targets = ids.narrow(1, 1, seq - 1).unwrap().flatten_all().unwrap();
        let loss = candle_nn::loss::cross_entropy(&predicted, &targets).unwrap();
        loss.backward().unwrap();
    };
    step();
    (0..repeats)
        .map(|_| {
            let t = Instant::now();
            step();
            (batch * seq) as f64 / t.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}
