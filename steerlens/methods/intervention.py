"""The :class:`Intervention`: what every steering method produces, applied as a context manager.

An intervention is a set of vectors, one per site (the site string carries its position rule:
``@last`` steers the prediction position of every forward pass, so each generated token too;
``@all`` every position; ``@5`` one position), times a ``scale``. It saves to safetensors + JSON
and loads without unpickling anything.

>>> import torch
>>> from steerlens.tiny import tiny_model
>>> model = tiny_model()
>>> iv = Intervention("example", {"resid_post.0": torch.ones(16, dtype=torch.float64)})
>>> tokens = torch.tensor([[1, 2, 3]])
>>> with iv.apply(model):
...     steered = model(tokens)
>>> bool((steered != model(tokens)).any())
True
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from steerlens.artifacts import check_dtype, load_artifact, save_artifact
from steerlens.errors import ArtifactError, InputError, NonFiniteError
from steerlens.hooks import add_vector, check_vector
from steerlens.sites import Site, as_site

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

ARTIFACT_KIND = "intervention"


@dataclass(frozen=True)
class Intervention:
    """``scale`` × ``vectors[site]`` added at each site while applied.

    ``info`` records how it was made (method config, steps, whether a target was reached...),
    JSON-serializable.
    """

    method: str
    vectors: Mapping[str, Float[Tensor, " dim"]]
    scale: float = 1.0
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.vectors:
            raise InputError(f"intervention {self.method!r} has no vectors")
        if not math.isfinite(self.scale):
            raise NonFiniteError(f"intervention {self.method!r}: scale {self.scale} is not finite")
        canonical = {}
        for spec, vector in self.vectors.items():
            site = Site.parse(spec)
            if not isinstance(vector, Tensor) or vector.dim() != 1:
                raise InputError(f"intervention vector at {spec} must be a 1-D tensor")
            if not torch.isfinite(vector).all():
                raise NonFiniteError(f"intervention vector at {spec} contains NaN or inf")
            canonical[site.name] = vector
        object.__setattr__(self, "vectors", canonical)

    def __repr__(self) -> str:
        sites = ", ".join(self.vectors)
        return f"Intervention({self.method!r}, sites=[{sites}], scale={self.scale:.4g})"

    def table(self) -> pd.DataFrame:
        """One row per site: its width and the norm of its vector, raw and scaled."""
        return pd.DataFrame(
            [
                {
                    "site": spec,
                    "dim": int(v.shape[0]),
                    "norm": float(v.norm()),
                    "scaled_norm": abs(self.scale) * float(v.norm()),
                }
                for spec, v in self.vectors.items()
            ]
        )

    def _repr_html_(self) -> str:
        info = {k: v for k, v in self.info.items() if isinstance(v, str | int | float | bool)}
        lines = "".join(f"<li>{escape(str(k))}: {escape(str(v))}</li>" for k, v in info.items())
        return (
            f"<p><b>{escape(repr(self))}</b></p>"
            + self.table().to_html(index=False, float_format="%.4g")
            + (f"<ul>{lines}</ul>" if lines else "")
        )

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(self.vectors)

    def vector(self, site: str | Site | None = None) -> Float[Tensor, " dim"]:
        """The scaled vector at ``site`` (the only site if None)."""
        if site is None:
            if len(self.vectors) != 1:
                raise InputError(f"intervention has {len(self.vectors)} sites: name one")
            return self.scale * next(iter(self.vectors.values()))
        name = Site.parse(site).name
        if name not in self.vectors:
            raise InputError(f"no vector at {name}; this intervention steers {self.sites}")
        return self.scale * self.vectors[name]

    def scaled(self, scale: float) -> Intervention:
        """The same vectors with another scale."""
        return replace(self, scale=float(scale))

    def check(self, model: HookedTransformer) -> None:
        """Raise a steerlens error unless every vector fits its site on ``model``."""
        for spec, vector in self.vectors.items():
            check_vector(vector, as_site(spec, model), model, f"{self.method} vector")

    @contextmanager
    def apply(
        self, model: HookedTransformer, scale: float | None = None
    ) -> Iterator[HookedTransformer]:
        """Steer ``model`` inside the block (``scale`` overrides the intervention's own); every
        hook is removed on exit, exceptions included."""
        self.check(model)
        factor = self.scale if scale is None else float(scale)
        with ExitStack() as stack:
            for spec, vector in self.vectors.items():
                stack.enter_context(add_vector(model, spec, vector, factor))
            yield model

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write to the folder ``path`` (safetensors + JSON, atomically)."""
        names = {f"v{i}": spec for i, spec in enumerate(self.vectors)}
        tensors = {key: self.vectors[spec] for key, spec in names.items()}
        dtypes = {key: str(t.dtype) for key, t in tensors.items()}
        meta = {
            "method": self.method,
            "scale": self.scale,
            "sites": names,
            "dtypes": dtypes,
            "info": self.info,
        }
        return save_artifact(path, ARTIFACT_KIND, tensors, meta)


def load_intervention(path: str | os.PathLike[str]) -> Intervention:
    """An :class:`Intervention` saved with :meth:`Intervention.save`; a file that is not one
    (a pickle, a truncated or tampered file) raises :class:`~steerlens.errors.ArtifactError`."""
    tensors, meta = load_artifact(path, ARTIFACT_KIND)
    try:
        sites: dict[str, str] = dict(meta["sites"])
        if set(sites) != set(tensors):
            raise ArtifactError(f"{path}: the tensors do not match the sites listed in meta.json")
        vectors = {sites[k]: tensors[k].to(check_dtype(meta["dtypes"][k])) for k in sites}
        return Intervention(
            str(meta["method"]), vectors, float(meta["scale"]), dict(meta.get("info", {}))
        )
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, ArtifactError):
            raise
        raise ArtifactError(f"intervention artifact {path} has bad metadata: {err}") from None
