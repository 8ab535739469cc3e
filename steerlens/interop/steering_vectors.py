"""A ``steering_vectors.SteeringVector`` (the steering-vectors library) as an
:class:`~steerlens.Intervention`, without re-fitting it.

A SteeringVector holds ``layer_activations`` (layer number → vector) and a ``layer_type``; its
``apply`` adds ``multiplier ×`` each vector to the output of the matching module of layer i, at
every token by default (``min_token_index=0``). On a TransformerLens model those outputs are:

================  ==========================================  ====================
layer_type        the module whose output steering-vectors    steerlens site
                  adds to (HF Llama / GPT-2 names)
================  ==========================================  ====================
``decoder_block`` ``model.layers.i`` / ``transformer.h.i``    ``resid_post.i``
``self_attn``     ``...layers.i.self_attn`` / ``...h.i.attn``  ``attn_out.i``
``mlp``           ``...layers.i.mlp`` / ``...h.i.mlp``          ``mlp_out.i``
================  ==========================================  ====================

Layer i is the library's own index into the model's list of blocks (0 = the first block;
negative counts from the end), the same numbering as TransformerLens's ``blocks.i``. The two
norm outputs it can also steer, ``input_layernorm`` and ``post_attention_layernorm``, are read by
one half of the block only (not by the residual stream), and no steerlens site holds them: they
raise. So do ``self_attn`` and ``mlp`` on a model whose blocks normalise those outputs again
before the residual add (Gemma 2's and OLMo 2's post-norms): there the module's output is the
input of that norm, while ``hook_attn_out`` / ``hook_mlp_out`` read after it.

The position rule defaults to ``"all"``, as steering-vectors applies it;
``tests/unit/test_interop.py`` runs steering-vectors' own ``apply`` on a TransformerLens model's
blocks against the imported intervention.

>>> import torch
>>> from types import SimpleNamespace
>>> from steerlens.testing import tiny_model
>>> vector = SimpleNamespace(layer_activations={1: torch.ones(16)}, layer_type="decoder_block")
>>> from_steering_vector(vector, tiny_model())   # a SteeringVector reads the same
Intervention('steering_vectors', sites=[blocks.1.hook_resid_post@all], scale=1)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from steerlens import _tl
from steerlens.errors import InputError
from steerlens.interop.tensor import Entry, as_vector, imported, layer_index
from steerlens.methods.intervention import Intervention
from steerlens.sites import Position, Site

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer

#: steering-vectors layer type → the steerlens site kind of that module's output
LAYER_TYPES: dict[str, str] = {
    "decoder_block": "resid_post",
    "self_attn": "attn_out",
    "mlp": "mlp_out",
}
#: steering-vectors layer types that no steerlens site holds, and why
UNSUPPORTED: dict[str, str] = {
    "input_layernorm": "the block's first norm output, read by attention only",
    "post_attention_layernorm": "the block's second norm output, read by the MLP only",
}


def _kind(layer_type: Any) -> str:
    if layer_type in LAYER_TYPES:
        return LAYER_TYPES[layer_type]
    valid = ", ".join(f"{k!r} (→ {v})" for k, v in LAYER_TYPES.items())
    why = f" ({UNSUPPORTED[layer_type]})" if layer_type in UNSUPPORTED else ""
    raise InputError(
        f"steering-vectors layer_type {layer_type!r}{why} has no steerlens site; "
        f"importable layer types: {valid}"
    )


def from_steering_vector(
    vector: Any,
    model: HookedTransformer | None = None,
    *,
    position: Position = "all",
    scale: float = 1.0,
) -> Intervention:
    """The intervention that adds ``vector.layer_activations[i]`` at the site of ``layer_type``
    in block i (module docstring), at ``position`` (default: every position, as
    steering-vectors applies it), times ``scale`` (steering-vectors' ``multiplier``).

    Args:
        vector: a ``steering_vectors.SteeringVector`` (anything with its ``layer_activations``
            and ``layer_type`` attributes).
        model: check layers and widths against it, resolve negative layers and cast the vectors
            to its dtype and device.
    """
    if not hasattr(vector, "layer_activations") or not hasattr(vector, "layer_type"):
        raise InputError(
            "expected a steering_vectors.SteeringVector (layer_activations and layer_type), "
            f"got {type(vector).__name__}"
        )
    layers = vector.layer_activations
    if not isinstance(layers, Mapping):
        raise InputError(
            f"SteeringVector.layer_activations must map layer numbers to tensors, "
            f"got {type(layers).__name__}"
        )
    kind = _kind(vector.layer_type)
    if model is not None and kind != "resid_post" and _tl.normalizes_block_outputs(model):
        raise InputError(
            f"steering-vectors layer_type {vector.layer_type!r}: this model normalises each "
            f"attention and MLP output again before the residual add, so the module output "
            f"steering-vectors steers is not {kind} (read after that norm); import a "
            "'decoder_block' vector instead"
        )
    entries: list[Entry] = []
    for key, value in layers.items():
        what = f"steering-vectors {vector.layer_type} layer {key!r}"
        layer = layer_index(key, what)
        entries.append((what, Site(kind, layer, position=position), as_vector(value, what)))
    info = {
        "source": "steering-vectors",
        "layer_type": str(vector.layer_type),
        "layers": sorted(int(k) for k in layers),
    }
    return imported("steering_vectors", entries, model, scale, info)
