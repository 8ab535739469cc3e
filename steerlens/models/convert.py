"""Converting a GGUF model into TransformerLens weights and config.

This module owns the conversion of one offline model: dequantizing its GGUF with transformers'
reader, then running TransformerLens's own config builder and weight converter on the result. It
also owns the workaround that conversion needs: TransformerLens picks a config branch from
*words in the model's path*, so the local ``config.json`` it reads must sit in a folder whose path
contains none of them (:func:`local_config_dir`).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from steerlens import _tl
from steerlens._tl import HookedTransformerConfig
from steerlens.errors import ModelLoadError
from steerlens.models.offline import hf_offline, quiet
from steerlens.models.sources import GgufSource

# Config fields that depend on the call (or on where the cache lives), not on the weights.
_PER_LOAD_CFG_FIELDS = frozenset(
    {"dtype", "device", "n_devices", "n_ctx", "model_name", "tokenizer_name", "n_params"}
    | {"tokenizer_prepends_bos"}
)


def load_hf_gguf(gguf_path: Path) -> tuple[Any, Any]:
    """The transformers model (dequantized to float32, eval mode) and tokenizer of a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, filename = str(gguf_path.parent), gguf_path.name
    with hf_offline(), quiet():
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
        hf_model = AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=filename, dtype=torch.float32
        )
    if hasattr(hf_model.config, "quantization_config"):
        # The weights in hand are plain float tensors; the GGUF marker would make TransformerLens
        # refuse them as "quantized".
        delattr(hf_model.config, "quantization_config")
    hf_model.eval()
    return hf_model, tokenizer


@contextlib.contextmanager
def local_config_dir(hf_model: Any, workdir: Path) -> Iterator[Path]:
    """A temporary model directory holding only ``config.json``, for TransformerLens's config
    branch keyed on ``architectures``. Its path must contain none of the words
    :data:`steerlens._tl.CONFIG_PATH_WORDS` ("llama", "gemma"), which make TransformerLens ignore
    the config: the system temp dir is tried first, then ``workdir``."""
    for parent in (None, workdir):
        with tempfile.TemporaryDirectory(prefix="steerlens-cfg-", dir=parent) as tmp:
            if any(word in tmp.lower() for word in _tl.CONFIG_PATH_WORDS):
                continue
            config = hf_model.config.to_dict()
            config.pop("quantization_config", None)
            config["architectures"] = [type(hf_model).__name__]
            (Path(tmp) / "config.json").write_text(json.dumps(config, default=str))
            yield Path(tmp)
            return
    raise ModelLoadError(
        f"both the temp dir and {workdir} contain 'llama' or 'gemma', which misleads "
        "TransformerLens's config loader; set TMPDIR or STEERLENS_CACHE_DIR elsewhere"
    )


def convert(source: GgufSource, hf_model: Any, workdir: Path) -> tuple[dict, dict[str, Any]]:
    """TransformerLens state dict (raw weights) and config kwargs of a loaded HF model."""
    with contextlib.ExitStack() as stack:
        tl_name = source.tl_name or str(stack.enter_context(local_config_dir(hf_model, workdir)))
        stack.enter_context(hf_offline())
        stack.enter_context(quiet())
        cfg = _tl.pretrained_config(
            tl_name,
            hf_cfg=hf_model.config.to_dict(),
            default_prepend_bos=source.default_prepend_bos,
        )
        state_dict = _tl.pretrained_state_dict(tl_name, cfg, hf_model)
    return state_dict, _cfg_to_json(cfg)


def _cfg_to_json(cfg: HookedTransformerConfig) -> dict[str, Any]:
    """The config fields that describe the weights, as JSON-safe values."""
    out: dict[str, Any] = {}
    for key, value in _tl.config_to_dict(cfg).items():
        if key in _PER_LOAD_CFG_FIELDS:
            continue
        if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
            value = value.item()
        json.dumps(value)  # fail loudly on a field we do not know how to store
        out[key] = value
    out["native_n_ctx"] = cfg.n_ctx
    return out
