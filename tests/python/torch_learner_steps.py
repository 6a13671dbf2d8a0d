"""The PyTorch learner's trainer keeps Chorus' learner's contracts. Run by tests/torch_learner.rs:

    python torch_learner_steps.py CHECKPOINT WORK_DIR

1. Every parameter gets a non-zero gradient from an SFT step and from an RL step.
2. A step whose loss is not finite is refused: the version advances, no weight moves.
3. Exact resume: two steps, save, resume, one step equals three steps straight (weights and
   optimizer moments bit for bit, counters equal).
4. A learner checkpoint holds the step reports so far and the pending one (a learner killed
   before sending it replays it), and a learner resumed there starts with them.
5. Micro-batches: steps run in passes of one sequence (`micro_batch_tokens` below one
   sequence's padded length), each pass as wide as its sequence, give the one-pass step's
   gradients (SFT, and RL with each aggregation) and losses; passes group sequences by
   length.
Prints a JSON summary; exits non-zero on the first breach.
"""

import dataclasses
import json
import sys

import torch

from chorus_learner import Objective, RlSequence, SftSequence, Trainer, load_model
from chorus_learner.trainer import layout


def sft_batch():
    return [SftSequence(tokens=[1, 65, 57, 66, 75, 30, 31, 2], prompt_len=5),
            SftSequence(tokens=[1, 70, 71, 40, 41, 42], prompt_len=3, loss_mask=[True, False, True])]


def rl_batch():
    return [RlSequence(tokens=[1, 65, 57, 66, 75, 30, 31], prompt_len=5,
                       behaviour_logprobs=[-5.5, -5.7], advantage=1.0),
            RlSequence(tokens=[1, 65, 57, 66, 75, 44, 45, 46], prompt_len=5,
                       behaviour_logprobs=[-5.2, -5.9, -5.4], advantage=-1.0)]


def weights(t):
    return {k: v.detach().clone() for k, v in t.model.state_dict().items()}


def check(cond, what):
    if not cond:
        sys.exit(what)


def main():
    checkpoint, work = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    grpo = Objective.for_algorithm("grpo")

    # 1. Gradients reach every parameter.
    for name, step in (("sft", lambda t: t.sft_step(sft_batch())),
                       ("rl", lambda t: t.rl_step([(grpo, rl_batch())]))):
        t = Trainer(load_model(checkpoint), lr=1e-3)
        t.optimizer.step = lambda: None  # keep the gradients for inspection
        step(t)
        dead = [n for n, p in t.model.named_parameters()
                if p.grad is None or float(p.grad.abs().max()) == 0.0]
        check(not dead, f"{name} step: no gradient reaches {dead}")

    # 2. A non-finite loss is refused.
    t = Trainer(load_model(checkpoint), lr=1e-3)
    before = weights(t)
    bad = rl_batch()
    bad[0].advantage = float("inf")
    r = t.rl_step([(Objective.for_algorithm("reinforce"), bad)])
    check(r.skipped and "not finite" in r.skipped, f"non-finite step not refused: {r}")
    check(t.version == 1 and r.version == 1, f"the version did not advance: {t.version}")
    check(all(torch.equal(before[k], v) for k, v in weights(t).items()), "a refused step moved weights")

    # 3. Exact resume.
    def three(t, start):
        steps = [lambda: t.sft_step(sft_batch(), lr=2e-3),
                 lambda: t.rl_step([(grpo, rl_batch())], lr=1e-3),
                 lambda: t.rl_step([(Objective.for_algorithm("dapo"), rl_batch())], lr=1e-3)]
        for s in steps[start:]:
            s()

    straight = Trainer(load_model(checkpoint), lr=1e-3)
    three(straight, 0)
    first = Trainer(load_model(checkpoint), lr=1e-3)
    for s in (lambda: first.sft_step(sft_batch(), lr=2e-3),
              lambda: first.rl_step([(grpo, rl_batch())], lr=1e-3)):
        s()
    first.save(f"{work}/resume")
    resumed = Trainer.resume(f"{work}/resume")
    check((resumed.step, resumed.version) == (2, 2), f"counters {resumed.step} {resumed.version}")
    resumed.rl_step([(Objective.for_algorithm("dapo"), rl_batch())], lr=1e-3)
    a, b = weights(straight), weights(resumed)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    check(diff == 0.0, f"resumed weights differ from straight ones by {diff}")
    moved = max(float((a[k] - w).abs().max()) for k, w in weights(Trainer(load_model(checkpoint))).items())
    check(moved > 0, "three steps moved nothing")

    # 4. Step reports travel with learner checkpoints.
    from chorus_learner._proto import learner_pb2
    from chorus_learner.service import LearnerState, load_reports
    sent = [learner_pb2.StepReport(run_id="r", step=s, policy_version=s, group_ids=[f"g{s}"])
            for s in (1, 2)]
    state = LearnerState(resumed, "r", checkpoints=f"{work}/learner", checkpoint_every=3,
                         replay=sent)
    pending = learner_pb2.StepReport(run_id="r", step=3, policy_version=3, checkpoint_version=3)
    state._save("every", pending)
    saved = f"{work}/learner/step-{resumed.step:08}"
    got = load_reports(saved)
    check(got == sent + [pending], f"saved reports: {got}")
    back = LearnerState(Trainer.resume(saved), "r", replay=load_reports(saved))
    replayed = back.steps_after(0, lambda: True)
    check([r.step for r in replayed] == [1, 2, 3] and replayed[2].checkpoint_version == 3,
          f"replayed reports: {replayed}")

    # 5. Passes of one sequence each give the one-pass step.
    penalised = dataclasses.replace(grpo, kl_coef=0.1, kl_estimator="k3")

    def four(t):
        losses = [t.sft_step(sft_batch(), lr=2e-3).loss,
                  t.rl_step([(grpo, rl_batch())], lr=1e-3).loss,
                  t.rl_step([(Objective.for_algorithm("dapo"), rl_batch()),
                             (Objective.for_algorithm("dr_grpo"), rl_batch()[:1])], lr=1e-3).loss,
                  t.rl_step([(Objective.for_algorithm("gspo"), rl_batch())], lr=1e-3).loss]
        # A KL-penalised stage: its reference runs in passes too.
        t.enter_stage(1, kl_penalty=True)
        t.rl_step([(penalised, rl_batch())], lr=1e-3)
        r = t.rl_step([(penalised, rl_batch())], lr=1e-3)
        check(r.kl > 0, f"no KL to the stage's start after a step: {r}")
        return losses + [r.loss, r.kl]

    def recording(t):
        # Each step's gradients as they reach the optimizer: passes change the order of float
        # sums, and Adam's first steps turn a gradient element's sign into a step of the full
        # learning rate, so near-zero elements would make weights a noisy measure.
        t.seen = []
        apply = t._apply

        def record(r, lr, mtp):
            t.seen.append({n: p.grad.clone() for n, p in t.model.named_parameters()
                           if p.grad is not None})
            return apply(r, lr, mtp)
        t._apply = record
        return t

    whole = recording(Trainer(load_model(checkpoint), lr=1e-3))
    passes = recording(Trainer(load_model(checkpoint), lr=1e-3, micro_batch_tokens=4))
    check(len(passes._passes(2, layout(rl_batch(), whole.vocab))) == 2, "not split into passes")
    # Passes group by length: one 20-token sequence and three of 5 make two passes of 20 tokens.
    ragged = [RlSequence(tokens=[1] * n, prompt_len=1, behaviour_logprobs=[-1.0] * (n - 1),
                         advantage=1.0) for n in (5, 20, 5, 5)]
    bucketed = Trainer(load_model(checkpoint), micro_batch_tokens=20)._passes(4, layout(ragged, whole.vocab))
    check(bucketed == [[1], [0, 2, 3]], f"passes not grouped by length: {bucketed}")
    losses_whole, losses_passes = four(whole), four(passes)
    check(len(whole.seen) == len(passes.seen) == 6, "a step's gradients were not recorded")
    check(all(ga.keys() == gb.keys() for ga, gb in zip(whole.seen, passes.seen)),
          "passes reached other parameters than one pass")
    micro_diff = max(float((ga[k] - gb[k]).abs().max() / ga[k].abs().max().clamp(min=1e-12))
                     for ga, gb in zip(whole.seen, passes.seen) for k in ga)
    loss_diff = max(abs(x - y) for x, y in zip(losses_whole, losses_passes))
    a = weights(whole)
    check(micro_diff <= 1e-4 and loss_diff <= 1e-6,
          f"micro-batches differ from one pass: gradients by {micro_diff} of their largest "
          f"element, losses by {loss_diff}")
    print(json.dumps({"parameters": len(a), "resume_max_diff": diff, "moved": moved,
                      "replayed_reports": len(replayed), "micro_batch_max_diff": micro_diff}))


if __name__ == "__main__":
    main()
