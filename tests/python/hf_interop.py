"""Opens a Chorus checkpoint with Hugging Face transformers, and writes one back.

Run by `tests/hf_interop.rs` (needs torch and transformers; see README "Tests"):

    python hf_interop.py CHORUS_CHECKPOINT PROMPT_IDS NEW_TOKENS OUT_DIR

1. Loads CHORUS_CHECKPOINT with `AutoModelForCausalLM` and `AutoTokenizer`, unedited.
2. Decodes NEW_TOKENS tokens greedily after PROMPT_IDS (comma-separated ids).
3. Moves every weight by seeded noise, `save_pretrained`s model and tokenizer into OUT_DIR,
   and decodes greedily again with the moved model, so that Chorus, reading OUT_DIR, must find
   weights that only transformers' files hold.

Prints one JSON object: the tokenizer's special tokens, and for each decode the tokens, their
log-probabilities, and the gap between the best and second-best logit at every step (a near
tie is where two correct implementations may part).
"""

import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def greedy(model, prompt, new_tokens):
    ids = torch.tensor([prompt], dtype=torch.long)
    tokens, logprobs, margins = [], [], []
    # One full forward per token, without the cache: the reference path, whatever the
    # incremental path of the installed transformers does.
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(input_ids=ids).logits[0, -1].float()
            top = torch.topk(logits, 2)
            token = int(top.indices[0])
            tokens.append(token)
            logprobs.append(float(torch.log_softmax(logits, -1)[token]))
            margins.append(float(top.values[0] - top.values[1]))
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return {"tokens": tokens, "logprobs": logprobs, "margins": margins}


def main():
    checkpoint, prompt, new_tokens, out_dir = sys.argv[1:5]
    prompt = [int(t) for t in prompt.split(",")]
    new_tokens = int(new_tokens)
    torch.manual_seed(0)

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    loaded = greedy(model, prompt, new_tokens)

    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(0.05 * p.abs().mean() * torch.randn_like(p))
    moved = greedy(model, prompt, new_tokens)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)

    print(json.dumps({
        "model_class": type(model).__name__,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "decoded_prompt": tokenizer.decode(prompt),
        "loaded": loaded,
        "moved": moved,
    }))


if __name__ == "__main__":
    main()
