"""Two processes with FSDP2 on gloo train to the same weights as one process. Run by
tests/torch_learner.rs under torchrun:

    python -m torch.distributed.run --nproc-per-node 2 torch_fsdp_agree.py CHECKPOINT

Both ranks take the same steps on a sharded trainer (an SFT step on three sequences, split 2/1
over the ranks; a GRPO step on three; a DAPO step on one, which leaves a rank without a
sequence), once in one pass per step and once in passes of one sequence; rank 0 then takes
the same steps in one process, unsharded, and compares every weight (1e-5) and every step's
loss. Prints a JSON summary from rank 0.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

from chorus_learner import Objective, RlSequence, SftSequence, Trainer, load_model


def steps(t):
    sft = [SftSequence(tokens=[1, 65, 57, 66, 75, 30, 31, 2], prompt_len=5),
           SftSequence(tokens=[1, 70, 71, 40, 41, 42], prompt_len=3, loss_mask=[True, False, True]),
           SftSequence(tokens=[1, 80, 81, 82, 83], prompt_len=2)]
    rl = [RlSequence(tokens=[1, 65, 57, 66, 75, 30, 31], prompt_len=5,
                     behaviour_logprobs=[-5.5, -5.7], advantage=1.0),
          RlSequence(tokens=[1, 65, 57, 66, 75, 44, 45, 46], prompt_len=5,
                     behaviour_logprobs=[-5.2, -5.9, -5.4], advantage=-1.0),
          RlSequence(tokens=[1, 65, 57, 90, 91], prompt_len=3,
                     behaviour_logprobs=[-5.0, -5.6], advantage=0.5)]
    return [t.sft_step(sft, lr=3e-3),
            t.rl_step([(Objective.for_algorithm("grpo"), rl)], lr=2e-3),
            t.rl_step([(Objective.for_algorithm("dapo"), rl[:1])], lr=2e-3)]


def main():
    checkpoint = sys.argv[1]
    dist.init_process_group("gloo")
    sharded = Trainer(load_model(checkpoint), lr=1e-3, shard=True)
    reports = steps(sharded)
    full = sharded.tensors()
    # The same in passes of one sequence (every rank making as many passes as the busiest).
    passes = Trainer(load_model(checkpoint), lr=1e-3, shard=True, micro_batch_tokens=4)
    reports_passes = steps(passes)
    full_passes = passes.tensors()
    if dist.get_rank() == 0:
        alone = Trainer(load_model(checkpoint), lr=1e-3)
        expected = steps(alone)
        want = alone.tensors()
        assert set(full) == set(want), (sorted(full), sorted(want))
        diff = max(float((got[k] - want[k]).abs().max()) for got in (full, full_passes)
                   for k in want)
        losses = max(abs(a.loss - b.loss) for run in (reports, reports_passes)
                     for a, b in zip(run, expected))
        moved = max(float((want[k] - v).abs().max())
                    for k, v in Trainer(load_model(checkpoint)).tensors().items())
        if diff > 1e-5 or losses > 1e-5 or moved == 0:
            sys.exit(f"sharded vs one process: weights differ by {diff}, losses by {losses}, "
                     f"moved {moved}")
        print(json.dumps({"ranks": dist.get_world_size(), "max_weight_diff": diff,
                          "max_loss_diff": losses, "moved": moved}), flush=True)
    # The ranks leave together: rank 1 used to tear gloo down alone while rank 0 compared, and
    # once (under load, in CI) aborted there ("terminate called without an active exception").
    # Interpreter finalisation is skipped too, where gloo's threads may still drop tensors.
    dist.barrier()
    del sharded, passes
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
