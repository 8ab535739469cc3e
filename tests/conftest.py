"""Shared fixtures: tiny float64 models of both flavours, seeded; hook-hygiene checks; a way
round the run-time type checks for deliberately ill-typed calls.

``STEERLENS_TEST_DEVICE=cuda pytest tests/unit`` puts the tiny models on that device (default
``cpu``), to run the unit suite on a GPU.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from jaxtyping import config as jaxtyping_config

from steerlens.errors import SteerlensError
from steerlens.testing import tiny_model

FLAVOURS = ["gpt2", "llama"]
DEVICE = os.environ.get("STEERLENS_TEST_DEVICE", "cpu")
if DEVICE != "cpu":
    # the tests' own tensors (tokens, directions, brute-force references) on the same device
    torch.set_default_device(DEVICE)


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session", params=FLAVOURS)
def model(request):
    """A tiny float64 model of each flavour (read-only: tests must leave it as found)."""
    return tiny_model(request.param, device=DEVICE)


@pytest.fixture(scope="session")
def gpt2_model():
    return tiny_model("gpt2", device=DEVICE)


@pytest.fixture(scope="session")
def llama_model():
    return tiny_model("llama", device=DEVICE)


@pytest.fixture(scope="session")
def gemma_model():
    """The Gemma-3-like tiny model (QK-norm, post-norms, local and global layers)."""
    return tiny_model("gemma", device=DEVICE)


def fallback_model(n_layers: int = 2):
    """A llama-flavour float64 model whose blocks only the hooked map fits (an attention
    soft-cap, which the fast block map does not write out), with QK-norm too."""
    from steerlens import _tl
    from steerlens.testing import tiny_config

    fields = _tl.config_to_dict(tiny_config("llama", n_layers=n_layers))
    fields |= dict(use_qk_norm=True, attn_scores_soft_cap=20.0)
    return _tl.HookedTransformer(_tl.config_from_dict(fields)).eval().to(DEVICE)


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])


def hook_count(model) -> int:
    """Forward and backward hooks attached anywhere in the model."""
    total = 0
    for module in model.modules():
        total += len(module._forward_hooks) + len(module._forward_pre_hooks)
        total += len(module._backward_hooks)
    return total


def weights_snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_untouched(model, snapshot) -> None:
    """The model has no hooks, its attention-result flag is off, and its weights are identical."""
    assert hook_count(model) == 0
    assert not model.cfg.use_attn_result
    state = model.state_dict()
    assert set(state) == set(snapshot)
    for k, v in snapshot.items():
        assert torch.equal(state[k], v), k


@contextmanager
def unchecked() -> Iterator[None]:
    """The run-time type checks (pytest's ``--jaxtyping-packages``) off inside the block: for
    calls that pass an ill-typed argument on purpose, to test steerlens's own error for it (what
    a user without a type checker meets) rather than beartype's. A no-op without the checks."""
    before = jaxtyping_config.jaxtyping_disable
    jaxtyping_config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping_config.update("jaxtyping_disable", before)


@dataclass(frozen=True)
class Case:
    """A bad-input case: ``run(model, tmp_path)`` must raise ``error`` with ``message`` in it."""

    id: str
    run: Callable[..., object]
    error: type[SteerlensError]
    message: str


def raises_and_leaves_untouched(case: Case, model, tmp_path: Path) -> None:
    before = weights_snapshot(model)
    with pytest.raises(case.error) as info:
        case.run(model, tmp_path)
    assert case.message in str(info.value), str(info.value)
    assert_untouched(model, before)


def tiny_sae(width: int, hook: str):
    """A random 8-feature float64 sae-lens SAE reading ``hook``."""
    from sae_lens import StandardSAE, StandardSAEConfig

    sae = StandardSAE(StandardSAEConfig(d_in=width, d_sae=8, dtype="float64"))
    sae.cfg.metadata.hook_name = hook
    return sae
