"""TransformerLens official models, loaded only from the local Hugging Face cache.

This module owns resolving any model name that is not an offline model to a TransformerLens
official name, and loading it without network access; a name TransformerLens does not know, or
weights not in the cache, raise a :class:`~steerlens.errors.ModelLoadError` that says which
models always load offline.
"""

from __future__ import annotations

import torch

from steerlens import _tl
from steerlens._tl import HookedTransformer
from steerlens.errors import ModelLoadError
from steerlens.models.offline import hf_offline, hub_cache_dir, quiet
from steerlens.models.sources import OFFLINE_MODELS

_OFFICIAL_EXAMPLES = ("gpt2", "gpt2-medium", "EleutherAI/pythia-70m", "Qwen/Qwen2.5-0.5B")


def _official_name(name: str) -> str:
    try:
        return _tl.official_model_name(name)
    except ValueError:
        official = _tl.official_model_names()
        examples = ", ".join(n for n in _OFFICIAL_EXAMPLES if n in official) or official[0]
        raise ModelLoadError(
            f"unknown model {name!r}. Offline models: {', '.join(OFFLINE_MODELS)}; otherwise a "
            f"TransformerLens official name (e.g. {examples}, ... "
            f"{len(official)} in all) whose weights are in the local "
            "Hugging Face cache"
        ) from None


def _not_offline(official: str, detail: str = "") -> ModelLoadError:
    return ModelLoadError(
        f"the weights of {official!r} are not available offline (not in the Hugging Face cache "
        f"{hub_cache_dir()}){detail}. Models that always load offline: "
        f"{', '.join(OFFLINE_MODELS)}"
    )


def load_official(
    name: str,
    *,
    device: str | torch.device | None,
    dtype: torch.dtype,
    n_ctx: int | None,
) -> HookedTransformer:
    """The TransformerLens official model ``name`` from the local Hugging Face cache, eval mode,
    raw weights."""
    official = _official_name(name)
    repo_dir = hub_cache_dir() / f"models--{official.replace('/', '--')}" / "snapshots"
    if not repo_dir.is_dir() or not any(repo_dir.iterdir()):
        raise _not_offline(official)
    try:
        with hf_offline(), quiet():
            model = _tl.from_pretrained_raw(official, device=device, dtype=dtype, n_ctx=n_ctx)
    except (OSError, ValueError) as exc:
        raise _not_offline(official, f": {exc}") from exc
    return model.eval()
