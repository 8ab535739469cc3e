"""The in-memory layout of a loaded model's weights: same values, faster forward passes."""

from __future__ import annotations

import torch

from steerlens import _tl
from steerlens._tl import HookedTransformer


@torch.no_grad()
def linear_layout(model: HookedTransformer) -> HookedTransformer:
    """Store the MLP and unembedding weights transposed in memory (same values, same shapes).

    TransformerLens's MLP and unembedding multiply by ``W.T.contiguous()``
    (:func:`steerlens._tl.transposed_linear_weights`), which copies every such weight on every
    forward pass; with ``W.T`` already contiguous that copy is a no-op.
    """
    for param in _tl.transposed_linear_weights(model):
        if isinstance(param, torch.nn.Parameter) and param.dim() == 2:
            param.data = param.data.T.contiguous().T
    return model
