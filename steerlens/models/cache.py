"""The on-disk cache of converted offline models, checked before every use.

This module owns where the cache lives (:func:`cache_root`), its layout — per model, the
TransformerLens state dict as safetensors, the tokenizer, and ``metadata.json`` with the config,
the GGUF's fingerprint and the weights' size and SHA-256 — writing it (atomically, with
:func:`~steerlens.atomic.atomic_dir`), and loading a model from it. A cache whose files are
missing, truncated, of another format version or built from another GGUF is never used: it is
rebuilt from the GGUF, so later loads read only the cache and never touch the GGUF again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from steerlens import _tl
from steerlens._tl import HookedTransformer
from steerlens.atomic import atomic_dir
from steerlens.errors import ModelLoadError
from steerlens.models import convert
from steerlens.models.layout import linear_layout
from steerlens.models.offline import hf_offline, quiet
from steerlens.models.sources import DEFAULT_N_CTX, GgufSource

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
CACHE_ENV_VAR = "STEERLENS_CACHE_DIR"

_WEIGHTS_FILE = "weights.safetensors"
_META_FILE = "metadata.json"
_TOKENIZER_DIR = "tokenizer"
_TIED_KEY, _TIED_SOURCE = "unembed.W_U", "embed.W_E"


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The steerlens cache directory: ``cache_dir``, else ``$STEERLENS_CACHE_DIR``, else the
    platform user cache dir."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR])
    import platformdirs

    return Path(platformdirs.user_cache_dir("steerlens"))


def model_cache_dir(root: Path, source: GgufSource) -> Path:
    """The cache folder of one offline model under the cache root."""
    return root / "models" / source.name


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _expected_metadata(source: GgufSource) -> dict[str, Any]:
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "name": source.name,
        "source": source.fingerprint(),
    }


def read_valid_cache(directory: Path, source: GgufSource) -> dict[str, Any] | None:
    """The cache's metadata if every file is present and matches, else ``None``."""
    try:
        meta = json.loads((directory / _META_FILE).read_text())
    except (OSError, ValueError):
        return None
    expected = _expected_metadata(source)
    if not isinstance(meta, dict) or any(meta.get(k) != v for k, v in expected.items()):
        return None
    weights = directory / _WEIGHTS_FILE
    if not weights.is_file() or not (directory / _TOKENIZER_DIR).is_dir():
        return None
    if weights.stat().st_size != meta.get("weights_size"):
        return None
    if _sha256(weights) != meta.get("weights_sha256"):
        return None
    return meta


def _storable(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """Contiguous, unshared float tensors for safetensors; an unembedding that is exactly the
    transposed embedding (tied weights) is dropped and marked, to halve the file."""
    tied = _TIED_KEY in state_dict and _TIED_SOURCE in state_dict
    tied = tied and torch.equal(state_dict[_TIED_KEY], state_dict[_TIED_SOURCE].T)
    tensors = {
        key: value.detach().to("cpu").contiguous().clone()
        for key, value in state_dict.items()
        if not (tied and key == _TIED_KEY)
    }
    return tensors, tied


def build_cache(source: GgufSource, root: Path) -> Path:
    """Convert ``source`` from its GGUF and write its cache atomically; returns the cache dir.
    A cache written at the same moment by another process is either replaced or kept; both are
    complete."""
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    final = model_cache_dir(root, source)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=root, ignore_cleanup_errors=True) as tmp:
        workdir = Path(tmp)
        hf_model, tokenizer = convert.load_hf_gguf(source.materialize(workdir))
        state_dict, cfg_json = convert.convert(source, hf_model, workdir)
        del hf_model
        tensors, tied = _storable(state_dict)
        with atomic_dir(final) as staged:
            save_file(tensors, str(staged / _WEIGHTS_FILE))
            tokenizer.save_pretrained(str(staged / _TOKENIZER_DIR))
            weights = staged / _WEIGHTS_FILE
            meta = _expected_metadata(source) | {
                "cfg": cfg_json,
                "tied_unembed": tied,
                "weights_size": weights.stat().st_size,
                "weights_sha256": _sha256(weights),
            }
            (staged / _META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
    return final


def _model_from_cache(
    directory: Path,
    meta: dict[str, Any],
    source: GgufSource,
    *,
    device: str | torch.device | None,
    dtype: torch.dtype,
    n_ctx: int | None,
) -> HookedTransformer:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    cfg_kwargs = {k: v for k, v in meta["cfg"].items() if k != "native_n_ctx"}
    tokenizer_dir = directory / _TOKENIZER_DIR
    cfg = _tl.config_from_dict(
        cfg_kwargs
        | dict(
            n_ctx=n_ctx or min(DEFAULT_N_CTX, meta["cfg"]["native_n_ctx"]),
            dtype=dtype,
            device=device,
            model_name=source.model_name,
            tokenizer_name=str(tokenizer_dir),
        )
    )
    state_dict = load_file(str(directory / _WEIGHTS_FILE))
    if meta.get("tied_unembed"):
        state_dict[_TIED_KEY] = state_dict[_TIED_SOURCE].T.contiguous()
    with hf_offline(), quiet():
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        model = _tl.model_from_state_dict(cfg, tokenizer, state_dict)
    return linear_layout(model).eval()


def load_cached(
    source: GgufSource,
    *,
    device: str | torch.device | None,
    dtype: torch.dtype,
    n_ctx: int | None,
    cache_dir: str | os.PathLike[str] | None,
    rebuild: bool,
) -> HookedTransformer:
    """The offline model ``source`` from its cache, converted from the GGUF first if the cache
    is missing or invalid (or ``rebuild``)."""
    root = cache_root(cache_dir)
    directory = model_cache_dir(root, source)
    meta = None if rebuild else read_valid_cache(directory, source)
    if meta is None:
        with build_lock(root, source):
            # another process (a torchrun rank) may have built it while this one waited
            meta = None if rebuild else read_valid_cache(directory, source)
            if meta is None:
                logger.info("converting %s from GGUF into %s", source.name, directory)
                directory = build_cache(source, root)
                meta = read_valid_cache(directory, source)
                if meta is None:
                    raise ModelLoadError(f"the freshly written cache {directory} does not validate")
    return _model_from_cache(directory, meta, source, device=device, dtype=dtype, n_ctx=n_ctx)


@contextmanager
def build_lock(root: Path, source: GgufSource) -> Iterator[None]:
    """An exclusive lock on building ``source``'s cache under ``root`` (``fcntl.flock`` on a lock
    file beside it; held by one process at a time, released on exit or when the process dies),
    so processes started together convert the GGUF once and read the result, instead of
    replacing each other's copy while the other validates it. Where ``fcntl`` does not exist
    the build is not locked (the atomic publish still keeps every copy complete)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    root.mkdir(parents=True, exist_ok=True)
    with (root / f".{source.name}.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
