"""What every concept offers the steering methods: a differentiable scalar and its target.

A concept c is read either at the site (a linear probe, an SAE feature: functions of the
activation ``act``) or at the output (a token set: a function of the ``logits``); methods call
``value(act, logits)`` and differentiate it, so one interface serves all three.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

from jaxtyping import Float
from torch import Tensor

from steerlens.errors import InputError


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


def log_target(probability: float) -> float:
    """log p of a target probability p in (0, 1), the value of a log-probability concept."""
    if not 0 < probability < 1:
        raise InputError(f"target probability must be in (0, 1), got {probability}")
    return math.log(probability)
