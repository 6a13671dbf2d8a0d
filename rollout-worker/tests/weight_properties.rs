//! Property tests of what a worker does with the weight chunks it receives: a version's
//! stream with chunks reordered, duplicated or dropped, with shapes (absurd ones included),
//! offsets, dtypes or bytes changed, resealed with a valid checksum or not, is assembled only
//! when it is the stream that was sent (or, resealed, when its chunks fit together), and
//! otherwise refused with an error; never a panic, and nothing is allocated from a shape the
//! chunks claim.

use std::collections::BTreeMap;

use chorus_proto::checksum::seal;
use chorus_proto::v1::WeightChunk;
use chorus_proto::weights::{HostTensor, WeightAssembler, encode};
use proptest::prelude::*;

fn tensors() -> BTreeMap<String, HostTensor> {
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
            shape: vec![4],
            data: vec![1.0, -0.0, 3.5, f32::MIN_POSITIVE],
        },
    );
    m
}

/// A change to a stream of chunks.
#[derive(Clone, Debug)]
enum Change {
    Swap(usize, usize),
    Duplicate(usize),
    Drop(usize),
    Shape(usize, Vec<u64>),
    Offset(usize, u64),
    Dtype(usize, i32),
    Truncate(usize),
    Index(usize, u32),
    NotLast(usize),
}

fn change() -> impl Strategy<Value = Change> {
    let at = any::<usize>();
    let dim = prop_oneof![0u64..6, Just(1 << 32), Just(1 << 62), Just(u64::MAX)];
    prop_oneof![
        1 => (at, any::<usize>()).prop_map(|(a, b)| Change::Swap(a, b)),
        1 => at.prop_map(Change::Duplicate),
        1 => at.prop_map(Change::Drop),
        4 => (at, prop::collection::vec(dim, 0..4)).prop_map(|(a, s)| Change::Shape(a, s)),
        1 => (at, prop_oneof![0u64..64, Just(u64::MAX)]).prop_map(|(a, o)| Change::Offset(a, o)),
        1 => (at, -1i32..4).prop_map(|(a, d)| Change::Dtype(a, d)),
        1 => at.prop_map(Change::Truncate),
        1 => (at, any::<u32>()).prop_map(|(a, i)| Change::Index(a, i)),
        1 => at.prop_map(Change::NotLast),
    ]
}

fn apply(chunks: &mut Vec<WeightChunk>, c: &Change) {
    if chunks.is_empty() {
        return;
    }
    let n = chunks.len();
    match c {
        Change::Swap(a, b) => chunks.swap(a % n, b % n),
        Change::Duplicate(a) => {
            let dup = chunks[a % n].clone();
            chunks.insert(a % n, dup);
        }
        Change::Drop(a) => {
            chunks.remove(a % n);
        }
        Change::Shape(a, s) => chunks[a % n].shape = s.clone(),
        Change::Offset(a, o) => chunks[a % n].offset = *o,
        Change::Dtype(a, d) => chunks[a % n].dtype = *d,
        Change::Truncate(a) => {
            let data = &mut chunks[a % n].data;
            *data = data.slice(..data.len().saturating_sub(1));
        }
        Change::Index(a, i) => chunks[a % n].chunk_index = *i,
        Change::NotLast(a) => chunks[a % n].last = false,
    }
}

/// Pushes every chunk, then finishes; the first error stops it.
fn assemble(chunks: &[WeightChunk]) -> Result<BTreeMap<String, HostTensor>, String> {
    let mut a = WeightAssembler::new();
    for c in chunks {
        a.push(c).map_err(|e| e.to_string())?;
    }
    a.finish().map(|(_, t)| t).map_err(|e| e.to_string())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, .. ProptestConfig::default() })]

    #[test]
    fn any_changed_stream_is_refused_and_the_sent_one_assembles(
        changes in prop::collection::vec(change(), 0..4),
        max_chunk_bytes in 4usize..40,
        reseal in any::<bool>(),
    ) {
        let sent = encode("run", 3, &tensors(), max_chunk_bytes);
        let mut chunks = sent.clone();
        for c in &changes {
            apply(&mut chunks, c);
        }
        if reseal {
            // A sender that checksums what it sends: only the assembler's own checks remain.
            for c in &mut chunks {
                c.last = false;
                c.digest.clear();
            }
            seal(&mut chunks, 3);
        }
        match assemble(&chunks) {
            // Unsealed again, only the stream that was sent verifies; resealed, any stream whose
            // chunks fit together is a valid one (a tensor less, a shape that matches its data).
            Ok(t) if !reseal => prop_assert_eq!(t, tensors(), "a changed stream assembled: {:?}", changes),
            Ok(t) => {
                for (name, h) in &t {
                    let n = h.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
                    prop_assert_eq!(n, Some(h.data.len()), "`{}` assembled inconsistent", name);
                }
            }
            Err(message) => {
                prop_assert!(chunks != sent, "the sent stream was refused: {message}");
                prop_assert!(!message.is_empty());
            }
        }
    }
}
