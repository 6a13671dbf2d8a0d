#!/usr/bin/env python3
"""PyTorch + Hugging Face transformers peer for the Chorus peers benchmark.

Loads a Chorus checkpoint (HF layout, model_type ``nemotron_h``) with
``NemotronHForCausalLM`` in float32 on the CPU and measures

* greedy generation throughput (``model.generate``) on exactly the prompts the
  Chorus engine benchmarks use, one cell per batch size, and
* learner throughput: forward + backward of next-token cross-entropy on a fixed
  (batch, seq) block of token ids,

then writes one JSON document (see ``--help``) and a short summary on stdout.
Progress goes to stderr.

Run it with the Python that has torch and transformers installed, e.g.
``~/.cache/chorus-hf/bin/python benches/peers/hf_peer.py --checkpoint DIR ...``.
"""

import argparse
import gc
import glob
import importlib.util
import json
import os
import struct
import sys
import time

EPILOG = """\
prompts:   request i (0-based) has the prompt tokens
             [((i*31 + j*7 + 3) % (vocab - 3)) + 3 for j in range(PROMPT)]
           (the prompts of Chorus' own generation benchmarks).
generate:  one greedy model.generate call on the B prompts at once (no padding,
           all-ones attention mask, KV/SSM cache on), exactly NEW tokens per
           sequence (EOS is not a stop token, as in Chorus' benchmarks). The
           whole call is timed, prompt processing included; tokens/s is the
           generated tokens over that time, best of REPEATS runs after one
           untimed warm-up (batch 1, 4 new tokens). A cell that fails records
           its error instead of a rate.
train:     forward + backward of next-token cross-entropy on a
           (TRAIN_BATCH, TRAIN_SEQ) block of ids ((k*13 + 5) % (vocab - 3)) + 3,
           k = 0..TRAIN_BATCH*TRAIN_SEQ-1 row-major; tokens/s is
           TRAIN_BATCH*TRAIN_SEQ over the best of TRAIN_REPEATS timed runs after
           one untimed warm-up (no optimizer step; gradients are reset to None
           between runs).
output:    {"peer": "pytorch", "torch": ..., "transformers": ..., "threads": N,
            "model": DIR, "parameters": N,
            "generation": [{"batch", "prompt", "new", "tokens_per_second", ...}
                           or {"batch", "prompt", "new", "error"}],
            "training": {"batch", "seq", "tokens_per_second",
                         "params_without_grad", ...} or null}
           plus descriptive extras: the experts/attention implementations used,
           whether the Mamba CUDA kernels were found (without them transformers
           runs its PyTorch reference scan), per-run seconds, sequence 0's
           generated tokens per cell and whether the greedy tokens of the
           requests that batch sizes share agree across cells.
"""


def parse_batches(text):
    try:
        batches = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not batches or any(b < 1 for b in batches):
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers, got {text!r}")
    return batches


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="hf_peer.py",
        description="PyTorch/transformers side of Chorus' peers benchmark: greedy generation and "
        "forward+backward throughput of a Chorus checkpoint on the CPU, in float32.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="Chorus checkpoint directory in HF layout (config.json + *.safetensors)")
    p.add_argument("--batches", type=parse_batches, default=parse_batches("1,16,64"), metavar="B,B,...",
                   help="comma-separated generation batch sizes (default: 1,16,64)")
    p.add_argument("--prompt", type=positive_int, default=16, metavar="P",
                   help="prompt length in tokens (default: 16)")
    p.add_argument("--new", type=positive_int, default=64, metavar="N",
                   help="new tokens generated per sequence (default: 64)")
    p.add_argument("--threads", type=positive_int, default=2, metavar="T",
                   help="torch intra-op threads (default: 2; inter-op threads are set to 1)")
    p.add_argument("--repeats", type=positive_int, default=2, metavar="R",
                   help="timed generate runs per batch size, the best is kept (default: 2)")
    p.add_argument("--train-batch", type=positive_int, default=8, metavar="B",
                   help="training batch size in sequences (default: 8)")
    p.add_argument("--train-seq", type=positive_int, default=128, metavar="T",
                   help="training sequence length in tokens (default: 128)")
    p.add_argument("--train-repeats", type=positive_int, default=3, metavar="R",
                   help="timed forward+backward runs, the best is kept (default: 3)")
    p.add_argument("--no-train", action="store_true", help="skip the training measurement (training: null)")
    p.add_argument("--no-generate", action="store_true", help="skip the generation measurements (generation: [])")
    p.add_argument("--experts-implementation", default=None, metavar="NAME",
                   help="transformers' MoE experts implementation (eager, grouped_mm, batched_mm); "
                   "default: whatever transformers picks (grouped_mm in transformers 5)")
    p.add_argument("--attn-implementation", default=None, metavar="NAME",
                   help="transformers' attention implementation (eager, sdpa); default: transformers' choice (sdpa)")
    p.add_argument("--json", required=True, metavar="OUT.json", help="where to write the results")
    return p.parse_args(argv)


def log(message):
    print(f"hf: {message}", file=sys.stderr, flush=True)


def error_string(exc):
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= 2000 else text[:2000] + " ..."


def prompt_tokens(i, prompt_len, vocab):
    return [((i * 31 + j * 7 + 3) % (vocab - 3)) + 3 for j in range(prompt_len)]


def training_tokens(batch, seq, vocab):
    flat = [((k * 13 + 5) % (vocab - 3)) + 3 for k in range(batch * seq)]
    return [flat[r * seq:(r + 1) * seq] for r in range(batch)]


def checkpoint_parameters(directory):
    """Element count of every tensor in the checkpoint's safetensors files (MTP tensors included),
    read from the file headers only; None if it cannot be read."""
    total = 0
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        return None
    try:
        for path in files:
            with open(path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_len))
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                count = 1
                for dim in entry["shape"]:
                    count *= dim
                total += count
    except (OSError, ValueError, KeyError, struct.error):
        return None
    return total


def load_model(args, torch, NemotronHForCausalLM):
    kwargs = {}
    if args.experts_implementation:
        kwargs["experts_implementation"] = args.experts_implementation
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    # transformers 5 renamed `torch_dtype` to `dtype` (the old name still works but warns).
    try:
        model = NemotronHForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32, **kwargs)
    except TypeError:
        model = NemotronHForCausalLM.from_pretrained(args.checkpoint, torch_dtype=torch.float32, **kwargs)
    model.to(torch.float32)
    return model


def run_generate(model, torch, input_ids, new):
    attention_mask = torch.ones_like(input_ids)
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=False,
            num_beams=1,
            max_new_tokens=new,
            min_new_tokens=new,
            # No stop token, as in Chorus' benchmarks (stop_tokens: []): EOS neither stops a
            # sequence nor is suppressed, so the greedy tokens are the model's own argmaxes.
            eos_token_id=None,
            use_cache=True,
        )
    if not torch.is_tensor(out):
        out = out.sequences
    return out


def measure_generation(model, torch, vocab, batch, prompt, new, repeats):
    ids = torch.tensor([prompt_tokens(i, prompt, vocab) for i in range(batch)], dtype=torch.long)
    runs = []
    generated = None
    tokens = None
    for _ in range(repeats):
        start = time.perf_counter()
        out = run_generate(model, torch, ids, new)
        elapsed = time.perf_counter() - start
        if out.shape[0] != batch or not torch.equal(out[:, :prompt], ids):
            raise RuntimeError(f"generate returned {tuple(out.shape)} that does not start with the prompts")
        new_part = out[:, prompt:]
        # Nothing stops a sequence early (no EOS) and nothing is padded (equal-length prompts), so
        # every position after the prompt is a generated token.
        count = new_part.numel()
        if new_part.shape[1] != new or count != batch * new:
            raise RuntimeError(
                f"generate produced {new_part.shape[1]} new tokens per sequence ({count} in all), "
                f"expected exactly {new} ({batch * new} in all)"
            )
        runs.append(elapsed)
        generated = count
        tokens = new_part.tolist()
    best = min(runs)
    return tokens, {
        "batch": batch,
        "prompt": prompt,
        "new": new,
        "tokens_per_second": generated / best,
        "generated_tokens": generated,
        "seconds": best,
        "runs_seconds": runs,
        "sequence0": tokens[0],
    }


def measure_training(model, torch, F, vocab, batch, seq, repeats):
    ids = torch.tensor(training_tokens(batch, seq, vocab), dtype=torch.long)
    model.train()
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]

    def step():
        logits = model(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
            ids[:, 1:].reshape(-1),
        )
        loss.backward()
        return loss.item()

    model.zero_grad(set_to_none=True)
    step()  # untimed warm-up
    runs = []
    loss = None
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss = step()
        runs.append(time.perf_counter() - start)
    best = min(runs)
    without = [name for name, p in params if p.grad is None or not bool(p.grad.detach().abs().sum() > 0)]
    model.zero_grad(set_to_none=True)
    model.eval()
    return {
        "batch": batch,
        "seq": seq,
        "tokens_per_second": batch * seq / best,
        "seconds": best,
        "runs_seconds": runs,
        "loss": loss,
        "params_without_grad": len(without),
        "params_without_grad_names": without[:32],
        "trainable_tensors": len(params),
    }


def main(argv=None):
    args = parse_args(argv)

    import torch
    import torch.nn.functional as F
    import transformers
    from transformers import NemotronHForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # only allowed before the first inter-op parallel work

    mamba_kernels = all(importlib.util.find_spec(m) is not None for m in ("mamba_ssm", "causal_conv1d"))
    log(f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} threads; Mamba kernels "
        + ("installed" if mamba_kernels else "absent (transformers' PyTorch reference scan)"))

    start = time.perf_counter()
    model = load_model(args, torch, NemotronHForCausalLM)
    model.eval()
    load_seconds = time.perf_counter() - start
    config = model.config
    vocab = int(config.vocab_size)
    if vocab <= 3:
        raise SystemExit(f"vocab_size {vocab} is too small for the benchmark prompts")
    parameters = sum(p.numel() for p in model.parameters())
    log(f"loaded {args.checkpoint} in {load_seconds:.1f}s: {parameters} parameters, vocab {vocab}, "
        f"experts {getattr(config, '_experts_implementation', None)}, "
        f"attention {getattr(config, '_attn_implementation', None)}")

    result = {
        "peer": "pytorch",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "model": args.checkpoint,
        "parameters": parameters,
        "checkpoint_parameters": checkpoint_parameters(args.checkpoint),
        "dtype": "float32",
        "experts_implementation": getattr(config, "_experts_implementation", None),
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "mamba_kernels": mamba_kernels,
        "load_seconds": load_seconds,
        "generation": [],
        "training": None,
    }

    if not args.no_generate:
        try:
            log("generate warm-up (batch 1, 4 new tokens) ...")
            warm_ids = torch.tensor([prompt_tokens(0, args.prompt, vocab)], dtype=torch.long)
            run_generate(model, torch, warm_ids, 4)
        except Exception as exc:  # the cells below record their own errors
            log(f"generate warm-up failed: {error_string(exc)}")
        outputs = {}  # batch size -> its new tokens, row per request
        for batch in args.batches:
            log(f"generate batch {batch} (prompt {args.prompt}, new {args.new}, best of {args.repeats}) ...")
            try:
                outputs[batch], cell = measure_generation(model, torch, vocab, batch, args.prompt, args.new,
                                                          args.repeats)
                log(f"generate batch {batch}: {cell['tokens_per_second']:.1f} tokens/s "
                    f"({cell['generated_tokens']} tokens in {cell['seconds']:.2f}s)")
            except Exception as exc:
                cell = {"batch": batch, "prompt": args.prompt, "new": args.new, "error": error_string(exc)}
                log(f"generate batch {batch}: error: {cell['error']}")
            result["generation"].append(cell)
            gc.collect()
        if len(outputs) > 1:
            # Greedy decoding of request i should not depend on what it is batched with: compare
            # sequence 0, and every request that two batch sizes share, across the cells.
            rows = list(outputs.values())
            result["sequence0_same_across_batches"] = all(r[0] == rows[0][0] for r in rows)
            result["shared_sequences_same_across_batches"] = all(
                a[: min(len(a), len(b))] == b[: min(len(a), len(b))] for a in rows for b in rows
            )

    if not args.no_train:
        log(f"train batch {args.train_batch} seq {args.train_seq} (best of {args.train_repeats}) ...")
        try:
            training = measure_training(model, torch, F, vocab, args.train_batch, args.train_seq,
                                        args.train_repeats)
            log(f"train: {training['tokens_per_second']:.1f} tokens/s ({training['seconds']:.2f}s a step), "
                f"loss {training['loss']:.4f}, {training['params_without_grad']} of "
                f"{training['trainable_tensors']} parameter tensors without gradient")
        except Exception as exc:
            training = {"batch": args.train_batch, "seq": args.train_seq, "error": error_string(exc)}
            log(f"train: error: {training['error']}")
        result["training"] = training

    out_dir = os.path.dirname(os.path.abspath(args.json))
    os.makedirs(out_dir, exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")

    print(f"pytorch {torch.__version__} / transformers {transformers.__version__}, "
          f"{result['threads']} threads, {args.checkpoint} ({parameters} parameters, float32, "
          f"experts {result['experts_implementation']}, "
          f"mamba {'kernels' if mamba_kernels else 'torch reference'})")
    for cell in result["generation"]:
        head = f"  generate batch {cell['batch']:>4} prompt {cell['prompt']} new {cell['new']}: "
        if "error" in cell:
            print(head + "error: " + cell["error"].splitlines()[0])
        else:
            print(head + f"{cell['tokens_per_second']:10.1f} tokens/s ({cell['seconds']:.2f}s)")
    if "sequence0_same_across_batches" in result:
        print(f"  greedy tokens identical across batch sizes: sequence 0 "
              f"{result['sequence0_same_across_batches']}, every shared sequence "
              f"{result['shared_sequences_same_across_batches']}")
    training = result["training"]
    if training is not None:
        head = f"  train batch {training['batch']} seq {training['seq']}: "
        if "error" in training:
            print(head + "error: " + training["error"].splitlines()[0])
        else:
            print(head + f"{training['tokens_per_second']:10.1f} tokens/s ({training['seconds']:.2f}s a step), "
                  f"{training['params_without_grad']} parameter tensors without gradient")
    print(f"  wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
