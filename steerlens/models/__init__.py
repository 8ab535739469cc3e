"""Loading real models as :class:`HookedTransformer` objects, offline.

:func:`load_model` is every way steerlens obtains a pretrained model:

- the two *offline* models shipped as GGUF files inside PyPI wheels (:mod:`.sources`) — the
  default SmolLM2-135M-Instruct and Gemma-3-270M (the optional ``gemma`` extra) — converted once
  with TransformerLens's own config builder and weight converter (:mod:`.convert`) into an
  on-disk, checksummed cache (:mod:`.cache`), so that later loads read only the cache;
- any other TransformerLens official model name, loaded only from the local Hugging Face cache
  (:mod:`.official`).

Third-party loaders run offline and quiet (:mod:`.offline`). Loaded models are in eval mode with
raw (unfolded, uncentred) weights, so hooks read the real activations.
"""

from __future__ import annotations

import os

import torch

from steerlens._tl import HookedTransformer
from steerlens.errors import InputError
from steerlens.models.cache import (
    CACHE_ENV_VAR,
    CACHE_FORMAT_VERSION,
    build_cache,
    cache_root,
    load_cached,
)
from steerlens.models.convert import load_hf_gguf
from steerlens.models.layout import linear_layout
from steerlens.models.official import load_official
from steerlens.models.sources import (
    DEFAULT_MODEL,
    DEFAULT_N_CTX,
    GEMMA_MODEL,
    OFFLINE_MODELS,
    SOURCES,
    GgufSource,
    default_model_available,
)


def load_model(
    name: str | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    n_ctx: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    rebuild: bool = False,
) -> HookedTransformer:
    """Load a pretrained model as an eval-mode :class:`HookedTransformer` with raw weights.

    ``name`` is ``None`` / ``"smollm2-135m-instruct"`` (the default, always available offline),
    ``"gemma-3-270m"`` (needs ``steerlens[gemma]``), or a TransformerLens official model name
    whose weights are already in the local Hugging Face cache. ``n_ctx`` defaults to 2048 for the
    offline models (their native 8k/32k contexts cost hundreds of MB of rotary/mask buffers).
    The offline models are converted once and cached under :func:`cache_root`; ``rebuild=True``
    forces a fresh conversion.
    """
    key = DEFAULT_MODEL if name is None else name.strip().lower()
    if n_ctx is not None and n_ctx < 1:
        raise InputError(f"n_ctx must be a positive integer, got {n_ctx}")
    if key in SOURCES:
        return load_cached(
            SOURCES[key],
            device=device,
            dtype=dtype,
            n_ctx=n_ctx,
            cache_dir=cache_dir,
            rebuild=rebuild,
        )
    return load_official(name or DEFAULT_MODEL, device=device, dtype=dtype, n_ctx=n_ctx)


__all__ = [
    "CACHE_ENV_VAR",
    "CACHE_FORMAT_VERSION",
    "DEFAULT_MODEL",
    "DEFAULT_N_CTX",
    "GEMMA_MODEL",
    "OFFLINE_MODELS",
    "SOURCES",
    "GgufSource",
    "build_cache",
    "cache_root",
    "default_model_available",
    "linear_layout",
    "load_hf_gguf",
    "load_model",
]
