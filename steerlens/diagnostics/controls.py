"""Control models for the geometry claims: twins of a model that keep its shapes but not what it
learned, so a geometry figure can be read beside the value a model without learned structure
gives (the figures and their definitions: :mod:`steerlens.diagnostics.geometry`).

- :func:`random_like`: the same config, weights drawn by TransformerLens's own initialisation
  (``cfg.init_mode``, ``cfg.initializer_range``; norm weights one, biases zero);
  :func:`random_from_config` draws the same from a config alone, with no pretrained weights.
- :func:`shuffled`: the real weights, with every parameter of every block (attention, MLP and
  norm weights and biases) permuted entry by entry within its own tensor: each tensor keeps its
  exact set of values (its distribution and norm) and loses every learned arrangement. The
  embeddings, positional embeddings, ``ln_final`` and the unembedding stay the real ones, so the
  output geometry the blocks are read through is the trained model's.

Each returns a new eval-mode model of the original's dtype, on its device, with its tokenizer,
drawn from a seeded generator of its own: the original model and the global random state are left
as found.

>>> import torch
>>> from steerlens.testing import tiny_model
>>> model = tiny_model()
>>> twin = shuffled(model, seed=1)
>>> w, w_twin = model.blocks[0].mlp.W_in, twin.blocks[0].mlp.W_in
>>> torch.equal(w.flatten().sort().values, w_twin.flatten().sort().values), torch.equal(w, w_twin)
(True, False)
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from steerlens._tl import HookedTransformer, HookedTransformerConfig
from steerlens.errors import InputError
from steerlens.models.layout import linear_layout

CONTROL_KINDS: tuple[str, ...] = ("random_init", "shuffled")

#: what :func:`shuffled` permutes, in words (for tables that name the control)
SHUFFLE_RULE = (
    "every parameter under blocks.* (attention, MLP and norm weights and biases) has its "
    "entries permuted uniformly at random within its own tensor; embeddings, positional "
    "embeddings, ln_final and the unembedding are the real ones"
)
#: what :func:`random_like` draws, in words
RANDOM_RULE = (
    "the same config, every weight drawn by TransformerLens's init_weights (cfg.init_mode, "
    "cfg.initializer_range); norm weights one, biases zero"
)


def _check(model: HookedTransformer, seed: int) -> None:
    if not isinstance(model, HookedTransformer):
        raise InputError(f"a control needs a HookedTransformer, got {type(model).__name__}")
    _check_seed(seed)


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")


def _fresh(
    cfg: HookedTransformerConfig, tokenizer: Any, init_weights: bool, seed: int
) -> HookedTransformer:
    """A new eval-mode model of ``cfg`` on the CPU, initialised (or left empty) under ``seed``
    inside a forked random state."""
    cfg = copy.deepcopy(cfg)
    # the config's own seed would reseed every global generator; the draw is seeded here instead
    cfg.seed = None
    cfg.init_weights = init_weights
    cfg.device = "cpu"
    cfg.n_devices = 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        twin = HookedTransformer(cfg, tokenizer=tokenizer)
    return linear_layout(twin).eval()


def _on_device_of(twin: HookedTransformer, model: HookedTransformer) -> HookedTransformer:
    device = model.cfg.device
    if device is not None and torch.device(device) != torch.device("cpu"):
        twin.to(device)
    return twin


def random_from_config(
    cfg: HookedTransformerConfig, seed: int = 0, tokenizer: Any = None
) -> HookedTransformer:
    """A CPU model of ``cfg`` (a config alone: no pretrained weights are needed) with
    TransformerLens's initial weights drawn under ``seed``; ``tokenizer`` may be None when the
    config needs none (``cfg.d_vocab`` set)."""
    if not isinstance(cfg, HookedTransformerConfig):
        raise InputError(f"a config must be a HookedTransformerConfig, got {type(cfg).__name__}")
    _check_seed(seed)
    if tokenizer is None and cfg.d_vocab <= 0:
        raise InputError("the config has no d_vocab: pass the tokenizer that sets it")
    if tokenizer is None:
        cfg = copy.deepcopy(cfg)
        cfg.tokenizer_name = None  # nothing to fetch: the twin is fed token ids
    return _fresh(cfg, tokenizer, init_weights=True, seed=seed)


def random_like(model: HookedTransformer, seed: int = 0) -> HookedTransformer:
    """A model of ``model``'s config with TransformerLens's initial weights drawn under ``seed``
    (see the module docstring), on ``model``'s device; ``model`` is not touched."""
    _check(model, seed)
    twin = random_from_config(model.cfg, seed, model.tokenizer)
    return _on_device_of(twin, model)


def shuffled(model: HookedTransformer, seed: int = 0) -> HookedTransformer:
    """``model``'s weights with every block parameter's entries permuted within its tensor
    under ``seed`` (see the module docstring); ``model`` is not touched."""
    _check(model, seed)
    twin = _fresh(model.cfg, model.tokenizer, init_weights=False, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    parameters = {name for name, _ in model.named_parameters()}
    state = {}
    for name, value in model.state_dict().items():
        value = value.detach()
        if name.startswith("blocks.") and name in parameters:
            order = torch.randperm(value.numel(), generator=generator).to(value.device)
            value = value.flatten()[order].view_as(value)
        state[name] = value.clone()
    twin.load_state_dict(state, strict=True)
    return _on_device_of(twin, model)


_BUILDERS: dict[str, Callable[[HookedTransformer, int], HookedTransformer]] = {
    "random_init": random_like,
    "shuffled": shuffled,
}


def control_model(model: HookedTransformer, kind: str, seed: int = 0) -> HookedTransformer:
    """The control ``kind`` (``"random_init"``: :func:`random_like`; ``"shuffled"``:
    :func:`shuffled`) of ``model`` under ``seed``."""
    if kind not in _BUILDERS:
        raise InputError(f"unknown control {kind!r}; valid controls: {CONTROL_KINDS}")
    return _BUILDERS[kind](model, seed)


__all__ = [
    "CONTROL_KINDS",
    "RANDOM_RULE",
    "SHUFFLE_RULE",
    "control_model",
    "random_from_config",
    "random_like",
    "shuffled",
]
