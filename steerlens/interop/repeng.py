"""A repeng ``ControlVector`` as an :class:`~steerlens.Intervention`, without re-fitting it.

repeng's ``ControlVector(model_type, directions)`` maps a layer index i to a numpy vector.
Its ``ControlModel`` wraps ``model.layers[i]`` in a ``ControlModule`` whose forward adds
``coeff × directions[i]`` to that block's output, at every (non-padding) position
(``repeng/control.py``); training reads the same point, ``hidden_states[i + 1]``, the output of
block i (``repeng/extract.py``, ``batched_get_hiddens``). So direction i is TransformerLens's
``resid_post.i`` (``blocks.i.hook_resid_post``), added at every position: the import's default
``position="all"``. ``tests/unit/test_interop.py`` wraps a TransformerLens block in repeng's own
``ControlModule`` and checks the imported intervention against it.

repeng 0.4.0 itself does not import under numpy 2 (an annotation names ``np.float_``); nothing
here imports it: a ControlVector is read through its two attributes. For the GGUF files that
``ControlVector.export_gguf`` writes, see :mod:`steerlens.interop.gguf`.

>>> import numpy as np
>>> from types import SimpleNamespace
>>> from steerlens.testing import tiny_model
>>> vector = SimpleNamespace(model_type="llama", directions={1: np.ones(16, np.float32)})
>>> from_control_vector(vector, tiny_model("llama"))   # a repeng ControlVector reads the same
Intervention('repeng', sites=[blocks.1.hook_resid_post@all], scale=1)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from steerlens.errors import InputError
from steerlens.interop.tensor import Entry, as_vector, imported, layer_index
from steerlens.methods.intervention import Intervention
from steerlens.sites import Position, Site

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer


def direction_entries(
    directions: Mapping[Any, Any], position: Position, source: str
) -> list[Entry]:
    """One entry per layer: direction i at ``resid_post.i`` (at ``position``)."""
    entries: list[Entry] = []
    for key, value in directions.items():
        what = f"{source} direction for layer {key!r}"
        layer = layer_index(key, what)
        entries.append((what, Site("resid_post", layer, position=position), as_vector(value, what)))
    return entries


def from_control_vector(
    vector: Any,
    model: HookedTransformer | None = None,
    *,
    position: Position = "all",
    scale: float = 1.0,
) -> Intervention:
    """The intervention adding ``vector.directions[i]`` at ``resid_post.i`` (module docstring),
    at ``position`` (default: every position, as repeng's ``ControlModel`` adds it), times
    ``scale`` (repeng's ``coeff``).

    Args:
        vector: a repeng ``ControlVector`` (anything with its ``model_type`` and
            ``directions`` attributes).
        model: check layers and widths against it (a control vector for a model of another
            width or depth raises, naming the valid ones), resolve negative layers and cast to
            its dtype and device.
    """
    directions = getattr(vector, "directions", None)
    if not isinstance(directions, Mapping):
        raise InputError(
            "expected a repeng ControlVector (model_type and directions: a dict from layer "
            f"index to vector), got {type(vector).__name__}"
        )
    entries = direction_entries(directions, position, "repeng")
    info = {
        "source": "repeng",
        "model_type": str(getattr(vector, "model_type", "")),
        "layers": sorted(int(k) for k in directions),
    }
    return imported("repeng", entries, model, scale, info)
