"""The matched-concept measures of one steered next-token distribution against the clean one.

For a context whose next token should move from a base form b to a target form t (clean
distribution p, steered q, both at the prediction position):

- ``probability``: q(t);
- ``off_target_kl``: KL(p̃ ‖ q̃) of the distributions renormalized on every token but t;
- ``off_target_kl_merged``: KL(p' ‖ q') after merging each base token's mass into its target
  (Park et al.'s dual-steering definition), over the whole pair mapping;
- ``kl_full``: KL(p ‖ q) of the whole next-token distributions (nothing removed or merged);
- ``p_target``, ``p_base``, ``pair_mass``: q(t), q(b) and q(t) + q(b) (with a base);
- ``rr_diff``: the mean |1/rank_p(y) − 1/rank_q(y)| over the tokens y ≠ t in p's top-p 0.999 set
  (ranks among the tokens ≠ t): how much the order of the rest moved.

Fluency, from generated text, is :mod:`steerlens.evaluation.generation`'s. The distributions come
from :func:`next_logprobs`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from steerlens.diagnostics.path import next_logprobs

__all__ = ["KL_MEASURES", "Outcome", "next_logprobs", "outcome_measures"]


def _kl(logp: Tensor, logq: Tensor) -> float:
    return float((logp.exp() * (logp - logq)).sum().clamp_min(0))


def _merge(logp: Tensor, merge: dict[int, int]) -> Tensor:
    p = logp.exp()
    bases = torch.tensor(list(merge), dtype=torch.long, device=p.device)
    targets = torch.tensor(list(merge.values()), dtype=torch.long, device=p.device)
    merged = p.clone()
    merged.index_add_(0, targets, p[bases])
    keep = torch.ones_like(p, dtype=torch.bool)
    keep[bases] = False
    return merged[keep].clamp_min(1e-300).log()


@dataclass(frozen=True)
class Outcome:
    """The measures of one steered next-token distribution against the clean one (the module
    docstring): the concept's ``probability`` (the pair share with a base token), the complement,
    pair-merge and whole-distribution KLs, p(target), p(base), the pair's mass and the mean
    change of reciprocal rank over the clean top-p tokens. NaN where a measure needs an input
    not given (the merge, the base)."""

    probability: float
    off_target_kl: float
    off_target_kl_merged: float
    kl_full: float
    p_target: float
    p_base: float
    pair_mass: float
    rr_diff: float

    def row(self) -> dict[str, float]:
        """The measures as a record's columns."""
        return asdict(self)


def outcome_measures(
    clean: Float[Tensor, " d_vocab"],
    steered: Float[Tensor, " d_vocab"],
    target: int,
    merge: dict[int, int] | None = None,
    top_p: float = 0.999,
    *,
    base: int | None = None,
) -> Outcome:
    """The measures of the module docstring from clean and steered log-probabilities. With
    ``base``, the concept is the pair share q(t)/(q(t) + q(b)) and both tokens leave the
    off-target distribution."""
    keep = torch.ones_like(clean, dtype=torch.bool)
    keep[target] = False
    if base is not None:
        keep[base] = False
    p, q = torch.log_softmax(clean[keep], -1), torch.log_softmax(steered[keep], -1)
    order = torch.argsort(p, descending=True)
    mass = torch.cumsum(p[order].exp(), 0)
    top = order[: int((mass < top_p).sum()) + 1]
    rank_p = torch.empty_like(p)
    rank_p[order] = torch.arange(1, p.shape[0] + 1, dtype=p.dtype, device=p.device)
    rank_q = torch.empty_like(q)
    rank_q[torch.argsort(q, descending=True)] = torch.arange(
        1, q.shape[0] + 1, dtype=q.dtype, device=q.device
    )
    rr = float((1 / rank_p[top] - 1 / rank_q[top]).abs().mean())
    prob = steered[target].exp()
    if base is not None:
        prob = prob / (prob + steered[base].exp())
    p_target = float(steered[target].exp())
    p_base = math.nan if base is None else float(steered[base].exp())
    merged = _kl(_merge(clean, merge), _merge(steered, merge)) if merge else math.nan
    return Outcome(
        probability=float(prob),
        off_target_kl=_kl(p, q),
        off_target_kl_merged=merged,
        kl_full=_kl(clean, steered),
        p_target=p_target,
        p_base=p_base,
        pair_mass=math.nan if base is None else p_target + p_base,
        rr_diff=rr,
    )


#: the divergences every ratio table reports side by side, with their short names: the
#: complement of the pair (base and target removed, the rest renormalized: the distribution
#: whose Fisher metric FishBack descends by default), the pair merge (each base token's mass
#: merged into its target, Park et al.'s definition, which FishBack does not descend) and the
#: whole next-token distribution
KL_MEASURES: dict[str, str] = {
    "off_target_kl": "complement KL",
    "off_target_kl_merged": "pair-merge KL",
    "kl_full": "whole-distribution KL",
}
