"""A policy trained with PyTorch: the steps of Chorus' learner (`learner/src/trainer.rs`) on an
HF transformers causal LM, with the same layout, losses, statistics and version counting.

- RL steps: one padded forward pass per part (sequences sharing an objective); the loss's exact
  gradient with respect to the completion log-probabilities comes from `objective.evaluate` and
  is backpropagated as `sum(stopgrad(grad) * lp)`, each part weighted by its share of the
  sequences. One optimizer step per batch, so the learner's log-probabilities at the start of
  the step are the ones computed in it.
- SFT steps: next-token cross-entropy, token mean over the learned completion tokens.
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
    return Layout(ids=ids, targets=ids[:, 1:], mask=mask, width=width, firsts=firsts)


def token_logprobs(model, l: Layout):
    """Log-probability [B, T-1] of each next token, and the log-softmax [B, T-1, V]."""
    logits = model(input_ids=l.ids, use_cache=False).logits[:, : l.width].float()
    logp = torch.log_softmax(logits, dim=-1)
    lp = logp.gather(2, l.targets.unsqueeze(2)).squeeze(2)
    return lp, logp


def masked_mean(x, mask):
    m = mask.to(x.dtype)
    return float((x * m).sum() / m.sum().clamp(min=1))


def entropy(logp, mask):
    with torch.no_grad():
        h = -(logp.exp() * logp).sum(-1)
        return masked_mean(h, mask)


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

    def __init__(self, model, lr=1e-3, max_grad_norm=1.0, objective=None, weight_decay=0.0):
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
        self.reference = None
        ref = copy.deepcopy(self.model)
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref

    # -- steps ------------------------------------------------------------------------------

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
            ref = None
            if o.kl_coef > 0 and self.reference is not None:
                with torch.no_grad():
                    ref, _ = token_logprobs(self.reference, l)
            adv = torch.tensor([s.advantage for s in batch], dtype=torch.float32)
            lp, logp = token_logprobs(self.model, l)
            ev = evaluate(o, lp, lp, beh, adv, l.mask, ref)
            (lp * ev.grad_logprobs.to(lp.dtype)).sum().mul(share).backward()
            r.loss += share * ev.loss
            if penalised == 0:
                r.kl += share * ev.kl
            elif o.kl_coef > 0:
                r.kl += share / penalised * ev.kl
            r.entropy += share * entropy(logp, l.mask)
            r.clip_fraction += share * ev.clip_fraction
            diff = (lp.detach() - beh).abs()
            r.mean_abs_logprob_diff += share * masked_mean(diff, l.mask)
            r.tokens += ev.tokens
        return self._apply(r, lr, mtp=False)

    def sft_step(self, batch, lr=None):
        """One supervised update: cross-entropy on the learned completion tokens."""
        if not batch:
            raise BatchError("empty batch")
        self.optimizer.zero_grad(set_to_none=True)
        l = layout(batch, self.vocab)
        lp, logp = token_logprobs(self.model, l)
        m = l.mask.to(lp.dtype)
        tokens = int(l.mask.sum())
        loss = -(lp * m).sum() / max(tokens, 1)
        r = StepReport(step=0, version=0, loss=float(loss.detach()), entropy=entropy(logp, l.mask),
                       tokens=tokens)
        if math.isfinite(r.loss):
            loss.backward()
        return self._apply(r, lr, mtp=False)

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
        norm = float(torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g.double()) for g in grads]))) if grads else 0.0
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
        return {names.get(k, k): v for k, v in self.model.state_dict().items()
                if v.is_floating_point()}

    def save(self, directory):
        """HF checkpoint (config and weights) plus optimizer state and counters."""
        os.makedirs(directory, exist_ok=True)
        self.model.save_pretrained(directory)
        torch.save(self.optimizer.state_dict(), os.path.join(directory, OPTIMIZER_FILE))
        state = {"step": self.step, "version": self.version, "stage": self.stage,
                 "default_lr": self.default_lr, "max_grad_norm": self.max_grad_norm,
                 "reference": self.reference is not None}
        if self.reference is not None:
            self.reference.save_pretrained(os.path.join(directory, "reference"))
        with open(os.path.join(directory, STATE_FILE), "w") as f:
            json.dump(state, f, indent=2)

    @staticmethod
    def resume(directory, device="cpu", objective=None):
        """The trainer `save` wrote, exactly: weights, optimizer moments, counters, reference."""
        with open(os.path.join(directory, STATE_FILE)) as f:
            state = json.load(f)
        t = Trainer(load_model(directory, device), lr=state["default_lr"],
                    max_grad_norm=state["max_grad_norm"], objective=objective)
        t.optimizer.load_state_dict(
            torch.load(os.path.join(directory, OPTIMIZER_FILE), weights_only=True))
        t.step, t.version, t.stage = state["step"], state["version"], state["stage"]
        if state.get("reference"):
            t.reference = load_model(os.path.join(directory, "reference"), device)
            for p in t.reference.parameters():
                p.requires_grad_(False)
        return t
