"""Saved artifacts (``steerlens.artifacts``): a safetensors file and a JSON record in one folder,
written atomically, checked on load, never unpickled. The bad-input catalogue in
``tests/integration/test_bad_input.py`` covers the same refusals through ``load_intervention``."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

import steerlens as sl
from steerlens import errors
from steerlens.artifacts import FORMAT_VERSION, check_dtype, load_artifact, save_artifact
from steerlens.methods import load_intervention

SITE = "resid_post.0"


def tensors() -> dict[str, torch.Tensor]:
    return {
        "f64": torch.linspace(-1, 1, 6, dtype=torch.float64).view(2, 3),
        "f32": torch.arange(4, dtype=torch.float32),
        "i64": torch.tensor([3, 1, 4]),
        "mask": torch.tensor([True, False]),
    }


def write_sae(folder) -> None:
    (folder / "sae_0").mkdir()
    (folder / "sae_0" / "weights.bin").write_bytes(b"\x00\x01\x02")
    (folder / "sae_0" / "cfg.json").write_text("{}")


def test_round_trip_keeps_tensors_and_records_what_loading_checks(tmp_path):
    folder = save_artifact(tmp_path / "a", "example", tensors(), {"note": "hi", "n": 3})
    assert folder == tmp_path / "a"
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "tensors.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # nothing staged is left beside it
    back, meta = load_artifact(folder, "example")
    assert set(back) == set(tensors())
    for name, value in tensors().items():
        assert back[name].dtype == value.dtype and torch.equal(back[name], value), name
    record = json.loads((folder / "meta.json").read_text())
    assert record == meta
    assert meta["note"] == "hi" and meta["n"] == 3
    assert meta["kind"] == "example" and meta["format_version"] == FORMAT_VERSION
    digest = hashlib.sha256((folder / "tensors.safetensors").read_bytes()).hexdigest()
    assert meta["tensors_sha256"] == digest
    assert "files_sha256" not in meta


def test_views_and_tensors_with_gradients_are_saved_as_plain_values(tmp_path):
    base = torch.arange(6, dtype=torch.float64).view(2, 3).requires_grad_(True)
    save_artifact(tmp_path / "a", "example", {"t": base.T, "g": base * 2}, {})
    back, _ = load_artifact(tmp_path / "a", "example")
    assert torch.equal(back["t"], base.detach().T) and torch.equal(back["g"], 2 * base.detach())
    assert not back["g"].requires_grad


def test_saving_again_replaces_the_artifact(tmp_path):
    save_artifact(tmp_path / "a", "example", {"v": torch.ones(3)}, {"round": 1}, write_sae)
    save_artifact(tmp_path / "a", "example", {"w": torch.zeros(2)}, {"round": 2})
    back, meta = load_artifact(tmp_path / "a", "example")
    assert list(back) == ["w"] and meta["round"] == 2
    assert not (tmp_path / "a" / "sae_0").exists()  # the old artifact's files went with it
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


def test_refuses_to_overwrite_what_is_not_an_artifact(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(errors.ArtifactError, match="not a steerlens artifact; refusing"):
        save_artifact(tmp_path / "mine", "example", {"v": torch.ones(3)}, {})
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]


def test_a_failure_while_writing_leaves_the_old_artifact_and_no_staging(tmp_path):
    save_artifact(tmp_path / "a", "example", {"v": torch.ones(3)}, {"round": 1})

    def fail(folder):
        (folder / "sae_0").mkdir()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_artifact(tmp_path / "a", "example", {"v": torch.zeros(3)}, {"round": 2}, fail)
    back, meta = load_artifact(tmp_path / "a", "example")
    assert meta["round"] == 1 and torch.equal(back["v"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


def test_extra_files_are_recorded_and_checked(tmp_path):
    folder = save_artifact(tmp_path / "a", "example", {"v": torch.ones(3)}, {}, write_sae)
    _, meta = load_artifact(folder, "example")
    weights = folder / "sae_0" / "weights.bin"
    assert meta["files_sha256"] == {
        "sae_0/cfg.json": hashlib.sha256(b"{}").hexdigest(),
        "sae_0/weights.bin": hashlib.sha256(b"\x00\x01\x02").hexdigest(),
    }
    weights.write_bytes(b"\x00\x01\x03")
    with pytest.raises(errors.ArtifactError, match="sub-folders do not match"):
        load_artifact(folder, "example")
    weights.unlink()
    with pytest.raises(errors.ArtifactError, match="sub-folders do not match"):
        load_artifact(folder, "example")
    weights.write_bytes(b"\x00\x01\x02")
    load_artifact(folder, "example")
    (folder / "sae_0" / "added.bin").write_bytes(b"")
    with pytest.raises(errors.ArtifactError, match="sub-folders do not match"):
        load_artifact(folder, "example")


@pytest.mark.parametrize(
    ("spoil", "match"),
    [
        (lambda f: (f / "meta.json").unlink(), "missing meta.json or tensors.safetensors"),
        (lambda f: (f / "tensors.safetensors").unlink(), "missing meta.json"),
        (lambda f: (f / "meta.json").write_text("[1, 2]"), "does not hold a JSON object"),
        (lambda f: (f / "meta.json").write_bytes(b"\xff\xfe"), "not valid JSON"),
    ],
    ids=["no-meta", "no-tensors", "json-list", "not-utf8"],
)
def test_load_refuses_a_broken_folder(tmp_path, spoil, match):
    folder = save_artifact(tmp_path / "a", "example", {"v": torch.ones(3)}, {})
    spoil(folder)
    with pytest.raises(errors.ArtifactError, match=match):
        load_artifact(folder, "example")


def test_tampered_and_pickled_artifacts_are_refused(tmp_path):
    iv = sl.Intervention("x", {SITE: torch.ones(16)})
    folder = iv.save(tmp_path / "iv")
    blob = (folder / "tensors.safetensors").read_bytes()
    (folder / "tensors.safetensors").write_bytes(blob[:-7])
    with pytest.raises(errors.ArtifactError, match="checksum"):
        load_intervention(folder)
    folder = iv.save(tmp_path / "iv2")
    torch.save({"v0": torch.ones(16)}, folder / "tensors.safetensors")
    with pytest.raises(errors.ArtifactError):
        load_intervention(folder)
    with pytest.raises(errors.ArtifactError, match="not a 'probe'"):
        sl.LinearProbe.load(folder)
    with pytest.raises(errors.ArtifactError, match="not an artifact folder"):
        load_intervention(tmp_path / "missing")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.int64])
def test_check_dtype_reads_what_str_dtype_writes(dtype):
    assert check_dtype(str(dtype)) is dtype
    assert check_dtype(str(dtype).removeprefix("torch.")) is dtype


@pytest.mark.parametrize("name", ["torch.float99", "torch.nn", "Tensor", ""])
def test_check_dtype_refuses_what_is_not_a_dtype(name):
    with pytest.raises(errors.ArtifactError, match="unknown dtype"):
        check_dtype(name)
