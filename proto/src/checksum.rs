//! Integrity of streamed weights.
//!
//! A policy version travels as a sequence of [`WeightChunk`]s. The sender feeds
//! every chunk to a [`WeightDigest`] and puts the result in the `sha256` field of
//! the last chunk (see [`seal`]); the receiver feeds the chunks it gets to a
//! [`WeightVerifier`], which also checks that chunks arrive gap-free and all
//! belong to one version.
//!
//! The digest covers each chunk's tensor name, dtype, shape, byte offset and
//! data, each length-prefixed, in stream order, so a chunk that is lost,
//! duplicated, reordered or relabelled changes the digest, not only a flipped byte.

use sha2::{Digest, Sha256};

use crate::v1::WeightChunk;

/// Length of a SHA-256 digest in bytes.
pub const SHA256_LEN: usize = 32;

/// Running SHA-256 over the chunks of one weight stream.
#[derive(Clone, Default)]
pub struct WeightDigest {
    hasher: Sha256,
}

impl WeightDigest {
    /// An empty digest.
    pub fn new() -> Self {
        Self::default()
    }

    /// Absorbs one chunk (its `sha256` and `last` fields are not covered).
    pub fn update(&mut self, chunk: &WeightChunk) {
        let h = &mut self.hasher;
        h.update((chunk.tensor_name.len() as u64).to_le_bytes());
        h.update(chunk.tensor_name.as_bytes());
        h.update(chunk.dtype.to_le_bytes());
        h.update((chunk.shape.len() as u64).to_le_bytes());
        for dim in &chunk.shape {
            h.update(dim.to_le_bytes());
        }
        h.update(chunk.offset.to_le_bytes());
        h.update((chunk.data.len() as u64).to_le_bytes());
        h.update(&chunk.data);
    }

    /// The digest of everything absorbed so far.
    pub fn finalize(self) -> [u8; SHA256_LEN] {
        self.hasher.finalize().into()
    }
}

/// Prepares chunks for sending: numbers them from 0, stamps `policy_version`,
/// marks the last one and stores the digest of all of them in it.
///
/// Does nothing to an empty slice.
pub fn seal(chunks: &mut [WeightChunk], policy_version: u64) {
    let mut digest = WeightDigest::new();
    let n = chunks.len();
    for (i, chunk) in chunks.iter_mut().enumerate() {
        chunk.chunk_index = u32::try_from(i).expect("more than u32::MAX chunks in one version");
        chunk.policy_version = policy_version;
        chunk.last = i + 1 == n;
        chunk.sha256.clear();
        digest.update(chunk);
    }
    if let Some(last) = chunks.last_mut() {
        last.sha256 = digest.finalize().to_vec();
    }
}

/// Why a weight stream was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChecksumError {
    /// A chunk index is not the next one expected.
    #[error("weight chunk out of order: expected index {expected}, got {got} (tensor {tensor:?})")]
    OutOfOrder {
        /// Index expected.
        expected: u32,
        /// Index received.
        got: u32,
        /// Tensor of the chunk received.
        tensor: String,
    },
    /// A chunk belongs to another policy version than the first chunk.
    #[error("weight chunk {chunk_index} is for policy version {got}, the stream is for {expected}")]
    VersionChanged {
        /// Version of the first chunk.
        expected: u64,
        /// Version of this chunk.
        got: u64,
        /// Index of this chunk.
        chunk_index: u32,
    },
    /// A chunk arrived after the one marked `last`.
    #[error("weight chunk {chunk_index} arrived after the last chunk")]
    AfterLast {
        /// Index of the extra chunk.
        chunk_index: u32,
    },
    /// The last chunk has no usable checksum.
    #[error(
        "last weight chunk of policy version {policy_version} carries {len} checksum bytes, expected {SHA256_LEN}"
    )]
    MissingChecksum {
        /// Version streamed.
        policy_version: u64,
        /// Bytes found in `sha256`.
        len: usize,
    },
    /// The checksum does not match the chunks received.
    #[error(
        "checksum mismatch for policy version {policy_version}: sender {expected}, received {actual}"
    )]
    Mismatch {
        /// Version streamed.
        policy_version: u64,
        /// Hex digest announced by the sender.
        expected: String,
        /// Hex digest of what was received.
        actual: String,
    },
    /// The stream ended before a chunk marked `last`.
    #[error("weight stream ended after {received} chunks without a last chunk")]
    Incomplete {
        /// Chunks received.
        received: u32,
    },
}

/// Checks a weight stream chunk by chunk, as it arrives.
#[derive(Clone, Default)]
pub struct WeightVerifier {
    digest: WeightDigest,
    next_index: u32,
    version: Option<u64>,
    done: bool,
}

impl WeightVerifier {
    /// A verifier expecting chunk 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks one chunk. Returns `Ok(true)` once the last chunk has arrived and the
    /// whole version matched its checksum, `Ok(false)` while more are expected.
    pub fn push(&mut self, chunk: &WeightChunk) -> Result<bool, ChecksumError> {
        if self.done {
            return Err(ChecksumError::AfterLast {
                chunk_index: chunk.chunk_index,
            });
        }
        if chunk.chunk_index != self.next_index {
            return Err(ChecksumError::OutOfOrder {
                expected: self.next_index,
                got: chunk.chunk_index,
                tensor: chunk.tensor_name.clone(),
            });
        }
        let version = *self.version.get_or_insert(chunk.policy_version);
        if chunk.policy_version != version {
            return Err(ChecksumError::VersionChanged {
                expected: version,
                got: chunk.policy_version,
                chunk_index: chunk.chunk_index,
            });
        }
        self.digest.update(chunk);
        self.next_index += 1;
        if !chunk.last {
            return Ok(false);
        }
        self.done = true;
        if chunk.sha256.len() != SHA256_LEN {
            return Err(ChecksumError::MissingChecksum {
                policy_version: version,
                len: chunk.sha256.len(),
            });
        }
        let actual = std::mem::take(&mut self.digest).finalize();
        if actual[..] != chunk.sha256[..] {
            return Err(ChecksumError::Mismatch {
                policy_version: version,
                expected: to_hex(&chunk.sha256),
                actual: to_hex(&actual),
            });
        }
        Ok(true)
    }

    /// Call when the stream ends: fails unless the last chunk was verified.
    pub fn finish(self) -> Result<(), ChecksumError> {
        if self.done {
            Ok(())
        } else {
            Err(ChecksumError::Incomplete {
                received: self.next_index,
            })
        }
    }
}

/// Lower-case hex of a byte string (for logs and the ledger).
pub fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::Dtype;

    fn chunk(name: &str, offset: u64, data: &[u8]) -> WeightChunk {
        WeightChunk {
            run_id: "run-1".into(),
            tensor_name: name.into(),
            dtype: Dtype::Bf16 as i32,
            shape: vec![2, 3],
            offset,
            data: data.to_vec().into(),
            ..Default::default()
        }
    }

    fn sealed() -> Vec<WeightChunk> {
        let mut chunks = vec![
            chunk("a.weight", 0, &[1, 2, 3, 4, 5, 6]),
            chunk("a.weight", 6, &[7, 8, 9, 10, 11, 12]),
            chunk("b.bias", 0, &[0xff; 4]),
        ];
        seal(&mut chunks, 7);
        chunks
    }

    fn verify(chunks: &[WeightChunk]) -> Result<(), ChecksumError> {
        let mut v = WeightVerifier::new();
        for c in chunks {
            v.push(c)?;
        }
        v.finish()
    }

    #[test]
    fn sealed_stream_verifies() {
        let chunks = sealed();
        assert_eq!(chunks[2].sha256.len(), SHA256_LEN);
        assert!(chunks[..2].iter().all(|c| c.sha256.is_empty() && !c.last));
        assert!(chunks[2].last);
        assert_eq!(
            chunks.iter().map(|c| c.chunk_index).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        let mut v = WeightVerifier::new();
        assert_eq!(v.push(&chunks[0]), Ok(false));
        assert_eq!(v.push(&chunks[1]), Ok(false));
        assert_eq!(v.push(&chunks[2]), Ok(true));
        assert_eq!(v.finish(), Ok(()));
    }

    #[test]
    fn digest_is_sha256_of_the_documented_layout() {
        let c = chunk("t", 5, &[9, 8]);
        let mut expected = Sha256::new();
        expected.update(1u64.to_le_bytes());
        expected.update(b"t");
        expected.update((Dtype::Bf16 as i32).to_le_bytes());
        expected.update(2u64.to_le_bytes());
        expected.update(2u64.to_le_bytes());
        expected.update(3u64.to_le_bytes());
        expected.update(5u64.to_le_bytes());
        expected.update(2u64.to_le_bytes());
        expected.update([9u8, 8]);
        let expected: [u8; 32] = expected.finalize().into();
        let mut d = WeightDigest::new();
        d.update(&c);
        assert_eq!(d.finalize(), expected);
    }

    #[test]
    fn flipped_byte_is_a_mismatch() {
        let mut chunks = sealed();
        let mut torn = chunks[1].data.to_vec();
        torn[0] ^= 1;
        chunks[1].data = torn.into();
        assert!(matches!(
            verify(&chunks),
            Err(ChecksumError::Mismatch {
                policy_version: 7,
                ..
            })
        ));
    }

    #[test]
    fn relabelled_chunk_is_a_mismatch() {
        let mut chunks = sealed();
        chunks[2].tensor_name = "c.bias".into();
        assert!(matches!(
            verify(&chunks),
            Err(ChecksumError::Mismatch { .. })
        ));
        let mut chunks = sealed();
        chunks[0].offset = 1;
        assert!(matches!(
            verify(&chunks),
            Err(ChecksumError::Mismatch { .. })
        ));
    }

    #[test]
    fn gaps_duplicates_and_mixed_versions_are_rejected() {
        let chunks = sealed();
        assert_eq!(
            verify(&[chunks[0].clone(), chunks[2].clone()]),
            Err(ChecksumError::OutOfOrder {
                expected: 1,
                got: 2,
                tensor: "b.bias".into()
            })
        );
        assert!(matches!(
            verify(&[chunks[0].clone(), chunks[0].clone()]),
            Err(ChecksumError::OutOfOrder {
                expected: 1,
                got: 0,
                ..
            })
        ));
        let mut other = chunks.clone();
        other[1].policy_version = 8;
        assert_eq!(
            verify(&other),
            Err(ChecksumError::VersionChanged {
                expected: 7,
                got: 8,
                chunk_index: 1
            })
        );
    }

    #[test]
    fn truncated_or_unsealed_streams_are_rejected() {
        let chunks = sealed();
        assert_eq!(
            verify(&chunks[..2]),
            Err(ChecksumError::Incomplete { received: 2 })
        );
        let mut unsealed = chunks.clone();
        unsealed[2].sha256.clear();
        assert_eq!(
            verify(&unsealed),
            Err(ChecksumError::MissingChecksum {
                policy_version: 7,
                len: 0
            })
        );
        let mut v = WeightVerifier::new();
        for c in &chunks {
            v.push(c).unwrap();
        }
        let mut extra = chunks[2].clone();
        extra.chunk_index = 3;
        assert_eq!(
            v.push(&extra),
            Err(ChecksumError::AfterLast { chunk_index: 3 })
        );
    }

    #[test]
    fn hex_is_lower_case_and_padded() {
        assert_eq!(to_hex(&[0x00, 0x0f, 0xab]), "000fab");
    }
}
