"""A plain vector at a site as an :class:`~steerlens.Intervention`, and the checks every import
in :mod:`steerlens.interop` shares: each source layer lands on one site, a model (when given)
has that layer and that width, and two source layers never land on the same site.

>>> import torch
>>> from steerlens.testing import tiny_model
>>> model = tiny_model()
>>> iv = from_tensor(torch.ones(16), "resid_post.1@all", model)
>>> iv, iv.vector().dtype
(Intervention('tensor', sites=[blocks.1.hook_resid_post@all], scale=1), torch.float64)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from steerlens.errors import InputError, SiteError
from steerlens.hooks import check_vector
from steerlens.methods.intervention import Intervention
from steerlens.sites import Position, Site

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer

#: (what the source calls it, e.g. "repeng direction 3"; where it lands; the vector)
Entry = tuple[str, Site, Tensor]


def from_tensor(
    vector: Float[Tensor, " dim"],
    site: str | Site,
    model: HookedTransformer | None = None,
    *,
    position: Position | None = None,
    scale: float = 1.0,
    method: str = "tensor",
) -> Intervention:
    """``vector`` added at ``site`` (its position rule, or ``position`` when given), times
    ``scale``. With ``model``, the site's layer and the vector's width are checked against it
    and the vector is cast to the model's dtype and device."""
    where = Site.parse(site, position=position)
    if not isinstance(vector, Tensor):
        raise InputError(f"from_tensor needs a torch.Tensor, got {type(vector).__name__}")
    return imported(method, [(f"the vector for {where.name}", where, vector)], model, scale, {})


def layer_index(key: Any, what: str) -> int:
    """A source's layer key as an int (numpy integers too); ``what`` names the source."""
    if isinstance(key, bool) or not isinstance(key, int | np.integer):
        raise InputError(f"{what}: layer keys must be ints, got {key!r}")
    return int(key)


def as_vector(value: Any, what: str) -> Tensor:
    """A source's vector (a tensor, or a numpy array such as repeng's) as a 1-D float tensor,
    copied (a GGUF file's arrays are memory maps)."""
    if isinstance(value, Tensor):
        tensor = value.detach().clone()
    else:
        array = np.asarray(value)
        if array.dtype.kind != "f":
            raise InputError(f"{what} must hold floats, got dtype {array.dtype}")
        tensor = torch.from_numpy(np.array(array))
    if tensor.dim() != 1:
        raise InputError(f"{what} must be one vector, got shape {tuple(tensor.shape)}")
    return tensor


def imported(
    method: str,
    entries: Sequence[Entry],
    model: HookedTransformer | None,
    scale: float,
    info: Mapping[str, Any],
) -> Intervention:
    """The intervention adding each entry's vector at its site. With ``model``: a layer it lacks
    raises :class:`~steerlens.errors.SiteError`, a vector of another width
    :class:`~steerlens.errors.InputError`, each naming the source's own label and what is
    valid; vectors are cast to the model's dtype and device (negative layers resolved)."""
    if not entries:
        raise InputError(f"{method}: nothing to import (no layers)")
    vectors: dict[str, Tensor] = {}
    labels: dict[str, str] = {}
    for label, site, vector in entries:
        if model is not None:
            try:
                site = site.validate(model)
            except SiteError as err:
                raise SiteError(f"{label}: {err}") from None
            check_vector(vector, site, model, label)
            vector = vector.to(dtype=model.cfg.dtype, device=model.cfg.device)
        if site.name in vectors:
            raise InputError(f"{label} and {labels[site.name]} both land on {site.name}")
        vectors[site.name] = vector
        labels[site.name] = label
    return Intervention(method, vectors, float(scale), dict(info))
