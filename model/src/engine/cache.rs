//! Per-sequence decode state, kept apart from the (immutable) weights.

/// The state one block keeps for one sequence.
#[derive(Clone, Debug)]
pub(crate) enum LayerCache {
    /// Feed-forward blocks keep nothing.
    Stateless,
    /// Mamba-2: the last `K-1` conv inputs (oldest first, `[K-1, conv_dim]`) and the SSM state
    /// `[heads, head_dim, state]`; `history` holds the state after each token of the last call
    /// when it was asked to (speculative decoding rewinds to one of them).
    Mamba {
        conv: Vec<f32>,
        ssm: Vec<f32>,
        history: Vec<(Vec<f32>, Vec<f32>)>,
    },
    /// Attention: keys and values of every position so far, `[len, kv_heads * head_dim]`.
    Attention { keys: Vec<f32>, values: Vec<f32> },
}

/// The decode state of one sequence: what it has seen, per block of the backbone and of the
/// MTP head. Sequences of a batch each own one, so they can join and leave between steps.
#[derive(Clone, Debug)]
pub struct SequenceCache {
    pub(crate) layers: Vec<LayerCache>,
    pub(crate) mtp: Vec<LayerCache>,
    /// Tokens the backbone has processed.
    pub(crate) len: usize,
    /// Positions the MTP head has processed.
    pub(crate) mtp_len: usize,
}

impl SequenceCache {
    /// Number of tokens the backbone has processed.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing has been processed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held by the cache.
    pub fn bytes(&self) -> usize {
        let one = |l: &LayerCache| match l {
            LayerCache::Stateless => 0,
            LayerCache::Mamba { conv, ssm, history } => {
                4 * (conv.len()
                    + ssm.len()
                    + history
                        .iter()
                        .map(|(a, b)| a.len() + b.len())
                        .sum::<usize>())
            }
            LayerCache::Attention { keys, values } => 4 * (keys.len() + values.len()),
        };
        self.layers.iter().chain(&self.mtp).map(one).sum()
    }
}

pub(crate) fn rewind_layers(
    layers: &mut [LayerCache],
    kv_width: usize,
    new_len: usize,
    drop: usize,
) {
    for l in layers {
        match l {
            LayerCache::Stateless => {}
            LayerCache::Attention { keys, values } => {
                keys.truncate(new_len * kv_width);
                values.truncate(new_len * kv_width);
            }
            LayerCache::Mamba { conv, ssm, history } => {
                if drop > 0 {
                    let keep = history
                        .len()
                        .checked_sub(drop + 1)
                        .expect("rewind within the recorded history");
                    let (c, s) = history.swap_remove(keep);
                    *conv = c;
                    *ssm = s;
                }
                history.clear();
            }
        }
    }
}
