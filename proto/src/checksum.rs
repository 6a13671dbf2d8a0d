//! Integrity of streamed weights.
//!
//! A policy version travels as a sequence of [`WeightChunk`]s. The sender feeds
//! every chunk to a [`WeightDigest`] and puts the result in the `digest` field of
//! the last chunk (see [`seal`]); the receiver feeds the chunks it gets to a
//! [`WeightVerifier`], which also checks that chunks arrive gap-free and all
//! belong to one version.
//!
//! The digest covers each chunk's tensor name, dtype, shape, byte offset and
//! data, each length-prefixed, in stream order, so a chunk that is lost,
//! duplicated, reordered or relabelled changes the digest, not only a flipped byte.
//!
//! Two hashes are understood, named on every chunk by `digest_algorithm`: BLAKE3, which
//! Chorus' learner seals with (several GB/s on one core with AVX-512 or AVX2, so a worker
//! verifying a version while receiving it is not held to SHA-256's ~1 GB/s), and SHA-256, which
//! other senders may use (the PyTorch learner, with Python's standard `hashlib`) and which a
//! chunk that names no algorithm means.

use sha2::{Digest, Sha256};

use crate::v1::{DigestAlgorithm, WeightChunk};

/// Length of a digest in bytes (both algorithms give 32).
pub const DIGEST_LEN: usize = 32;

/// The algorithm Chorus' own senders seal with.
pub const DEFAULT_ALGORITHM: DigestAlgorithm = DigestAlgorithm::Blake3;

/// Running hash over the chunks of one weight stream.
#[derive(Clone)]
pub enum WeightDigest {
    /// SHA-256.
    Sha256(Sha256),
    /// BLAKE3 (boxed: its hasher keeps a stack of chaining values, ~2 KB).
    Blake3(Box<blake3::Hasher>),
}

impl WeightDigest {
    /// An empty digest made with `algorithm`.
    pub fn new(algorithm: DigestAlgorithm) -> Self {
        match algorithm {
            DigestAlgorithm::Sha256 => Self::Sha256(Sha256::new()),
            DigestAlgorithm::Blake3 => Self::Blake3(Box::default()),
        }
    }

    fn absorb(&mut self, bytes: &[u8]) {
        match self {
            Self::Sha256(h) => h.update(bytes),
            Self::Blake3(h) => {
                h.update(bytes);
            }
        }
    }

    /// Absorbs one chunk (its `digest`, `digest_algorithm` and `last` fields are not covered).
    pub fn update(&mut self, chunk: &WeightChunk) {
        self.absorb(&(chunk.tensor_name.len() as u64).to_le_bytes());
        self.absorb(chunk.tensor_name.as_bytes());
        self.absorb(&chunk.dtype.to_le_bytes());
        self.absorb(&(chunk.shape.len() as u64).to_le_bytes());
        for dim in &chunk.shape {
            self.absorb(&dim.to_le_bytes());
        }
        self.absorb(&chunk.offset.to_le_bytes());
        self.absorb(&(chunk.data.len() as u64).to_le_bytes());
        self.absorb(&chunk.data);
    }

    /// The digest of everything absorbed so far.
    pub fn finalize(self) -> [u8; DIGEST_LEN] {
        match self {
            Self::Sha256(h) => h.finalize().into(),
            Self::Blake3(h) => *h.finalize().as_bytes(),
        }
    }
}

/// Prepares chunks for sending with [`DEFAULT_ALGORITHM`]: see [`seal_with`].
pub fn seal(chunks: &mut [WeightChunk], policy_version: u64) {
    seal_with(chunks, policy_version, DEFAULT_ALGORITHM)
}

/// Prepares chunks for sending: numbers them from 0, stamps `policy_version` and `algorithm`,
/// marks the last one and stores the digest of all of them in it.
///
/// Does nothing to an empty slice.
pub fn seal_with(chunks: &mut [WeightChunk], policy_version: u64, algorithm: DigestAlgorithm) {
    let mut digest = WeightDigest::new(algorithm);
    let n = chunks.len();
    for (i, chunk) in chunks.iter_mut().enumerate() {
        chunk.chunk_index = u32::try_from(i).expect("more than u32::MAX chunks in one version");
        chunk.policy_version = policy_version;
        chunk.last = i + 1 == n;
        chunk.digest.clear();
        chunk.digest_algorithm = algorithm as i32;
        digest.update(chunk);
    }
    if let Some(last) = chunks.last_mut() {
        last.digest = digest.finalize().to_vec();
    }
}

/// How the ledger and logs write a digest: the algorithm's name, a colon and lower-case hex
/// (`blake3:9f2c…`), so a stored digest says what made it.
pub fn describe(algorithm: DigestAlgorithm, digest: &[u8]) -> String {
    let name = match algorithm {
        DigestAlgorithm::Sha256 => "sha256",
        DigestAlgorithm::Blake3 => "blake3",
    };
    format!("{name}:{}", to_hex(digest))
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
        "last weight chunk of policy version {policy_version} carries {len} digest bytes, expected {DIGEST_LEN}"
    )]
    MissingChecksum {
        /// Version streamed.
        policy_version: u64,
        /// Bytes found in `digest`.
        len: usize,
    },
    /// A chunk names a hash this receiver does not know.
    #[error(
        "weight chunk {chunk_index} names digest algorithm {value}, which this receiver does not \
         know (it knows 0 = SHA-256 and 1 = BLAKE3); the sender is newer than this worker"
    )]
    UnknownAlgorithm {
        /// Index of the chunk.
        chunk_index: u32,
        /// The `digest_algorithm` value it carried.
        value: i32,
    },
    /// A chunk names another hash than the stream's first chunk.
    #[error(
        "weight chunk {chunk_index} names digest algorithm {got:?}, the stream began with {expected:?}"
    )]
    AlgorithmChanged {
        /// Index of the chunk.
        chunk_index: u32,
        /// The first chunk's algorithm.
        expected: DigestAlgorithm,
        /// This chunk's.
        got: DigestAlgorithm,
    },
    /// The checksum does not match the chunks received.
    #[error(
        "checksum mismatch for policy version {policy_version}: sender {expected}, received {actual}"
    )]
    Mismatch {
        /// Version streamed.
        policy_version: u64,
        /// Digest announced by the sender ([`describe`]d).
        expected: String,
        /// Digest of what was received ([`describe`]d).
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
    /// The stream's algorithm and running hash, from its first chunk on.
    digest: Option<(DigestAlgorithm, WeightDigest)>,
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
        let algorithm = DigestAlgorithm::try_from(chunk.digest_algorithm).map_err(|_| {
            ChecksumError::UnknownAlgorithm {
                chunk_index: chunk.chunk_index,
                value: chunk.digest_algorithm,
            }
        })?;
        let (expected, digest) = self
            .digest
            .get_or_insert_with(|| (algorithm, WeightDigest::new(algorithm)));
        if *expected != algorithm {
            return Err(ChecksumError::AlgorithmChanged {
                chunk_index: chunk.chunk_index,
                expected: *expected,
                got: algorithm,
            });
        }
        digest.update(chunk);
        self.next_index += 1;
        if !chunk.last {
            return Ok(false);
        }
        self.done = true;
        if chunk.digest.len() != DIGEST_LEN {
            return Err(ChecksumError::MissingChecksum {
                policy_version: version,
                len: chunk.digest.len(),
            });
        }
        let (_, digest) = self.digest.take().expect("set above");
        let actual = digest.finalize();
        if actual[..] != chunk.digest[..] {
            return Err(ChecksumError::Mismatch {
                policy_version: version,
                expected: describe(algorithm, &chunk.digest),
                actual: describe(algorithm, &actual),
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
        assert_eq!(chunks[2].digest.len(), DIGEST_LEN);
        assert!(chunks[..2].iter().all(|c| c.digest.is_empty() && !c.last));
        assert!(
            chunks
                .iter()
                .all(|c| c.digest_algorithm == DigestAlgorithm::Blake3 as i32)
        );
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

    /// The bytes the digest covers for `chunk("t", 5, &[9, 8])`, written out by hand.
    fn documented_layout() -> Vec<u8> {
        let mut bytes = vec![];
        bytes.extend(1u64.to_le_bytes());
        bytes.extend(b"t");
        bytes.extend((Dtype::Bf16 as i32).to_le_bytes());
        bytes.extend(2u64.to_le_bytes());
        bytes.extend(2u64.to_le_bytes());
        bytes.extend(3u64.to_le_bytes());
        bytes.extend(5u64.to_le_bytes());
        bytes.extend(2u64.to_le_bytes());
        bytes.extend([9u8, 8]);
        bytes
    }

    #[test]
    fn each_digest_is_its_hash_of_the_documented_layout() {
        let c = chunk("t", 5, &[9, 8]);
        let mut d = WeightDigest::new(DigestAlgorithm::Sha256);
        d.update(&c);
        let sha: [u8; 32] = Sha256::digest(documented_layout()).into();
        assert_eq!(d.finalize(), sha);
        let mut d = WeightDigest::new(DigestAlgorithm::Blake3);
        d.update(&c);
        assert_eq!(d.finalize(), *blake3::hash(&documented_layout()).as_bytes());
        assert_ne!(sha, *blake3::hash(&documented_layout()).as_bytes());
    }

    #[test]
    fn a_sha256_stream_verifies_and_a_chunk_naming_no_algorithm_means_sha256() {
        let mut chunks = sealed();
        seal_with(&mut chunks, 7, DigestAlgorithm::Sha256);
        assert_eq!(verify(&chunks), Ok(()));
        // What a sender that predates `digest_algorithm` sends: the field's zero.
        assert!(chunks.iter().all(|c| c.digest_algorithm == 0));
        let mut torn = chunks.clone();
        torn[0].data = vec![0u8; 6].into();
        assert!(matches!(
            verify(&torn),
            Err(ChecksumError::Mismatch { expected, .. }) if expected.starts_with("sha256:")
        ));
    }

    #[test]
    fn an_unknown_or_changed_algorithm_is_rejected() {
        let mut chunks = sealed();
        chunks[0].digest_algorithm = 9;
        assert_eq!(
            verify(&chunks),
            Err(ChecksumError::UnknownAlgorithm {
                chunk_index: 0,
                value: 9
            })
        );
        let mut chunks = sealed();
        chunks[1].digest_algorithm = DigestAlgorithm::Sha256 as i32;
        assert_eq!(
            verify(&chunks),
            Err(ChecksumError::AlgorithmChanged {
                chunk_index: 1,
                expected: DigestAlgorithm::Blake3,
                got: DigestAlgorithm::Sha256
            })
        );
    }

    #[test]
    fn a_described_digest_names_its_algorithm() {
        assert_eq!(
            describe(DigestAlgorithm::Blake3, &[0xab, 0x01]),
            "blake3:ab01"
        );
        assert_eq!(describe(DigestAlgorithm::Sha256, &[0x00]), "sha256:00");
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
        unsealed[2].digest.clear();
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
