"""Half-precision models: metrics are computed in float32.

float16 / bfloat16 cannot carry the metric's factor rows (the output factor's rows differ by
orders of magnitude, and the pull-back sums hundreds of products). ``pullback_metric``,
``pullback_sweep``, ``expected_metric`` and :class:`~steerlens.metric.local.LocalPath` (so the
iterative methods and the path measures) therefore run on a float32 copy of a half-precision
model — made once per model object and kept while the model lives (a new copy once its weights
change) — and return float32 metrics (float64 where the engine accumulates Gram matrices) and
float32 steering vectors, which apply to the half model cast to its dtype. The user's model is
never changed.

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
_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _version(model: HookedTransformer) -> tuple[int, ...]:
    """Changes whenever a parameter is modified in place or replaced."""
    return tuple(p._version + id(p) for p in model.parameters())


def compute_model(model: HookedTransformer) -> HookedTransformer:
    """``model`` itself unless it is half precision; then its float32 copy."""
    if model.cfg.dtype not in HALF:
        return model
    version = _version(model)
    cached = _COPIES.get(model)
    if cached is not None and cached[0] == version:
        return cached[1]
    full = copy.deepcopy(model)
    for module in full.modules():  # hooks attached to the user's model stay there
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
        module._backward_hooks.clear()
    full = full.to(torch.float32, print_details=False)
    _COPIES[model] = (version, full)
    return full
