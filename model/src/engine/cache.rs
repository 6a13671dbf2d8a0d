//! Per-sequence decode state, kept apart from the (immutable) weights.

/// The state one block keeps for one sequence.
#[derive(Clone, Debug)]
pub(crate) enum LayerCache {
    /// Feed-forward blocks keep nothing.
    Stateless,
    /// Mamba-2: the last `K-1` conv inputs (oldest first, `[K-1, conv_dim]`) and the SSM state
    /// `[heads, head_dim, state]`; `recorded` holds what the last call needs to drop a suffix
    /// when it was asked to (speculative decoding's verification).
    Mamba {
        conv: Vec<f32>,
        ssm: Vec<f32>,
        recorded: Option<Recorded>,
    },
    /// Attention: keys and values of every position so far, `[len, kv_heads * head_dim]`.
    Attention { keys: Vec<f32>, values: Vec<f32> },
}

/// A Mamba block's record of one call: its state before the call (one copy, whatever the
/// number of tokens) and each token's inputs to the recurrence (`[tokens, conv_dim + heads]`:
/// the conv input and dt of `in_proj`'s output), from which a rewind replays the kept tokens.
#[derive(Clone, Debug)]
pub(crate) struct Recorded {
    pub(crate) conv: Vec<f32>,
    pub(crate) ssm: Vec<f32>,
    pub(crate) inputs: Vec<f32>,
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
            LayerCache::Mamba {
                conv,
                ssm,
                recorded,
            } => {
                4 * (conv.len()
                    + ssm.len()
                    + recorded
                        .as_ref()
                        .map_or(0, |r| r.conv.len() + r.ssm.len() + r.inputs.len()))
            }
            LayerCache::Attention { keys, values } => 4 * (keys.len() + values.len()),
        };
        self.layers.iter().chain(&self.mtp).map(one).sum()
    }
}
