//! Tokenizers, always HF `tokenizer.json` files read by the `tokenizers` crate.
//!
//! For models trained from scratch Chorus builds a byte-level tokenizer: its special tokens
//! ([`SPECIAL_TOKENS`]: padding, begin/end, chat roles, `<think>`, tool-call markers) take the
//! first ids and the 256 bytes follow. It is written out as an ordinary `tokenizer.json`, so a
//! checkpoint's tokenizer is loaded the same way whether it came from HF or from Chorus.

use std::path::Path;

use serde_json::{Value, json};

use crate::error::{ModelError, Result};

/// Special tokens of Chorus' byte-level tokenizer, in id order (id = index).
pub const SPECIAL_TOKENS: [&str; 14] = [
    "<pad>",
    "<s>",
    "</s>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|tool|>",
    "<|end|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
];

/// Vocabulary size of the byte-level tokenizer: the special tokens plus 256 bytes.
pub const BYTE_LEVEL_VOCAB: usize = SPECIAL_TOKENS.len() + 256;

/// GPT-2's reversible map from bytes to printable characters, which HF's `ByteLevel`
/// pre-tokenizer and decoder use.
fn byte_to_char() -> Vec<char> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut extra = 0;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).expect("valid")
            } else {
                extra += 1;
                char::from_u32(255 + extra).expect("valid")
            }
        })
        .collect()
}

/// The `tokenizer.json` of the byte-level tokenizer.
pub fn byte_level_json() -> Value {
    let added: Vec<Value> = SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(id, t)| json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let mut vocab = serde_json::Map::new();
    for (id, t) in SPECIAL_TOKENS.iter().enumerate() {
        vocab.insert(t.to_string(), json!(id));
    }
    for (b, c) in byte_to_char().into_iter().enumerate() {
        vocab.insert(c.to_string(), json!(SPECIAL_TOKENS.len() + b));
    }
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false});
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    })
}

/// A loaded tokenizer.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

fn tok_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Reads an HF `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| ModelError::BadFile {
            path: path.to_path_buf(),
            message: format!("not a usable tokenizer.json: {e}"),
        })?;
        Ok(Self { inner })
    }

    /// Chorus' byte-level tokenizer.
    pub fn byte_level() -> Self {
        let inner = byte_level_json()
            .to_string()
            .parse::<tokenizers::Tokenizer>()
            .expect("the byte-level tokenizer.json is valid");
        Self { inner }
    }

    /// Writes `tokenizer.json`.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.inner.save(path, true).map_err(tok_err)
    }

    /// Token ids of `text`; special-token strings in it become their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, false)
            .map_err(tok_err)?
            .get_ids()
            .to_vec())
    }

    /// Text of `ids`, special tokens included unless `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(tok_err)
    }

    /// The id of a token string, e.g. `"</s>"`.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string of an id, e.g. `"</s>"` for a special token's.
    pub fn token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of ids, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_round_trips_any_text() {
        let t = Tokenizer::byte_level();
        assert_eq!(t.vocab_size(), BYTE_LEVEL_VOCAB);
        for text in [
            "12+7=19",
            "héllo wörld\n\t ✓",
            "<|user|>What is 2+2?<|end|><|assistant|><think>2+2</think>4</s>",
        ] {
            let ids = t.encode(text).unwrap();
            assert_eq!(t.decode(&ids, false).unwrap(), text);
        }
        let ids = t.encode("<think>a</think>").unwrap();
        assert_eq!(ids, vec![8, SPECIAL_TOKENS.len() as u32 + b'a' as u32, 9]);
        assert_eq!(t.encode("ab").unwrap().len(), 2);
    }

    #[test]
    fn saved_file_loads_the_same_tokenizer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        Tokenizer::byte_level().save(&path).unwrap();
        let t = Tokenizer::from_file(&path).unwrap();
        let text = "<|assistant|>x = 3 * (4 + 5)</s>";
        assert_eq!(
            t.encode(text).unwrap(),
            Tokenizer::byte_level().encode(text).unwrap()
        );
        assert_eq!(t.token_id("</s>"), Some(2));
    }
}
