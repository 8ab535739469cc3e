"""One prompt's clean forward state at its prediction position.

The metric at the last position T only needs, per block, the residual entering the block at T and
the keys and values of positions < T (held fixed: under causal attention a perturbation at T
changes nothing before T). Both come from one forward pass that fills TransformerLens's own
key-value cache, which is then cut to the positions before T and frozen (:mod:`steerlens._tl`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor

from steerlens import _tl
from steerlens._tl import KeyValueCache
from steerlens.errors import InputError, NonFiniteError
from steerlens.hooks import hooked

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer


@dataclass
class PromptState:
    """Clean activations of one prompt at its last position T.

    ``resid[l]`` is the residual entering block l at T (``resid[n_layers]`` leaves the last
    block); ``cache`` holds the frozen keys and values of positions < T.
    """

    tokens: Int[Tensor, " pos"]
    resid: list[Float[Tensor, " d_model"]]
    logits: Float[Tensor, " d_vocab"]
    cache: KeyValueCache

    @property
    def n_pos(self) -> int:
        return int(self.tokens.shape[0])


def check_supported(model: HookedTransformer) -> None:
    """Raise for architectures whose blocks need inputs the single-position path cannot give."""
    cfg = model.cfg
    positions = _tl.positional_embedding(model)
    if positions in ("shortformer", "alibi", "relative_positional_bias"):
        raise InputError(
            f"positional embedding {positions!r} is not supported by the "
            "metric engine (supported: standard, rotary)"
        )
    if not _tl.is_causal(model):
        raise InputError("the pullback metric needs a causal (decoder-only) model")
    if cfg.dtype in (torch.float16, torch.bfloat16):
        raise InputError(
            f"the model is in {cfg.dtype}: the prompt state is read in float32 or float64; "
            "pass steerlens.metric.precision.compute_model(model), the float32 copy that "
            "pullback_metric, pullback_sweep, expected_metric and LocalPath use"
        )


@torch.no_grad()
def prompt_state(model: HookedTransformer, tokens: Int[Tensor, " pos"]) -> PromptState:
    """Run ``tokens`` once and keep what the recursion needs at the last position."""
    check_supported(model)
    n_layers = model.cfg.n_layers
    cache = _tl.new_kv_cache(model)
    resid: list[Tensor | None] = [None] * (n_layers + 1)

    def grab(layer: int):
        def hook(act: Tensor, hook: object) -> None:
            resid[layer] = act[0, -1].clone()

        return hook

    hooks = [(f"blocks.{layer}.hook_resid_pre", grab(layer)) for layer in range(n_layers)]
    hooks.append((f"blocks.{n_layers - 1}.hook_resid_post", grab(n_layers)))
    with hooked(model, hooks):  # type: ignore[arg-type]
        logits = _tl.forward_filling_cache(model, tokens[None], cache, last_only=True)[0, -1]
    _tl.freeze_before_last(cache)  # keep positions < T: the prediction position is the variable
    if not torch.isfinite(logits).all():
        raise NonFiniteError("the model's logits at the prediction position are not finite")
    for layer, r in enumerate(resid):
        if r is None or not torch.isfinite(r).all():
            raise NonFiniteError(f"the residual stream entering block {layer} is not finite")
    return PromptState(tokens, resid, logits, cache)  # type: ignore[arg-type]
