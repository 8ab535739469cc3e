"""Half-precision models: metrics are computed in float32.

float16 / bfloat16 cannot carry the metric's factor rows (the output factor's rows differ by
orders of magnitude, and the pull-back sums hundreds of products). ``pullback_metric``,
``pullback_sweep``, ``expected_metric`` and :class:`~steerlens.metric.local.LocalPath` (so the
iterative methods and the path measures) therefore run on a float32 copy of a half-precision
model — made once per model object and kept while the model lives (a new copy once its weights
change; :class:`Float32Copies`) — and return float32 metrics (float64 where the engine
accumulates Gram matrices) and float32 steering vectors, which apply to the half model cast to
its dtype. The user's model is never changed.

>>> import torch
>>> from steerlens.testing import tiny_model
>>> half = tiny_model(dtype=torch.float16)
>>> compute_model(half).cfg.dtype, half.cfg.dtype
(torch.float32, torch.float16)
"""

from __future__ import annotations

import copy
import weakref
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer

HALF = (torch.float16, torch.bfloat16)


def _version(model: HookedTransformer) -> tuple[int, ...]:
    """Changes whenever a parameter is modified in place or replaced."""
    return tuple(p._version + id(p) for p in model.parameters())


class Float32Copies:
    """The float32 copies of half-precision models, one per live model: made on first use, made
    anew once the model's weights change, dropped when the model is garbage-collected (the
    model is a weak key) or by :meth:`clear` (to free their memory at once).

    ``compute_model`` uses the one instance :data:`FLOAT32_COPIES`; it is the only state the
    metric engine keeps between calls.

    >>> import torch
    >>> from steerlens.testing import tiny_model
    >>> copies = Float32Copies()
    >>> half = tiny_model(dtype=torch.float16)
    >>> copies.get(half) is copies.get(half), len(copies)
    (True, 1)
    >>> copies.clear(); len(copies)
    0
    """

    def __init__(self) -> None:
        self._copies: weakref.WeakKeyDictionary[
            HookedTransformer, tuple[tuple[int, ...], HookedTransformer]
        ] = weakref.WeakKeyDictionary()

    def __len__(self) -> int:
        return len(self._copies)

    def clear(self) -> None:
        """Drop every copy."""
        self._copies.clear()

    def get(self, model: HookedTransformer) -> HookedTransformer:
        """The float32 copy of ``model`` at its current weights (made now if there is none)."""
        version = _version(model)
        cached = self._copies.get(model)
        if cached is not None and cached[0] == version:
            return cached[1]
        full = copy.deepcopy(model)
        for module in full.modules():  # hooks attached to the user's model stay there
            module._forward_hooks.clear()
            module._forward_pre_hooks.clear()
            module._backward_hooks.clear()
        full = full.to(torch.float32, print_details=False)
        self._copies[model] = (version, full)
        return full


#: the copies :func:`compute_model` makes (``FLOAT32_COPIES.clear()`` frees them)
FLOAT32_COPIES = Float32Copies()


def compute_model(model: HookedTransformer) -> HookedTransformer:
    """``model`` itself unless it is half precision; then its float32 copy
    (:data:`FLOAT32_COPIES`)."""
    if model.cfg.dtype not in HALF:
        return model
    return FLOAT32_COPIES.get(model)
