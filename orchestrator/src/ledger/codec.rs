//! Compact encodings of per-token arrays stored as BLOB (SQLite) / BYTEA (PostgreSQL).
//!
//! - token ids: `u32` little-endian, 4 bytes per token;
//! - log-probabilities: `f32` little-endian, 4 bytes per token;
//! - policy versions: run-length encoded, 12 bytes per run of equal versions
//!   (`u64` version LE, then `u32` run length LE). A sequence sampled by one
//!   policy takes 12 bytes whatever its length; one that crossed a weight update
//!   takes 24.

/// A blob whose length does not fit its encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BadLength {
    /// Bytes found.
    pub len: usize,
    /// The length must be a multiple of this.
    pub multiple_of: usize,
}

impl std::fmt::Display for BadLength {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} bytes is not a multiple of {}",
            self.len, self.multiple_of
        )
    }
}

fn check_len(bytes: &[u8], multiple_of: usize) -> Result<(), BadLength> {
    if bytes.len().is_multiple_of(multiple_of) {
        Ok(())
    } else {
        Err(BadLength {
            len: bytes.len(),
            multiple_of,
        })
    }
}

pub(crate) fn encode_u32s(values: &[u32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

pub(crate) fn decode_u32s(bytes: &[u8]) -> Result<Vec<u32>, BadLength> {
    check_len(bytes, 4)?;
    Ok(bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("chunk of 4")))
        .collect())
}

pub(crate) fn encode_f32s(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

pub(crate) fn decode_f32s(bytes: &[u8]) -> Result<Vec<f32>, BadLength> {
    check_len(bytes, 4)?;
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("chunk of 4")))
        .collect())
}

const RUN_LEN: usize = 12;

pub(crate) fn encode_versions(versions: &[u64]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut iter = versions.iter().copied();
    let Some(mut current) = iter.next() else {
        return out;
    };
    let mut count: u32 = 1;
    let mut push = |version: u64, count: u32| {
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&count.to_le_bytes());
    };
    for v in iter {
        if v == current && count < u32::MAX {
            count += 1;
        } else {
            push(current, count);
            current = v;
            count = 1;
        }
    }
    push(current, count);
    out
}

pub(crate) fn decode_versions(bytes: &[u8]) -> Result<Vec<u64>, BadLength> {
    check_len(bytes, RUN_LEN)?;
    let mut out = Vec::new();
    for run in bytes.chunks_exact(RUN_LEN) {
        let version = u64::from_le_bytes(run[..8].try_into().expect("8 bytes"));
        let count = u32::from_le_bytes(run[8..].try_into().expect("4 bytes"));
        out.extend(std::iter::repeat_n(version, count as usize));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_ids_are_little_endian_u32() {
        let ids = [0, 1, 151_643, u32::MAX];
        let blob = encode_u32s(&ids);
        assert_eq!(&blob[..8], &[0, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(&blob[8..12], &151_643u32.to_le_bytes());
        assert_eq!(decode_u32s(&blob).unwrap(), ids);
        assert_eq!(decode_u32s(&[]).unwrap(), Vec::<u32>::new());
    }

    #[test]
    fn logprobs_round_trip_bit_exactly() {
        let lp = [-0.0f32, -1.5e-8, -12.25, f32::NEG_INFINITY];
        let back = decode_f32s(&encode_f32s(&lp)).unwrap();
        assert_eq!(
            back.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            lp.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn versions_are_run_length_encoded() {
        assert!(encode_versions(&[]).is_empty());
        let one_policy = vec![7u64; 4096];
        let blob = encode_versions(&one_policy);
        assert_eq!(blob.len(), 12);
        assert_eq!(&blob[..8], &7u64.to_le_bytes());
        assert_eq!(&blob[8..], &4096u32.to_le_bytes());
        assert_eq!(decode_versions(&blob).unwrap(), one_policy);

        let crossed = [3, 3, 4, 4, 4, 3, 5];
        let blob = encode_versions(&crossed);
        assert_eq!(blob.len(), 4 * 12);
        assert_eq!(decode_versions(&blob).unwrap(), crossed);
    }

    #[test]
    fn truncated_blobs_are_rejected() {
        assert_eq!(
            decode_u32s(&[1, 2, 3]),
            Err(BadLength {
                len: 3,
                multiple_of: 4
            })
        );
        assert!(decode_f32s(&[0; 5]).is_err());
        assert_eq!(decode_versions(&[0; 13]).unwrap_err().multiple_of, 12);
    }
}
