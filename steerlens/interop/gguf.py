"""Residual-stream interventions as GGUF control vectors, the files llama.cpp's
``--control-vector`` loads and repeng's ``ControlVector.export_gguf`` / ``import_gguf`` write
and read.

**The format.** A GGUF file with ``general.architecture = "controlvector"``, the string
``controlvector.model_hint`` and the uint32 ``controlvector.layer_count`` (the number of
directions), and one 1-D float32 tensor ``direction.<layer>`` per steered layer: the keys and
types repeng's ``export_gguf`` writes (vgel/repeng, ``repeng/extract.py``; llama.cpp's own
``tools/cvector-generator/cvector-generator.cpp`` writes the same three keys). llama.cpp reads
no metadata: ``common_control_vector_load_one`` (ggml-org/llama.cpp, ``common/common.cpp``)
takes every tensor, rejects any not named ``direction.<n>`` with n ≥ 1 ("invalid (zero)
direction tensor layer index" for n = 0), any not F32 or not 1-D, and any of another length
than the first; directions for the same layer are summed.

**The layer numbering.** llama.cpp adds ``direction.<il>`` to the output of block ``il``
(0-based), at every position of every token, prompt included: each model's graph ends block
``il`` with ``cur = build_cvec(cur, il)`` right after the MLP's residual add (e.g.
``src/models/llama.cpp``), and ``llama_adapter_cvec::apply_to`` adds ``tensors[il]``
(``src/llama-adapter.cpp``, where "there's never a tensor for layer 0"; the default
``--control-vector-layer-range`` is 1..n_layer). That is TransformerLens's
``blocks.il.hook_resid_post`` at ``@all``, and repeng's numbering too (direction i is added to
``model.layers[i]``'s output). So:

- ``resid_post.l@all`` is written as ``direction.l``; ``resid_pre.l@all`` (the same stream,
  l ≥ 1) as ``direction.(l−1)``; two sites on one stream are summed, as llama.cpp sums;
- ``resid_post.0`` cannot be exported: llama.cpp has no slot for block 0's output;
- another position rule (``@last``, ``@p``) raises unless ``any_position=True``, since llama.cpp
  will add the vector at every position;
- non-residual sites, multipliers and clamps raise.

(llama.cpp's ``cvector-generator`` reads block ``il``'s output and writes it as
``direction.(il+1)``, one block later than it read; a file is applied as numbered, whoever wrote
it.)

:func:`read_gguf_control_vector` reads such a file back as an intervention at
``resid_post.<layer>@all``.

>>> import tempfile, pathlib, torch
>>> from steerlens.testing import tiny_model
>>> from steerlens.methods import Intervention
>>> model = tiny_model()
>>> iv = Intervention("example", {"resid_post.1@all": torch.ones(16, dtype=torch.float64)}, 2.0)
>>> path = to_gguf_control_vector(iv, pathlib.Path(tempfile.mkdtemp()) / "cv.gguf", model)
>>> back = read_gguf_control_vector(path, model)
>>> back, float(back.vector()[0])
(Intervention('gguf', sites=[blocks.1.hook_resid_post@all], scale=1), 2.0)
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from steerlens.atomic import atomic_path
from steerlens.errors import ArtifactError, InputError, NonFiniteError
from steerlens.interop.repeng import direction_entries
from steerlens.interop.tensor import imported
from steerlens.methods.intervention import Intervention
from steerlens.sites import Position, as_site

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer

ARCHITECTURE = "controlvector"
MODEL_HINT = f"{ARCHITECTURE}.model_hint"
LAYER_COUNT = f"{ARCHITECTURE}.layer_count"
_DIRECTION = re.compile(r"^direction\.(\d+)$")


def _gguf() -> Any:
    import gguf

    return gguf


def control_vector_layer(site: str, model: HookedTransformer, any_position: bool = False) -> int:
    """The llama.cpp layer ``il`` whose ``direction.<il>`` adds what ``site`` adds (module
    docstring); raises :class:`~steerlens.errors.InputError` for a site it cannot hold."""
    s = as_site(site, model)
    last = model.cfg.n_layers - 1
    valid = f"valid: resid_post.1..resid_post.{last}"
    valid += f" or resid_pre.2..resid_pre.{last}" if last >= 2 else ""
    valid += ", at @all"
    if s.kind == "resid_post":
        layer = s.layer
    elif s.kind == "resid_pre" and s.layer >= 1:
        layer = s.layer - 1
    else:
        raise InputError(
            f"{s.name}: a control vector is added to a block's output (the residual stream "
            f"after block il), which {s.kind}.{s.layer} is not; {valid}"
        )
    if layer == 0:
        raise InputError(
            f"{s.name} is block 0's output, which llama.cpp cannot steer (its loader rejects "
            f"direction.0: 'invalid (zero) direction tensor layer index'); {valid}"
        )
    if s.position != "all" and not any_position:
        raise InputError(
            f"{s.name} steers position {s.position!r} only, but llama.cpp adds a control vector "
            "at every position: steer @all, or pass any_position=True to export it anyway"
        )
    return layer


def to_gguf_control_vector(
    intervention: Intervention,
    path: str | os.PathLike[str],
    model: HookedTransformer,
    *,
    model_hint: str | None = None,
    any_position: bool = False,
) -> Path:
    """Write ``intervention`` (its vectors times its scale) as a GGUF control vector at
    ``path``, atomically, for llama.cpp's ``--control-vector`` and repeng's
    ``ControlVector.import_gguf``; returns the path.

    Args:
        model: the model the intervention steers (sites and widths are checked against it).
        model_hint: ``controlvector.model_hint`` (repeng writes the HF ``model_type``, e.g.
            ``"llama"``); default the TransformerLens model name.
        any_position: export a site steering one position too (llama.cpp adds it at all).
    """
    # every edit an intervention can make besides adding its vectors
    others = [
        k
        for k in ("multipliers", "clamps", "weight_updates", "scalar_functions")
        if getattr(intervention, k, None)
    ]
    if others:
        raise InputError(
            f"intervention {intervention.method!r} also has {' and '.join(others)}; a control "
            "vector holds only vectors added to the residual stream"
        )
    intervention.check(model)
    directions: dict[int, np.ndarray] = {}
    for site in intervention.sites:
        layer = control_vector_layer(site, model, any_position)
        vector = intervention.vector(site).detach().to("cpu").double().numpy()
        directions[layer] = directions.get(layer, np.zeros_like(vector)) + vector
    for layer, vector in directions.items():
        if not np.isfinite(vector).all() or np.abs(vector).max() > np.finfo(np.float32).max:
            raise NonFiniteError(f"direction.{layer} overflows float32 (the format's dtype)")
        directions[layer] = vector.astype(np.float32)
    hint = model.cfg.model_name if model_hint is None else model_hint
    gguf = _gguf()
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), ARCHITECTURE)
        writer.add_string(MODEL_HINT, hint)
        writer.add_uint32(LAYER_COUNT, len(directions))
        for layer in sorted(directions):
            writer.add_tensor(f"direction.{layer}", directions[layer])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return Path(path)


def _string(reader: Any, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None or not len(field.parts):
        return None
    return bytes(field.parts[-1]).decode("utf-8", errors="replace")


def read_gguf_control_vector(
    path: str | os.PathLike[str],
    model: HookedTransformer | None = None,
    *,
    position: Position = "all",
    scale: float = 1.0,
) -> Intervention:
    """The control vector at ``path`` (written by repeng, llama.cpp's generator or
    :func:`to_gguf_control_vector`) as an intervention adding ``direction.<l>`` at
    ``resid_post.l``, at ``position`` (default every position, as llama.cpp adds it).

    A file that is not a GGUF control vector raises :class:`~steerlens.errors.ArtifactError`
    saying what it is; with ``model``, a direction for a layer it lacks or of another width
    raises naming the valid ones."""
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(os.fspath(path))
    except FileNotFoundError:
        raise ArtifactError(f"no control vector file at {path}") from None
    except (ValueError, OSError, IndexError, KeyError) as err:
        raise ArtifactError(f"{path} is not a GGUF file: {err}") from None
    arch = _string(reader, "general.architecture")
    if arch != ARCHITECTURE:
        raise ArtifactError(
            f"{path} is a GGUF file of architecture {arch!r}, not a control vector "
            f"(general.architecture {ARCHITECTURE!r} with tensors direction.<layer>)"
        )
    directions: dict[int, Any] = {}
    for tensor in reader.tensors:
        match = _DIRECTION.match(tensor.name)
        if match is None:
            raise ArtifactError(
                f"{path}: tensor {tensor.name!r} is not a direction; a control vector holds "
                "only tensors named direction.<layer>"
            )
        data = np.asarray(tensor.data)
        if data.dtype.kind != "f" or data.ndim != 1:
            raise ArtifactError(
                f"{path}: {tensor.name} is {tensor.tensor_type.name} of shape "
                f"{tuple(data.shape)}; a direction is one float vector"
            )
        directions[int(match.group(1))] = data
    if not directions:
        raise ArtifactError(f"{path}: a control vector with no direction tensors")
    hint = _string(reader, MODEL_HINT) or ""
    entries = direction_entries(directions, position, f"{Path(path).name}:")
    info = {"source": "gguf", "model_hint": hint, "layers": sorted(directions)}
    return imported("gguf", entries, model, scale, info)
