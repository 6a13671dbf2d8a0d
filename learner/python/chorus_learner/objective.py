"""The RL objectives of Chorus' learner, with the same definitions (`learner/src/objective.rs`).

`evaluate` returns the loss and its exact gradient with respect to the learner's
log-probabilities, computed in float64 on host tensors; a step backpropagates
`sum(stopgrad(grad) * logprobs)` through the model, as the Rust learner does, so both learners
follow one contract: which side of a clip is active, masked tokens, empty sequences and the
aggregation are decided here, not by how autograd breaks ties in `min`.

Notation, per sequence i and completion position t with mask m: lp the learner's
log-probabilities, old the learner's at the start of the step, beh the sampler's, A the
sequence's advantage, r = exp(lp - old), rho = exp(old - beh).
"""

from dataclasses import dataclass, replace
from typing import Optional

import torch

ALGORITHMS = ("grpo", "dapo", "dr_grpo", "gspo", "cispo", "reinforce")
CORRECTIONS = ("none", "tis", "icepop", "seq_mask_tis")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
KL_ESTIMATORS = ("k1", "k3")


@dataclass(frozen=True)
class Objective:
    """An RL objective, every setting resolved (the fields of the `Objective` message)."""

    algorithm: str = "grpo"
    eps_low: float = 0.2
    eps_high: float = 0.2
    correction: str = "none"
    tis_cap: float = 5.0
    icepop_low: float = 0.5
    icepop_high: float = 2.0
    aggregation: str = "seq_mean_token_mean"
    norm_length: Optional[int] = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"

    @staticmethod
    def for_algorithm(algorithm: str) -> "Objective":
        """`algorithm` with its own defaults, as Chorus' learner has them."""
        defaults = {
            "grpo": (0.2, 0.2, "seq_mean_token_mean"),
            "dapo": (0.2, 0.28, "token_mean"),
            "dr_grpo": (0.2, 0.2, "seq_mean_token_sum_norm"),
            "gspo": (3e-4, 4e-4, "seq_mean_token_mean"),
            "cispo": (1.0, 4.0, "token_mean"),
            "reinforce": (0.2, 0.2, "token_mean"),
        }
        if algorithm not in defaults:
            raise ValueError(f"algorithm `{algorithm}`; allowed: {', '.join(ALGORITHMS)}")
        lo, hi, agg = defaults[algorithm]
        return Objective(algorithm=algorithm, eps_low=lo, eps_high=hi, aggregation=agg)

    def with_settings(self, **settings) -> "Objective":
        return replace(self, **settings).validated()

    @staticmethod
    def from_proto(p) -> "Objective":
        """The objective of a `chorus.v1.Objective` message, validated."""
        return Objective(
            algorithm=p.algorithm,
            eps_low=p.eps_low,
            eps_high=p.eps_high,
            correction=p.correction,
            tis_cap=p.tis_cap,
            icepop_low=p.icepop_low,
            icepop_high=p.icepop_high,
            aggregation=p.aggregation,
            norm_length=p.norm_length or None,
            kl_coef=p.kl_coef,
            kl_estimator=p.kl_estimator,
        ).validated()

    def validated(self) -> "Objective":
        for name, value, allowed in (
            ("algorithm", self.algorithm, ALGORITHMS),
            ("correction", self.correction, CORRECTIONS),
            ("aggregation", self.aggregation, AGGREGATIONS),
            ("kl_estimator", self.kl_estimator, KL_ESTIMATORS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} `{value}`; allowed: {', '.join(allowed)}")
        if not (self.eps_low >= 0 and self.eps_high >= 0 and self.kl_coef >= 0):
            raise ValueError("eps_low, eps_high and kl_coef must be >= 0")
        if not self.tis_cap > 0 or not 0 <= self.icepop_low <= self.icepop_high:
            raise ValueError("tis_cap must be > 0 and 0 <= icepop_low <= icepop_high")
        return self


@dataclass
class Evaluation:
    loss: float
    grad_logprobs: torch.Tensor  # [B, T], float64, 0 where the mask is 0
    clip_fraction: float
    mean_weight: float
    kl: float
    tokens: int


def _correction_weights(o: Objective, old, beh, mask):
    rho = torch.exp(old - beh)
    if o.correction == "none":
        return torch.ones_like(old)
    if o.correction == "tis":
        return torch.clamp(rho, max=o.tis_cap)
    if o.correction == "icepop":
        inside = (rho >= o.icepop_low) & (rho <= o.icepop_high)
        return torch.where(inside, rho, torch.zeros_like(rho))
    # seq_mask_tis: a sequence whose geometric-mean rho over its masked tokens leaves the band
    # is masked out entirely.
    m = mask.to(old.dtype)
    count = m.sum(dim=1)
    mean_log = torch.where(count > 0, ((old - beh) * m).sum(dim=1) / count.clamp(min=1), 0.0)
    geometric = torch.exp(mean_log)
    keep = (geometric >= o.icepop_low) & (geometric <= o.icepop_high)
    return torch.where(keep[:, None], torch.clamp(rho, max=o.tis_cap), torch.zeros_like(rho))


def _aggregation_coefficients(o: Objective, mask):
    m = mask.to(torch.float64)
    batch, width = mask.shape
    if o.aggregation == "token_mean":
        total = m.sum()
        return m / total if total > 0 else m * 0
    if o.aggregation == "seq_mean_token_mean":
        counts = m.sum(dim=1)
        sequences = (counts > 0).sum()
        denom = (counts * sequences)[:, None]
        return torch.where(denom > 0, m / denom.clamp(min=1), 0.0)
    length = max(o.norm_length or width, 1)
    return m / (max(batch, 1) * length)


def evaluate(o: Objective, logprobs, old_logprobs, behaviour_logprobs, advantages, mask,
             ref_logprobs=None) -> Evaluation:
    """The loss of `o` on a [B, T] batch and its gradient with respect to `logprobs`."""
    lp = logprobs.detach().to(torch.float64)
    old = old_logprobs.detach().to(torch.float64)
    beh = behaviour_logprobs.detach().to(torch.float64)
    adv = advantages.detach().to(torch.float64)
    mask = mask.bool()
    if o.kl_coef > 0 and ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs (the reference policy's log-probabilities)")
    w = _correction_weights(o, old, beh, mask)
    c = _aggregation_coefficients(o, mask)
    lo, hi = 1.0 - o.eps_low, 1.0 + o.eps_high
    value = torch.zeros_like(lp)
    grad = torch.zeros_like(lp)
    a = adv[:, None].expand_as(lp)
    clipped_tokens = 0
    if o.algorithm == "gspo":
        m = mask.to(torch.float64)
        k = m.sum(dim=1)
        has = k > 0
        s = torch.exp(torch.where(has, ((lp - old) * m).sum(dim=1) / k.clamp(min=1), 0.0))
        mean_w = torch.where(has, (w * m).sum(dim=1) / k.clamp(min=1), 0.0)
        unclipped = s * adv
        clipped_value = s.clamp(lo, hi) * adv
        is_clipped = clipped_value < unclipped
        surrogate = torch.where(is_clipped, clipped_value, unclipped)
        weight = (c * m).sum(dim=1)
        value = torch.where(mask, (mean_w * surrogate)[:, None].expand_as(lp), 0.0)
        g = torch.where(is_clipped, 0.0, -weight * mean_w * adv * s / k.clamp(min=1))
        grad = torch.where(mask, g[:, None].expand_as(lp), 0.0)
        clipped_tokens = int((k * (is_clipped & has)).sum().item())
    else:
        r = torch.exp(lp - old)
        if o.algorithm in ("grpo", "dapo", "dr_grpo"):
            unclipped = r * a
            clipped_value = r.clamp(lo, hi) * a
            is_clipped = clipped_value < unclipped
            value = w * torch.where(is_clipped, clipped_value, unclipped)
            grad = torch.where(is_clipped, 0.0, -c * w * a * r)
            clipped_tokens = int((is_clipped & mask).sum().item())
        elif o.algorithm == "cispo":
            weight = r.clamp(lo, hi)
            clipped_tokens = int(((weight != r) & mask).sum().item())
            value = w * weight * a * lp
            grad = -c * w * weight * a
        else:  # reinforce
            value = w * a * lp
            grad = -c * w * a
        value = torch.where(mask, value, 0.0)
        grad = torch.where(mask, grad, 0.0)
    if ref_logprobs is not None:
        x = ref_logprobs.detach().to(torch.float64) - lp
        if o.kl_estimator == "k1":
            kl, dkl = -x, torch.ones_like(x)
        else:
            kl, dkl = torch.exp(x) - x - 1.0, 1.0 - torch.exp(x)
        kl_for_stats = kl
    else:
        kl = dkl = torch.zeros_like(lp)
        x = beh - old
        kl_for_stats = torch.exp(x) - x - 1.0
    loss = (torch.where(mask, c * (-value + o.kl_coef * kl), 0.0)).sum().item()
    grad_logprobs = torch.where(mask, grad + c * o.kl_coef * dkl, 0.0)
    tokens = int(mask.sum().item())

    def per_token(x):
        return 0.0 if tokens == 0 else float(x) / tokens

    return Evaluation(
        loss=loss,
        grad_logprobs=grad_logprobs,
        clip_fraction=per_token(clipped_tokens),
        mean_weight=per_token(torch.where(mask, w, 0.0).sum().item()),
        kl=per_token(torch.where(mask, kl_for_stats, 0.0).sum().item()),
        tokens=tokens,
    )
