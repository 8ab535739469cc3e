"""Keeping third-party loaders offline and quiet while they run.

This module owns the temporary changes steerlens makes to its environment while transformers,
huggingface_hub and TransformerLens load a model — refusing network access, silencing their
prints and the HookedTransformer deprecation notice — each undone when the block exits, and the
lookup of the local Hugging Face hub cache.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

from steerlens import _tl


@contextlib.contextmanager
def hf_offline() -> Iterator[None]:
    """Make transformers / huggingface_hub refuse network access for the duration."""
    import huggingface_hub.constants as hub_constants

    saved_env = os.environ.get("HF_HUB_OFFLINE")
    saved_flag = hub_constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = saved_flag
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the chatter of third-party loaders: stdout prints and the HookedTransformer
    deprecation notice (we are deliberately on the HookedTransformer API)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.filterwarnings(
            "ignore", message=_tl.HOOKED_TRANSFORMER_DEPRECATION, category=DeprecationWarning
        )
        yield


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, resolved from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "huggingface" / "hub"
