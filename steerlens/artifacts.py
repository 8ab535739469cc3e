"""Saved artifacts: a folder with ``tensors.safetensors`` and ``meta.json``, never a pickle.

Every artifact steerlens writes (interventions, probes, metrics) is two files in one folder,
written to a temporary folder beside it and renamed into place
(:func:`~steerlens.atomic.atomic_dir`), so a reader never sees half of one. ``meta.json`` names
the artifact's ``kind`` and ``format_version`` and records the SHA-256 of the tensor file;
loading checks all three and refuses anything else with an
:class:`~steerlens.errors.ArtifactError`. An artifact may carry extra files in sub-folders (an
intervention that clamps an SAE feature keeps the SAE in sae-lens's own safetensors format); their
SHA-256 are recorded and checked the same way.

>>> import tempfile, torch
>>> folder = tempfile.mkdtemp()
>>> _ = save_artifact(folder + "/a", "example", {"v": torch.ones(3)}, {"note": "hi"})
>>> tensors, meta = load_artifact(folder + "/a", "example")
>>> tensors["v"].tolist(), meta["note"]
([1.0, 1.0, 1.0], 'hi')
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from steerlens.atomic import atomic_dir
from steerlens.errors import ArtifactError

FORMAT_VERSION = 1
TENSORS = "tensors.safetensors"
META = "meta.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _extra_files(folder: Path) -> dict[str, str]:
    """SHA-256 of every file in the artifact's sub-folders, keyed by relative path."""
    return {
        str(f.relative_to(folder)): _sha256(f)
        for f in sorted(folder.rglob("*"))
        if f.is_file() and f.parent != folder
    }


def save_artifact(
    path: str | os.PathLike[str],
    kind: str,
    tensors: dict[str, Tensor],
    meta: dict[str, Any],
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``tensors`` (safetensors) and ``meta`` (JSON) to the folder ``path`` atomically;
    an existing artifact there is replaced. ``extra(folder)`` may write more files, in
    sub-folders of the (staged) folder. Returns the folder."""
    final = Path(path)
    if final.exists() and not (final / META).is_file():
        raise ArtifactError(
            f"{final} exists and is not a steerlens artifact; refusing to overwrite"
        )
    with atomic_dir(final) as staged:
        plain = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(plain, str(staged / TENSORS))
        if extra is not None:
            extra(staged)
        record = {
            **meta,
            "kind": kind,
            "format_version": FORMAT_VERSION,
            "tensors_sha256": _sha256(staged / TENSORS),
        }
        files = _extra_files(staged)
        if files:
            record["files_sha256"] = files
        (staged / META).write_text(json.dumps(record, indent=2, sort_keys=True))
    return final


def load_artifact(path: str | os.PathLike[str], kind: str) -> tuple[dict[str, Tensor], dict]:
    """The tensors and metadata of the artifact at ``path``, checked to be a ``kind`` artifact
    of this format whose tensor file is intact. Never unpickles anything."""
    folder = Path(path)
    if not folder.is_dir():
        raise ArtifactError(
            f"{folder} is not an artifact folder (expected a folder with {TENSORS} and {META})"
        )
    meta_path, tensor_path = folder / META, folder / TENSORS
    if not meta_path.is_file() or not tensor_path.is_file():
        raise ArtifactError(f"{folder} is missing {META} or {TENSORS}")
    try:
        meta = json.loads(meta_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{meta_path} is not valid JSON: {err}") from None
    if not isinstance(meta, dict):
        raise ArtifactError(f"{meta_path} does not hold a JSON object")
    if meta.get("kind") != kind:
        raise ArtifactError(f"{folder} holds a {meta.get('kind')!r} artifact, not a {kind!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{folder} has format version {meta.get('format_version')!r}; this steerlens reads "
            f"version {FORMAT_VERSION}"
        )
    if meta.get("tensors_sha256") != _sha256(tensor_path):
        raise ArtifactError(
            f"{tensor_path} does not match the checksum in {META}: truncated or tampered with"
        )
    recorded = meta.get("files_sha256", {})
    if not isinstance(recorded, dict) or recorded != _extra_files(folder):
        raise ArtifactError(
            f"{folder}: the files in its sub-folders do not match the checksums in {META}: "
            "missing, truncated or tampered with"
        )
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(f"{tensor_path} is not a valid safetensors file: {err}") from None
    return tensors, meta


def check_dtype(name: str) -> torch.dtype:
    """The torch dtype named by ``str(dtype)`` in metadata (``"torch.float32"``)."""
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ArtifactError(f"unknown dtype {name!r} in artifact metadata")
    return dtype
