//! Policy weights on the wire: named f32 tensors cut into [`WeightChunk`]s of bounded size and
//! put back together, with the stream's checksum checked on arrival.

use std::collections::BTreeMap;

use crate::checksum::{ChecksumError, WeightVerifier, seal};
use crate::v1::{Dtype, WeightChunk};

/// One tensor: its shape and row-major f32 values.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub data: Vec<f32>,
}

/// Cuts `tensors` into chunks of at most `max_chunk_bytes` of data each and seals the stream
/// (checksum in the last chunk).
pub fn encode(
    run_id: &str,
    policy_version: u64,
    tensors: &BTreeMap<String, HostTensor>,
    max_chunk_bytes: usize,
) -> Vec<WeightChunk> {
    let per_chunk = (max_chunk_bytes / 4).max(1);
    let mut chunks = vec![];
    for (name, t) in tensors {
        let mut start = 0;
        loop {
            let end = (start + per_chunk).min(t.data.len());
            let mut data = Vec::with_capacity((end - start) * 4);
            for v in &t.data[start..end] {
                data.extend_from_slice(&v.to_le_bytes());
            }
            chunks.push(WeightChunk {
                run_id: run_id.to_string(),
                policy_version,
                chunk_index: chunks.len() as u32,
                tensor_name: name.clone(),
                dtype: Dtype::F32 as i32,
                shape: t.shape.iter().map(|&d| d as u64).collect(),
                offset: (start * 4) as u64,
                data: data.into(),
                last: false,
                digest: vec![],
                digest_algorithm: 0,
            });
            start = end;
            if start >= t.data.len() {
                break;
            }
        }
    }
    seal(&mut chunks, policy_version);
    chunks
}

/// Why a weight stream could not be assembled.
#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    /// The stream failed its integrity checks.
    #[error(transparent)]
    Checksum(#[from] ChecksumError),
    /// A tensor's chunks do not fit together.
    #[error("tensor `{name}`: {message}")]
    Tensor {
        /// The tensor.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// The stream ended before its last chunk.
    #[error("the stream ended before its last chunk")]
    Incomplete,
}

/// Values a tensor's buffer is given before its data arrives, at most: a stream's shapes are
/// not trusted (an absurd shape must not allocate before the data is there to fill it).
const MAX_PREALLOCATED_VALUES: usize = 16 << 20;

/// One tensor being received: its shape, the number of values it should hold (when the shape's
/// product fits in memory) and the values so far.
struct Receiving {
    shape: Vec<usize>,
    expected: Option<usize>,
    values: Vec<f32>,
}

/// Collects the chunks of one version and returns the tensors once the last chunk verified.
/// Values are decoded into each tensor's buffer as its chunks come (each chunk holds whole f32
/// values, in order), so a stream is copied once on arrival.
#[derive(Default)]
pub struct WeightAssembler {
    verifier: WeightVerifier,
    tensors: BTreeMap<String, Receiving>,
    version: Option<u64>,
    complete: bool,
}

impl WeightAssembler {
    /// An empty assembler.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a chunk; returns true once the stream's last chunk arrived and verified.
    pub fn push(&mut self, chunk: &WeightChunk) -> Result<bool, AssembleError> {
        let last = self.verifier.push(chunk)?;
        self.version = Some(chunk.policy_version);
        let bad = |m: String| AssembleError::Tensor {
            name: chunk.tensor_name.clone(),
            message: m,
        };
        if chunk.dtype != Dtype::F32 as i32 {
            return Err(bad("only f32 weights are supported".into()));
        }
        let shape: Vec<usize> = chunk.shape.iter().map(|&d| d as usize).collect();
        let entry = self
            .tensors
            .entry(chunk.tensor_name.clone())
            .or_insert_with(|| {
                // A checksum proves the stream is whole, not that its shapes are sane.
                let expected = shape
                    .iter()
                    .try_fold(1usize, |n, &d| n.checked_mul(d))
                    .filter(|n| n.checked_mul(4).is_some());
                Receiving {
                    values: Vec::with_capacity(expected.unwrap_or(0).min(MAX_PREALLOCATED_VALUES)),
                    shape: shape.clone(),
                    expected,
                }
            });
        if entry.shape != shape {
            return Err(bad("chunks disagree on the shape".into()));
        }
        if chunk.offset != entry.values.len() as u64 * 4 {
            return Err(bad("chunk offset does not follow the previous chunk".into()));
        }
        if !chunk.data.len().is_multiple_of(4) {
            return Err(bad(format!(
                "a chunk of {} bytes does not hold whole f32 values",
                chunk.data.len()
            )));
        }
        let n = chunk.data.len() / 4;
        if entry.expected.is_some_and(|e| entry.values.len() + n > e) {
            return Err(bad(format!(
                "more values than its shape {:?} holds",
                entry.shape
            )));
        }
        entry.values.extend(
            chunk
                .data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
        if last {
            self.complete = true;
        }
        Ok(last)
    }

    /// The policy version and tensors of a complete, verified stream.
    pub fn finish(self) -> Result<(u64, BTreeMap<String, HostTensor>), AssembleError> {
        if !self.complete {
            return Err(AssembleError::Incomplete);
        }
        self.verifier.finish()?;
        let mut out = BTreeMap::new();
        for (name, t) in self.tensors {
            let Some(n) = t.expected else {
                return Err(AssembleError::Tensor {
                    name,
                    message: format!("shape {:?} has more elements than fit in memory", t.shape),
                });
            };
            if t.values.len() != n {
                return Err(AssembleError::Tensor {
                    name,
                    message: format!("{} bytes for {n} f32 values", t.values.len() * 4),
                });
            }
            out.insert(
                name,
                HostTensor {
                    shape: t.shape,
                    data: t.values,
                },
            );
        }
        Ok((self.version.unwrap_or(0), out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BTreeMap<String, HostTensor> {
        let mut m = BTreeMap::new();
        m.insert(
            "a.weight".into(),
            HostTensor {
                shape: vec![3, 5],
                data: (0..15).map(|i| i as f32 * 0.5 - 2.0).collect(),
            },
        );
        m.insert(
            "b".into(),
            HostTensor {
                shape: vec![2],
                data: vec![f32::MIN_POSITIVE, -0.0],
            },
        );
        m
    }

    #[test]
    fn round_trips_through_small_chunks() {
        let chunks = encode("run", 7, &sample(), 8);
        assert!(chunks.len() > 3 && chunks.last().unwrap().last);
        let mut a = WeightAssembler::new();
        let mut done = false;
        for c in &chunks {
            done = a.push(c).unwrap();
        }
        assert!(done);
        let (v, t) = a.finish().unwrap();
        assert_eq!(v, 7);
        assert_eq!(t, sample());
    }

    #[test]
    fn a_changed_byte_or_a_missing_chunk_is_caught() {
        let mut chunks = encode("run", 1, &sample(), 8);
        let mut torn = chunks[1].data.to_vec();
        torn[0] ^= 1;
        chunks[1].data = torn.into();
        let mut a = WeightAssembler::new();
        let r: Result<Vec<bool>, _> = chunks.iter().map(|c| a.push(c)).collect();
        assert!(r.is_err() || a.finish().is_err());

        let mut chunks = encode("run", 1, &sample(), 8);
        chunks.remove(2);
        let mut a = WeightAssembler::new();
        assert!(
            chunks
                .iter()
                .try_for_each(|c| a.push(c).map(|_| ()))
                .is_err()
                || a.finish().is_err()
        );
    }
}

/// Why a weight stream did not give a version.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// The stream failed.
    #[error("the weight stream failed: {0}")]
    Stream(tonic::Status),
    /// The chunks of `version` do not make a valid version (checksum, shapes), or the stream
    /// ended early.
    #[error("{source}")]
    Assemble {
        /// The version the failing chunk belonged to, when one arrived.
        version: Option<u64>,
        /// What is wrong.
        source: AssembleError,
    },
    /// The transfer began but its next chunk did not come within the deadline.
    #[error(
        "the weight transfer stalled: no chunk for {deadline:?} after {chunks} of them; it was \
         abandoned"
    )]
    Stalled {
        /// The longest wait allowed for the next chunk.
        deadline: std::time::Duration,
        /// Chunks received before the stall.
        chunks: usize,
    },
}

/// Reads one version from a `StreamWeights` response to its verified last chunk.
pub async fn receive(
    stream: &mut tonic::Streaming<WeightChunk>,
) -> Result<(u64, BTreeMap<String, HostTensor>), ReceiveError> {
    receive_within(stream, None).await
}

/// [`receive`], abandoning a transfer whose next chunk takes longer than `chunk_deadline` once
/// the first has come (the wait for the first is the learner's long poll for a new version,
/// which may rightly take as long as a step).
pub async fn receive_within(
    stream: &mut tonic::Streaming<WeightChunk>,
    chunk_deadline: Option<std::time::Duration>,
) -> Result<(u64, BTreeMap<String, HostTensor>), ReceiveError> {
    receive_with_progress(stream, chunk_deadline, |_, _| {}).await
}

/// [`receive_within`], calling `progress(version, bytes received so far)` after each chunk
/// (for a progress bar).
pub async fn receive_with_progress(
    stream: &mut tonic::Streaming<WeightChunk>,
    chunk_deadline: Option<std::time::Duration>,
    mut progress: impl FnMut(u64, u64),
) -> Result<(u64, BTreeMap<String, HostTensor>), ReceiveError> {
    let mut assembler = WeightAssembler::new();
    let mut chunks = 0;
    let mut received = 0u64;
    loop {
        let next = match chunk_deadline.filter(|_| chunks > 0) {
            None => stream.message().await,
            Some(deadline) => tokio::time::timeout(deadline, stream.message())
                .await
                .map_err(|_| ReceiveError::Stalled { deadline, chunks })?,
        };
        let Some(chunk) = next.map_err(ReceiveError::Stream)? else {
            break;
        };
        chunks += 1;
        received += chunk.data.len() as u64;
        progress(chunk.policy_version, received);
        if assembler
            .push(&chunk)
            .map_err(|source| ReceiveError::Assemble {
                version: Some(chunk.policy_version),
                source,
            })?
        {
            break;
        }
    }
    assembler.finish().map_err(|source| ReceiveError::Assemble {
        version: None,
        source,
    })
}
