//! Deterministic sampling shared by the built-in environments: a portable seeded RNG, a stable
//! content hash, and the content-hash rule that splits tasks into train and heldout.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::chat::Message;
use crate::error::EnvError;
use crate::task::{Split, Task};

/// The RNG every environment samples with. ChaCha8 is specified bit for bit, so a seed gives the
/// same task on every platform and every version of `rand` (unlike `StdRng`).
pub type TaskRng = ChaCha8Rng;

/// One in this many task contents lands in heldout.
const HELDOUT_ONE_IN: u64 = 5;

/// How many candidates to draw before concluding a split has no task at this difficulty.
pub(crate) const MAX_SPLIT_ATTEMPTS: usize = 2_000;

/// FNV-1a, 64 bit: a stable hash (std's hashers may change between Rust releases).
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// The split a task with this content key belongs to in environment `env`. Because the split
/// is a function of the content, the same content can never be both train and heldout.
pub fn split_of(env: &str, content_key: &str) -> Split {
    let hash = stable_hash(format!("{env}\u{0}{content_key}").as_bytes());
    // Mix the high bits in: FNV's low bits are weak for short, similar keys.
    if (hash ^ (hash >> 29) ^ (hash >> 47)).is_multiple_of(HELDOUT_ONE_IN) {
        Split::Heldout
    } else {
        Split::Train
    }
}

/// The RNG for `(env, seed, difficulty)`; different environments get unrelated streams.
pub fn task_rng(env: &str, seed: u64, difficulty: u32) -> TaskRng {
    let env_hash = stable_hash(env.as_bytes());
    let mixed =
        seed ^ env_hash.rotate_left(17) ^ u64::from(difficulty).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    ChaCha8Rng::seed_from_u64(mixed)
}

/// Draws candidates from the task RNG until one falls in `split`. `draw` returns the candidate's
/// content key (what makes two tasks the same) and the candidate, or `None` to reject it.
pub(crate) fn draw_in_split<T>(
    env: &str,
    seed: u64,
    split: Split,
    difficulty: u32,
    mut draw: impl FnMut(&mut TaskRng) -> Option<(String, T)>,
) -> Result<(String, T), EnvError> {
    let mut rng = task_rng(env, seed, difficulty);
    for _ in 0..MAX_SPLIT_ATTEMPTS {
        if let Some((key, candidate)) = draw(&mut rng)
            && split_of(env, &key) == split
        {
            return Ok((key, candidate));
        }
    }
    Err(EnvError::SplitExhausted {
        env: env.to_string(),
        split,
        difficulty,
        seed,
        attempts: MAX_SPLIT_ATTEMPTS,
    })
}

/// Everything that identifies a sampled task apart from its content.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TaskOrigin<'a> {
    pub env: &'a str,
    pub seed: u64,
    pub split: Split,
    pub difficulty: u32,
}

/// Assembles a task; the id hashes the content key so equal content gets equal ids.
pub(crate) fn make_task(
    origin: TaskOrigin<'_>,
    content_key: &str,
    prompt: Vec<Message>,
    verification: &impl Serialize,
) -> Result<Task, EnvError> {
    let hash = stable_hash(format!("{}\u{0}{content_key}", origin.env).as_bytes());
    let verification =
        serde_json::to_value(verification).map_err(|source| EnvError::Serialize {
            env: origin.env.to_string(),
            source,
        })?;
    Ok(Task {
        id: format!(
            "{}-{}-d{}-{hash:016x}",
            origin.env, origin.split, origin.difficulty
        ),
        env: origin.env.to_string(),
        split: origin.split,
        difficulty: origin.difficulty,
        seed: origin.seed,
        prompt,
        verification,
    })
}

#[cfg(test)]
mod tests {
    use rand::Rng;

    use super::*;

    #[test]
    fn stable_hash_is_fnv1a() {
        assert_eq!(stable_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(stable_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn split_rule_sends_about_a_fifth_to_heldout() {
        let heldout = (0..10_000)
            .filter(|i| split_of("env", &i.to_string()) == Split::Heldout)
            .count();
        assert!((1_500..2_500).contains(&heldout), "{heldout}");
    }

    #[test]
    fn rng_streams_depend_on_every_input() {
        let first = |env: &str, seed, difficulty| task_rng(env, seed, difficulty).random::<u64>();
        assert_eq!(first("a", 1, 0), first("a", 1, 0));
        assert_ne!(first("a", 1, 0), first("b", 1, 0));
        assert_ne!(first("a", 1, 0), first("a", 2, 0));
        assert_ne!(first("a", 1, 0), first("a", 1, 1));
    }

    #[test]
    fn drawing_fails_with_context_when_a_split_is_empty() {
        let err = draw_in_split("env", 3, Split::Heldout, 0, |_| {
            // A single possible task, which is train for this env.
            let key = (0..)
                .map(|i: u32| i.to_string())
                .find(|k| split_of("env", k) == Split::Train)
                .unwrap();
            Some((key, ()))
        })
        .unwrap_err();
        assert!(err.to_string().contains("heldout"), "{err}");
    }
}
