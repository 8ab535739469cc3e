"""The pair concept of dual steering: the target's share of one base/target token pair."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from steerlens.concepts.base import log_target
from steerlens.errors import ConceptError, InputError
from steerlens.metric.outcomes import OffTarget

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer
    from steerlens.sites import Site


@dataclass(frozen=True)
class PairConcept:
    """The target's share of one base/target pair: c = log p_t − log(p_t + p_b).

    This is Park et al.'s stopping rule for dual steering (p_t / (p_t + p_b) above a threshold):
    a context whose next token would be the base form is steered to the target form. Its
    off-target distribution is p renormalized on every token but the two.

    >>> c = PairConcept(base=0, target=1)
    >>> round(float(c.value(None, torch.tensor([0.0, 0.0, 5.0])).exp()), 3)
    0.5
    """

    base: int
    target: int
    name: str = ""

    def __post_init__(self) -> None:
        if self.base == self.target:
            raise ConceptError(f"pair concept: base and target are the same token {self.base}")
        if min(self.base, self.target) < 0:
            raise InputError(f"pair concept: negative token id in ({self.base}, {self.target})")
        if not self.name:
            object.__setattr__(self, "name", f"{self.target} over {self.base}")

    def value(self, act: Tensor | None, logits: Float[Tensor, "... d_vocab"]) -> Tensor:
        if max(self.base, self.target) >= logits.shape[-1]:
            raise InputError(f"pair concept ids out of range for d_vocab={logits.shape[-1]}")
        pair = logits[..., [self.target, self.base]]
        return pair[..., 0] - torch.logsumexp(pair, -1)

    def target_value(self, probability: float) -> float:
        return log_target(probability)

    def probability(self, value: float) -> float:
        return math.exp(value)

    def off_target(self) -> OffTarget:
        """p on every token but the base and the target, renormalized."""
        return OffTarget.complement([self.base, self.target])

    def check_site(self, site: str | Site, model: HookedTransformer) -> None:
        """Nothing to check: the concept is read at the output, reachable from any site."""
