"""A policy trained with PyTorch: the steps of Chorus' learner (`learner/src/trainer.rs`) on an
HF transformers causal LM, with the same layout, losses, statistics and version counting.

- RL steps: per part (sequences sharing an objective), the loss's exact gradient with respect
  to the completion log-probabilities comes from `objective.evaluate` and is backpropagated as
  `sum(stopgrad(grad) * lp)`, each part weighted by its share of the sequences. One optimizer
  step per batch, so the learner's log-probabilities at the start of the step are the ones
  computed in it. A part whose padded tokens exceed `micro_batch_tokens` runs in passes of
  at most that many (as Chorus' learner): a forward pass without gradients gives every
  sequence's log-probabilities for `evaluate`, then each pass runs forward and backward again
  with its rows' gradient, so memory follows the pass and the gradient is the one-pass one.
  Passes group sequences of similar length, longest first, and each is only as wide as its
  longest sequence (the model is causal, so padding after a sequence changes none of its
  log-probabilities): a few long episodes do not make every short answer pay their width.
- SFT steps: next-token cross-entropy, token mean over the learned completion tokens (in
  passes of at most `micro_batch_tokens` padded tokens, each back-propagated).
- AdamW (betas 0.9/0.999, eps 1e-8, no weight decay unless set), the global gradient norm
  clipped to `max_grad_norm` (scale `max / (norm + 1e-6)`, as Chorus does); a step whose loss or
  gradient norm is not finite is refused: the version advances, the weights do not.
- The KL reference is the policy at the start of a KL-penalised stage.
"""

import copy
import json
import math
import os
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from transformers import AutoModelForCausalLM

from .objective import Objective, evaluate

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
# As Chorus' learner (`DEFAULT_MICRO_BATCH_TOKENS`): padded tokens in one forward and backward.
DEFAULT_MICRO_BATCH_TOKENS = 8192


@dataclass
class RlSequence:
    tokens: List[int]
    prompt_len: int
    behaviour_logprobs: List[float]
    advantage: float
    loss_mask: Optional[List[bool]] = None


@dataclass
class SftSequence:
    tokens: List[int]
    prompt_len: int
    loss_mask: Optional[List[bool]] = None


@dataclass
class StepReport:
    step: int
    version: int
    lr: float = 0.0
    grad_norm: float = float("nan")
    loss: float = 0.0
    kl: float = 0.0
    entropy: float = 0.0
    clip_fraction: float = 0.0
    mean_abs_logprob_diff: float = 0.0
    tokens: int = 0
    skipped: Optional[str] = None


class BatchError(ValueError):
    """A batch that cannot be trained on; the message says why."""


@dataclass
class Layout:
    ids: torch.Tensor  # [B, T]
    targets: torch.Tensor  # [B, T-1]
    mask: torch.Tensor  # [B, T-1] bool: positions in the loss
    width: int
    firsts: List[int] = field(default_factory=list)  # position of each first completion token
    lengths: List[int] = field(default_factory=list)  # tokens of each sequence


def layout(seqs, vocab):
    """Right-padded ids; position p predicts token p + 1 (as Chorus' learner lays batches out)."""
    t = max((len(s.tokens) for s in seqs), default=0)
    if t < 2:
        raise BatchError("every sequence needs a prompt token and at least one completion token")
    width = t - 1
    ids = torch.zeros((len(seqs), t), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    firsts = []
    for b, s in enumerate(seqs):
        if not 0 < s.prompt_len < len(s.tokens):
            raise BatchError(f"sequence {b}: prompt_len {s.prompt_len} must be in [1, {len(s.tokens)})")
        bad = [x for x in s.tokens if not 0 <= x < vocab]
        if bad:
            raise BatchError(f"sequence {b}: token id {bad[0]} is outside the vocabulary ({vocab})")
        completion = len(s.tokens) - s.prompt_len
        if s.loss_mask is not None and len(s.loss_mask) != completion:
            raise BatchError(
                f"sequence {b}: {completion} completion tokens but a loss mask of {len(s.loss_mask)}")
        ids[b, :len(s.tokens)] = torch.tensor(s.tokens, dtype=torch.long)
        for j in range(completion):
            if s.loss_mask is None or s.loss_mask[j]:
                mask[b, s.prompt_len - 1 + j] = True
        firsts.append(s.prompt_len - 1)
    return Layout(ids=ids, targets=ids[:, 1:], mask=mask, width=width, firsts=firsts,
                  lengths=[len(s.tokens) for s in seqs])


def token_logprobs(model, l: Layout):
    """Log-probability [B, T-1] of each next token, and the log-softmax [B, T-1, V]."""
    logits = model(input_ids=l.ids, use_cache=False).logits[:, : l.width].float()
    logp = torch.log_softmax(logits, dim=-1)
    lp = logp.gather(2, l.targets.unsqueeze(2)).squeeze(2)
    return lp, logp


def masked_mean(x, mask):
    m = mask.to(x.dtype)
    return float((x * m).sum() / m.sum().clamp(min=1))


def entropy_sum(logp, mask):
    """The per-token entropy summed over `mask`'s positions, and their count (no gradient)."""
    with torch.no_grad():
        h = -(logp.exp() * logp).sum(-1)
        m = mask.to(h.dtype)
        return float((h * m).sum()), float(m.sum())


def decoder_layers(model):
    """The blocks FSDP2 shards one by one (NemotronH's `layers`, or any model's first
    `layers` list)."""
    for m in model.modules():
        layers = getattr(m, "layers", None)
        if isinstance(layers, torch.nn.ModuleList):
            return list(layers)
    return []


def local(t):
    """A tensor's local part (its shard, for an FSDP2 DTensor)."""
    return t.to_local() if hasattr(t, "to_local") else t


def is_mtp(name):
    return name.startswith("mtp.")


def is_router_weight(name):
    return name.endswith(".gate.weight")


def checkpoint_names(model_dir):
    """The tensor names of an HF checkpoint directory (single file or sharded)."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return set(json.load(f)["weight_map"])
    from safetensors import safe_open
    with safe_open(os.path.join(model_dir, "model.safetensors"), "pt") as f:
        return set(f.keys())


def load_model(model_dir, device="cpu"):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.to(device)
    # No dropout: the gradient is that of the function the workers sample from.
    model.eval()
    # transformers may rename modules on load (5.x holds NemotronH's `backbone.` as `model.`);
    # published weights carry the checkpoint's own names, which Chorus' workers and vLLM read.
    names = checkpoint_names(model_dir)
    model.chorus_names = {}
    for key in model.state_dict():
        candidates = [key]
        if key.startswith("model."):
            candidates.append("backbone." + key[len("model."):])
        model.chorus_names[key] = next((c for c in candidates if c in names), key)
    return model


class Trainer:
    """A policy being trained, its optimizer, and the step and version counters."""

    def __init__(self, model, lr=1e-3, max_grad_norm=1.0, objective=None, weight_decay=0.0,
                 shard=False, micro_batch_tokens=DEFAULT_MICRO_BATCH_TOKENS):
        """`shard`: split parameters, gradients and optimizer state over the ranks of the
        initialised `torch.distributed` process group with FSDP2 (`fully_shard`); every rank
        then makes the same calls, each computing its share of the batch."""
        if micro_batch_tokens < 1:
            raise ValueError(f"micro_batch_tokens must be at least 1, not {micro_batch_tokens}")
        self.micro_batch_tokens = micro_batch_tokens
        self.world = 1
        self.rank = 0
        if shard:
            import torch.distributed as dist
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            self.world, self.rank = dist.get_world_size(), dist.get_rank()
            names = getattr(model, "chorus_names", {})
            device = "cuda" if torch.cuda.is_available() else "cpu"
            mesh = init_device_mesh(device, (self.world,))
            for layer in decoder_layers(model):
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            model.chorus_names = names
        self.model = model
        self.vocab = model.config.vocab_size
        self.default_lr = lr
        self.max_grad_norm = max_grad_norm
        self.objective = objective or Objective.for_algorithm("grpo")
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            [p for _, p in self.named], lr=lr, betas=(0.9, 0.999), eps=1e-8,
            weight_decay=weight_decay)
        self.step = 0
        self.version = 0
        self.stage = None
        self.reference = None
        self.router_frozen = False

    # -- stages -----------------------------------------------------------------------------

    def enter_stage(self, stage, kl_penalty):
        """As Chorus' learner: a new stage takes its starting weights as the KL reference when
        it is penalised, and drops any reference otherwise."""
        if self.stage != stage:
            self.stage = stage
            self.reference = self._frozen_copy() if kl_penalty else None
        elif kl_penalty and self.reference is None:
            self.reference = self._frozen_copy()

    def _frozen_copy(self):
        if self.world > 1:
            raise BatchError("KL penalties are not supported by the sharded (FSDP2) learner yet; "
                             "run it in one process, or set kl_coef = 0")
        self.reference = None
        ref = copy.deepcopy(self.model)
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref

    # -- steps ------------------------------------------------------------------------------

    def _mine(self, n):
        """The batch rows this rank computes (all of them without sharding)."""
        return list(range(self.rank, n, self.world))

    def _passes(self, n, l):
        """This rank's rows of an `n`-sequence layout `l`, longest first, in passes of at most
        `micro_batch_tokens` tokens counted at each pass's own width (its longest row; one row
        at least). Every rank makes the same number of passes, some maybe without rows,
        because FSDP2's gathers are collective."""
        rows = sorted(self._mine(n), key=lambda i: -l.lengths[i])
        passes = []
        for i in rows:
            # Sorted longest first: a pass's width is its first row's length.
            if passes and len(passes[-1]) + 1 <= self.micro_batch_tokens // l.lengths[passes[-1][0]]:
                passes[-1].append(i)
            else:
                passes.append([i])
        count = max(1, len(passes))
        if self.world > 1:
            import torch.distributed as dist
            t = torch.tensor([count], dtype=torch.int64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            count = int(t.item())
        return passes + [[] for _ in range(count - len(passes))]

    def _rows_logprobs(self, model, l, passes, entropy=True):
        """Log-probabilities of this rank's rows over `passes` (no gradient), all ranks' rows
        gathered into [B, T], and this rank's entropy sum and token count (0 without
        `entropy`)."""
        mine, h_sum, count = [], 0.0, 0.0
        with torch.no_grad():
            for part in passes:
                lp, logp, mask = self._forward_rows(model, l, part)
                if entropy:
                    h, c = entropy_sum(logp, mask & bool(part))
                    h_sum, count = h_sum + h, count + c
                if part:
                    mine.append(lp)
                del logp
        local_lp = torch.cat(mine) if mine else lp
        rows = [i for part in passes for i in part]
        return self._gather_rows(local_lp, rows, (len(l.ids), l.width)), h_sum, count

    def _forward_rows(self, model, l, rows):
        """Log-probabilities [len(rows), T] (zero past each pass's width) and the log-softmax
        and mask of `rows` of layout `l`, run at the width of the longest of them. A rank with
        no rows still runs a forward pass on one row, scaled by 0 later, because FSDP2's
        gathers are collective."""
        pick = rows or [0]
        width = max(l.lengths[i] for i in pick) - 1
        sub = Layout(ids=l.ids[pick, :width + 1], targets=l.targets[pick, :width],
                     mask=l.mask[pick, :width], width=width)
        lp, logp = token_logprobs(model, sub)
        lp = torch.nn.functional.pad(lp, (0, l.width - width))
        return lp, logp, sub.mask

    def _gather_rows(self, part, rows, shape):
        """Every rank's rows of a [B, T] tensor, assembled in batch order (no gradient)."""
        if self.world == 1 and rows == list(range(shape[0])):
            return part.detach()
        gathered = [(rows, part.detach())]
        if self.world > 1:
            import torch.distributed as dist
            gathered = [None] * self.world
            dist.all_gather_object(gathered, (rows, part.detach()))
        full = torch.zeros(shape, dtype=part.dtype)
        for rs, t in gathered:
            if rs:
                full[rs] = t
        return full

    def _all_sum(self, *values):
        if self.world == 1:
            return values
        import torch.distributed as dist
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return tuple(t.tolist())

    def rl_step(self, parts, lr=None):
        """One RL update on `parts`: a list of (Objective, [RlSequence])."""
        parts = [(o, b) for o, b in parts if b]
        total = sum(len(b) for _, b in parts)
        if total == 0:
            raise BatchError("empty batch")
        penalised = sum(len(b) / total for o, b in parts if o.kl_coef > 0)
        self.optimizer.zero_grad(set_to_none=True)
        r = StepReport(step=0, version=0)
        for o, batch in parts:
            share = len(batch) / total
            l = layout(batch, self.vocab)
            beh = torch.zeros((len(batch), l.width), dtype=torch.float32)
            for i, s in enumerate(batch):
                n = len(s.tokens) - s.prompt_len
                if len(s.behaviour_logprobs) != n:
                    raise BatchError(
                        f"sequence {i}: {n} completion tokens but {len(s.behaviour_logprobs)} logprobs")
                beh[i, l.firsts[i]:l.firsts[i] + n] = torch.tensor(s.behaviour_logprobs)
            rows = self._mine(len(batch))
            passes = self._passes(len(batch), l)
            ref = None
            if o.kl_coef > 0 and self.reference is not None:
                ref, _, _ = self._rows_logprobs(self.reference, l, passes, entropy=False)
            adv = torch.tensor([s.advantage for s in batch], dtype=torch.float32)
            # FSDP2 averages gradients over the ranks: each rank's part of the sum is scaled
            # back up by the world size.
            scale = share * self.world
            if len(passes) == 1:
                lp, logp, mask = self._forward_rows(self.model, l, rows)
                full = self._gather_rows(lp, rows, beh.shape)
                ev = evaluate(o, full, full, beh, adv, l.mask, ref)
                grad = ev.grad_logprobs[rows or [0]].to(lp.dtype) * (1.0 if rows else 0.0)
                (lp * grad).sum().mul(scale).backward()
                h_sum, count = entropy_sum(logp, mask & bool(rows))
            else:
                full, h_sum, count = self._rows_logprobs(self.model, l, passes)
                ev = evaluate(o, full, full, beh, adv, l.mask, ref)
                for part in passes:
                    lp, _, _ = self._forward_rows(self.model, l, part)
                    grad = ev.grad_logprobs[part or [0]].to(lp.dtype) * (1.0 if part else 0.0)
                    (lp * grad).sum().mul(scale).backward()
            r.loss += share * ev.loss
            if penalised == 0:
                r.kl += share * ev.kl
            elif o.kl_coef > 0:
                r.kl += share / penalised * ev.kl
            h_sum, count = self._all_sum(h_sum, count)
            r.entropy += share * h_sum / max(count, 1)
            r.clip_fraction += share * ev.clip_fraction
            r.mean_abs_logprob_diff += share * masked_mean((full - beh).abs(), l.mask)
            r.tokens += ev.tokens
        return self._apply(r, lr, mtp=False)

    def sft_step(self, batch, lr=None):
        """One supervised update: cross-entropy on the learned completion tokens."""
        if not batch:
            raise BatchError("empty batch")
        self.optimizer.zero_grad(set_to_none=True)
        l = layout(batch, self.vocab)
        tokens = int(l.mask.sum())
        passes = self._passes(len(batch), l)
        # One pass: backward only once the loss is known to be finite. Several: each pass is
        # back-propagated as it goes (a refused step's gradients are never applied).
        local_loss, local_h, single = 0.0, 0.0, None
        for part in passes:
            lp, logp, mask = self._forward_rows(self.model, l, part)
            mask = mask & bool(part)
            part_sum = -(lp[:, :mask.shape[1]] * mask.to(lp.dtype)).sum()
            local_loss += float(part_sum.detach())
            local_h += entropy_sum(logp, mask)[0]
            del logp
            if len(passes) == 1:
                single = part_sum
            else:
                (part_sum * (self.world / max(tokens, 1))).backward()
        loss_sum, h_sum = self._all_sum(local_loss, local_h)
        r = StepReport(step=0, version=0, loss=loss_sum / max(tokens, 1),
                       entropy=h_sum / max(tokens, 1), tokens=tokens)
        if single is not None and math.isfinite(r.loss):
            (single * (self.world / max(tokens, 1))).backward()
        return self._apply(r, lr, mtp=False)

    def set_router_frozen(self, frozen):
        """Leaves the MoE routers' `gate.weight` out of the following steps' updates."""
        self.router_frozen = frozen

    def skip_step(self):
        """A step that could not be taken still counts: the orchestrator waits for its version."""
        self.step += 1
        self.version += 1

    def _updated(self, name, mtp):
        if mtp:
            return is_mtp(name)
        return not (is_mtp(name) or (self.router_frozen and is_router_weight(name)))

    def _apply(self, r, lr, mtp):
        self.step += 1
        lr = self.default_lr if not lr else lr
        r.step, r.lr = self.step, lr
        if not math.isfinite(r.loss):
            self.version += 1
            r.version, r.grad_norm, r.skipped = self.version, float("nan"), f"loss is not finite ({r.loss})"
            return r
        for name, p in self.named:
            if not self._updated(name, mtp):
                p.grad = None
        grads = [p.grad for _, p in self.named if p.grad is not None]
        # Squares of the local shards, summed over the ranks: the global norm.
        (squares,) = self._all_sum(sum(float((local(g).double() ** 2).sum()) for g in grads))
        norm = math.sqrt(squares)
        r.grad_norm = norm
        if not math.isfinite(norm):
            self.version += 1
            r.version, r.skipped = self.version, f"gradient norm is not finite ({norm})"
            return r
        if self.max_grad_norm > 0 and norm > self.max_grad_norm:
            scale = self.max_grad_norm / (norm + 1e-6)
            for g in grads:
                g.mul_(scale)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.version += 1
        r.version = self.version
        return r

    # -- weights and checkpoints ------------------------------------------------------------

    def tensors(self):
        """The weights by their HF names, as published to workers."""
        names = getattr(self.model, "chorus_names", {})
        if self.world > 1:
            # Collective: every rank calls it; each gets the full tensors.
            from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                                 get_model_state_dict)
            state = get_model_state_dict(
                self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                     broadcast_from_rank0=False))
        else:
            state = self.model.state_dict()
        return {names.get(k, k): v for k, v in state.items() if v.is_floating_point()}

    def save(self, directory):
        """HF checkpoint (config and weights) plus optimizer state and counters. Sharded: a
        collective call; rank 0 writes the full weights, without optimizer state (not yet)."""
        if self.world > 1:
            tensors = self.tensors()
            if self.rank == 0:
                from safetensors.torch import save_file
                os.makedirs(directory, exist_ok=True)
                self.model.config.save_pretrained(directory)
                save_file({k: v.contiguous() for k, v in tensors.items()},
                          os.path.join(directory, "model.safetensors"))
                _write_state(directory, {"step": self.step, "version": self.version,
                                         "stage": self.stage, "default_lr": self.default_lr,
                                         "max_grad_norm": self.max_grad_norm,
                                         "reference": False, "optimizer": False})
            return
        os.makedirs(directory, exist_ok=True)
        self.model.save_pretrained(directory)
        torch.save(self.optimizer.state_dict(), os.path.join(directory, OPTIMIZER_FILE))
        state = {"step": self.step, "version": self.version, "stage": self.stage,
                 "default_lr": self.default_lr, "max_grad_norm": self.max_grad_norm,
                 "reference": self.reference is not None}
        if self.reference is not None:
            self.reference.save_pretrained(os.path.join(directory, "reference"))
        _write_state(directory, state)

    @staticmethod
    def resume(directory, device="cpu", objective=None,
               micro_batch_tokens=DEFAULT_MICRO_BATCH_TOKENS):
        """The trainer `save` wrote, exactly: weights, optimizer moments, counters, reference."""
        with open(os.path.join(directory, STATE_FILE)) as f:
            state = json.load(f)
        if state.get("optimizer") is False:
            raise ValueError(f"{directory} was saved by the sharded learner without optimizer "
                             "state; it cannot be resumed exactly (start from it with --model)")
        t = Trainer(load_model(directory, device), lr=state["default_lr"],
                    max_grad_norm=state["max_grad_norm"], objective=objective,
                    micro_batch_tokens=micro_batch_tokens)
        t.optimizer.load_state_dict(
            torch.load(os.path.join(directory, OPTIMIZER_FILE), weights_only=True))
        t.step, t.version, t.stage = state["step"], state["version"], state["stage"]
        if state.get("reference"):
            t.reference = load_model(os.path.join(directory, "reference"), device)
            for p in t.reference.parameters():
                p.requires_grad_(False)
        return t


def _write_state(directory, state):
    """Writes the counters last and whole (renamed into place): a checkpoint directory with
    them is complete, so a learner killed mid-save leaves none that looks resumable."""
    path = os.path.join(directory, STATE_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(state, f, indent=2)
    os.replace(path + ".tmp", path)
