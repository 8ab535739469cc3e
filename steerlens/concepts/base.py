"""What every concept offers the steering methods: a differentiable scalar and its target.

A concept c is read either at the site (a linear probe, an SAE feature: functions of the
activation ``act``) or at the output (a token set: a function of the ``logits``); methods call
``value(act, logits)`` and differentiate it, so one interface serves all three. ``off_target``
names the output distribution the concept leaves alone (None for a concept read at the site),
and ``check_site`` raises unless the concept can be read at a site.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from jaxtyping import Float
from torch import Tensor

from steerlens.errors import InputError

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer
    from steerlens.metric.outcomes import OffTarget
    from steerlens.sites import Site


@runtime_checkable
class Concept(Protocol):
    """A scalar the user wants to move."""

    @property
    def name(self) -> str: ...

    def value(
        self, act: Float[Tensor, "... dim"], logits: Float[Tensor, "... d_vocab"]
    ) -> Float[Tensor, "..."]:
        """The concept's value for an activation at the site and the logits it leads to."""
        ...

    def target_value(self, probability: float) -> float:
        """The value that means the concept holds with ``probability``."""
        ...

    def off_target(self) -> OffTarget | None:
        """The transform of the next-token distribution whose change is the concept's
        off-target price (FishBack's metric by default), or None: the whole distribution."""
        ...

    def check_site(self, site: str | Site, model: HookedTransformer) -> None:
        """Raise a :class:`~steerlens.errors.ConceptError` unless the concept can be steered
        from ``site`` of ``model``."""
        ...


def log_target(probability: float) -> float:
    """log p of a target probability p in (0, 1), the value of a log-probability concept."""
    if not 0 < probability < 1:
        raise InputError(f"target probability must be in (0, 1), got {probability}")
    return math.log(probability)
