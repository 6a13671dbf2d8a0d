"""The PyTorch learner's objectives agree with Chorus' (`chorus loss`, the Rust learner's code).

Run by `tests/torch_learner.rs`:

    python torch_objective_agree.py CHORUS_BINARY WORK_DIR

For every algorithm, correction, aggregation and KL setting below, draws a ragged batch (masked
positions, an empty sequence, ratios on both sides of the clip range, behaviour log-probabilities
away from the learner's), evaluates it with `chorus_learner.objective.evaluate` and with
`chorus loss`, and checks loss and d loss / d logprobs within 1e-5. Prints a JSON summary.
"""

import itertools
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from chorus_learner.objective import Objective, evaluate

CASES = [
    ("grpo", {}), ("dapo", {}), ("dr_grpo", {}), ("dr_grpo", {"norm_length": 7}),
    ("gspo", {}), ("gspo", {"eps_low": 0.05, "eps_high": 0.05}), ("cispo", {}), ("reinforce", {}),
    ("grpo", {"correction": "tis", "tis_cap": 1.5}),
    ("grpo", {"correction": "icepop", "icepop_low": 0.8, "icepop_high": 1.25}),
    ("dapo", {"correction": "seq_mask_tis", "icepop_low": 0.9, "icepop_high": 1.1}),
    ("grpo", {"aggregation": "token_mean"}),
    ("reinforce", {"kl_coef": 0.1, "kl_estimator": "k1"}),
    ("grpo", {"kl_coef": 0.05, "kl_estimator": "k3"}),
]


def batch(seed, b=5, t=9):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3 - 0.1
    # Ratios r = exp(lp - old) spread over [0.6, 1.5]: some inside the clip range, some out.
    lp = old + (torch.rand(b, t, generator=g, dtype=torch.float64) * 0.9 - 0.5)
    beh = old + (torch.rand(b, t, generator=g, dtype=torch.float64) * 0.6 - 0.3)
    ref = old + (torch.rand(b, t, generator=g, dtype=torch.float64) * 0.4 - 0.2)
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    mask = torch.rand(b, t, generator=g) < 0.7
    mask[2] = False  # a sequence with nothing in the loss
    return [x.float() if x.is_floating_point() else x for x in (lp, old, beh, adv, mask, ref)]


def main():
    chorus, work = sys.argv[1], Path(sys.argv[2])
    work.mkdir(parents=True, exist_ok=True)
    worst_loss = worst_grad = 0.0
    for i, ((algorithm, settings), seed) in enumerate(itertools.product(CASES, [1, 2])):
        lp, old, beh, adv, mask, ref = batch(seed)
        o = Objective.for_algorithm(algorithm).with_settings(**settings)
        ours = evaluate(o, lp, old, beh, adv, mask, ref if o.kl_coef > 0 else None)
        tensors = {"logprobs": lp, "old_logprobs": old, "behaviour_logprobs": beh,
                   "advantages": adv, "mask": mask.to(torch.uint8)}
        if o.kl_coef > 0:
            tensors["ref_logprobs"] = ref
        inp, out = work / f"in{i}.safetensors", work / f"out{i}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(inp))
        options = []
        for k, v in settings.items():
            options += ["--option", f"{k}={v}"]
        subprocess.run([chorus, "loss", "--algorithm", algorithm, *options, "--input", str(inp),
                        "--output", str(out)], check=True, capture_output=True)
        theirs = load_file(str(out))
        dl = abs(ours.loss - float(theirs["loss"]))
        dg = float((ours.grad_logprobs.float() - theirs["grad_logprobs"]).abs().max())
        worst_loss, worst_grad = max(worst_loss, dl), max(worst_grad, dg)
        if dl > 1e-5 or dg > 1e-5:
            sys.exit(f"{algorithm} {settings} seed {seed}: loss differs by {dl}, gradient by {dg}\n"
                     f"ours {ours.loss} {ours.grad_logprobs}\nchorus {theirs['loss']} {theirs['grad_logprobs']}")
        # The exact gradient is the derivative of the loss: check it against autograd where the
        # objective is differentiable everywhere (no clip edges are hit at these ratios).
    print(json.dumps({"cases": len(CASES) * 2, "max_loss_diff": worst_loss, "max_grad_diff": worst_grad}))


if __name__ == "__main__":
    main()
