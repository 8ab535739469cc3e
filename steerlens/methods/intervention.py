"""The :class:`Intervention`: what every steering method produces, applied as a context manager.

An intervention is a set of vectors, one per site (the site string carries its position rule:
``@last`` steers the prediction position of every forward pass, so each generated token too;
``@all`` every position; ``@5`` one position), times a ``scale``; and/or a set of
``multipliers`` (activation scaling: the activation at a site, e.g. one head's ``hook_z`` or an
MLP's output, times 1 + scale·m); and/or a set of ``clamps`` (an SAE feature's activation set to
scale·value, :mod:`steerlens.methods.clamp`); and/or a set of ``weight_updates`` (a low-rank
ΔW of a block's output projection, times scale, applied through hooks:
:mod:`steerlens.methods.lowrank`); and/or a set of ``scalar_functions`` (dynamic activation
scaling: the activation at a site times 1 + scale·m(activation), m a learned
:class:`~steerlens.methods.scalar_function.ScalarFunction`). It saves to safetensors + JSON (a
clamped SAE in sae-lens's own safetensors format beside them) and loads without unpickling
anything.

>>> import torch
>>> from steerlens.testing import tiny_model
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
from steerlens.hooks import add_vector, check_vector, scale_activation
from steerlens.methods.clamp import SaeClamp, clamp_feature, load_clamps, save_clamps
from steerlens.methods.lowrank import LowRankUpdate, OutputProjection, apply_update
from steerlens.methods.scalar_function import ScalarFunction, scale_by_function
from steerlens.sites import Site, as_site

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer

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
    multipliers: Mapping[str, float] = field(default_factory=dict)
    clamps: Mapping[str, SaeClamp] = field(default_factory=dict)
    weight_updates: Mapping[str, LowRankUpdate] = field(default_factory=dict)
    scalar_functions: Mapping[str, ScalarFunction] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (
            self.vectors
            or self.multipliers
            or self.clamps
            or self.weight_updates
            or self.scalar_functions
        ):
            raise InputError(
                f"intervention {self.method!r} has no vectors, no multipliers, no clamps, no "
                "weight updates and no scalar functions"
            )
        functions = {}
        for spec, fn in self.scalar_functions.items():
            if not isinstance(fn, ScalarFunction):
                raise InputError(
                    f"scalar function at {spec} must be a ScalarFunction, got {type(fn).__name__}"
                )
            functions[Site.parse(spec).name] = fn
        object.__setattr__(self, "scalar_functions", functions)
        updates = {}
        for spec, update in self.weight_updates.items():
            if not isinstance(update, LowRankUpdate):
                raise InputError(
                    f"weight update of {spec} must be a LowRankUpdate, got {type(update).__name__}"
                )
            updates[OutputProjection.parse(spec).name] = update
        object.__setattr__(self, "weight_updates", updates)
        clamped = {}
        for spec, clamp in self.clamps.items():
            if not isinstance(clamp, SaeClamp):
                raise InputError(f"clamp at {spec} must be an SaeClamp, got {type(clamp).__name__}")
            clamped[Site.parse(spec).name] = clamp
        object.__setattr__(self, "clamps", clamped)
        scaled = {}
        for spec, m in self.multipliers.items():
            if not isinstance(m, int | float) or not math.isfinite(m):
                raise NonFiniteError(f"intervention multiplier at {spec} is {m!r}, not a number")
            scaled[Site.parse(spec).name] = float(m)
        object.__setattr__(self, "multipliers", scaled)
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
        scaled = f", {len(self.multipliers)} scaled sites" if self.multipliers else ""
        clamped = f", clamps at [{', '.join(self.clamps)}]" if self.clamps else ""
        updated = f", updates of [{', '.join(self.weight_updates)}]" if self.weight_updates else ""
        functions = self.scalar_functions
        dynamic = f", {len(functions)} scalar functions" if functions else ""
        return (
            f"Intervention({self.method!r}, sites=[{sites}]{scaled}{clamped}{updated}{dynamic}, "
            f"scale={self.scale:.4g})"
        )

    def table(self) -> pd.DataFrame:
        """One row per site: its width and the norm of its vector, raw and scaled; or, for a
        scaled site, its multiplier m and the factor 1 + scale·m it applies; or, for a weight
        update, its projection, rank and Frobenius norm ‖ΔW‖; or, for a scalar function, its
        width, bias b and ‖w‖."""
        rows: list[dict[str, Any]] = [
            {
                "site": spec,
                "dim": int(v.shape[0]),
                "norm": float(v.norm()),
                "scaled_norm": abs(self.scale) * float(v.norm()),
            }
            for spec, v in self.vectors.items()
        ]
        rows += [
            {"site": spec, "multiplier": m, "factor": 1 + self.scale * m}
            for spec, m in self.multipliers.items()
        ]
        rows += [
            {
                "site": spec,
                "dim": c.feature.d_in,
                "clamped_feature": c.feature.feature,
                "clamp_value": self.scale * c.value,
            }
            for spec, c in self.clamps.items()
        ]
        rows += [
            {"site": name, "rank": u.rank, "norm": float(u.delta().detach().norm())}
            for name, u in self.weight_updates.items()
        ]
        rows += [
            {
                "site": spec,
                "dim": fn.dim,
                "bias": float(fn.bias.detach()),
                "weight_norm": float(fn.weight.detach().norm()),
            }
            for spec, fn in self.scalar_functions.items()
        ]
        return pd.DataFrame(rows)

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
        """The sites that receive a vector (see :attr:`multipliers` for scaled sites)."""
        return tuple(self.vectors)

    def vector(self, site: str | Site | None = None) -> Float[Tensor, " dim"]:
        """The scaled vector at ``site`` (the only site if None)."""
        if not self.vectors:
            raise InputError(
                f"intervention {self.method!r} scales or clamps activations or updates weights; "
                "it has no vector (see .multipliers, .weight_updates, or "
                ".clamps[site].feature.direction for a clamped feature's decoder row)"
            )
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
        for spec in self.multipliers:
            as_site(spec, model)
        for spec, clamp in self.clamps.items():
            clamp.check(as_site(spec, model), model)
        for name, update in self.weight_updates.items():
            update.check(OutputProjection.parse(name).validate(model), model)
        for spec, fn in self.scalar_functions.items():
            fn.check(as_site(spec, model), model)

    @contextmanager
    def apply(
        self,
        model: HookedTransformer,
        scale: float | None = None,
        *,
        attention_mask: Tensor | None = None,
    ) -> Iterator[HookedTransformer]:
        """Steer ``model`` inside the block (``scale`` overrides the intervention's own); every
        hook is removed on exit, exceptions included. For a padded batch pass its
        ``attention_mask`` ([batch, pos], 1 on real tokens, either padding side): ``@last``
        then steers each row's last real token, ``@all`` skips padding, ``@p`` is each row's
        p-th real token (:func:`steerlens.hooks.edit_at`); a weight update acts at every
        position, as the edited weight would."""
        self.check(model)
        factor = self.scale if scale is None else float(scale)
        with ExitStack() as stack:
            for spec, vector in self.vectors.items():
                stack.enter_context(
                    add_vector(model, spec, vector, factor, attention_mask=attention_mask)
                )
            for spec, m in self.multipliers.items():
                stack.enter_context(
                    scale_activation(model, spec, 1 + factor * m, attention_mask=attention_mask)
                )
            for spec, clamp in self.clamps.items():
                stack.enter_context(
                    clamp_feature(model, spec, clamp, factor, attention_mask=attention_mask)
                )
            for name, update in self.weight_updates.items():
                stack.enter_context(apply_update(model, name, update, factor))
            for spec, fn in self.scalar_functions.items():
                stack.enter_context(
                    scale_by_function(model, spec, fn, factor, attention_mask=attention_mask)
                )
            yield model

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write to the folder ``path`` (safetensors + JSON, atomically)."""
        names = {f"v{i}": spec for i, spec in enumerate(self.vectors)}
        tensors = {key: self.vectors[spec] for key, spec in names.items()}
        dtypes = {key: str(t.dtype) for key, t in tensors.items()}
        if self.multipliers:
            values = list(self.multipliers.values())
            tensors["multipliers"] = torch.tensor(values, dtype=torch.float64)
        updates = {f"u{i}": name for i, name in enumerate(self.weight_updates)}
        for key, name in updates.items():
            update = self.weight_updates[name]
            tensors[f"{key}.a"], tensors[f"{key}.b"] = update.a.detach(), update.b.detach()
            dtypes[key] = str(update.a.dtype)
        functions = {f"f{i}": spec for i, spec in enumerate(self.scalar_functions)}
        for key, spec in functions.items():
            tensors[key] = self.scalar_functions[spec].packed()
            dtypes[key] = str(tensors[key].dtype)
        meta = {
            "method": self.method,
            "scale": self.scale,
            "sites": names,
            "dtypes": dtypes,
            "multiplier_sites": list(self.multipliers),
            "weight_updates": updates,
            "scalar_functions": functions,
            "info": self.info,
        }
        clamps = dict(self.clamps)

        def write_saes(folder: Path) -> None:
            meta["clamps"] = save_clamps(folder, clamps)

        return save_artifact(path, ARTIFACT_KIND, tensors, meta, write_saes if clamps else None)


def load_intervention(path: str | os.PathLike[str]) -> Intervention:
    """An :class:`Intervention` saved with :meth:`Intervention.save`; a file that is not one
    (a pickle, a truncated or tampered file) raises :class:`~steerlens.errors.ArtifactError`."""
    tensors, meta = load_artifact(path, ARTIFACT_KIND)
    try:
        sites: dict[str, str] = dict(meta["sites"])
        scaled: list[str] = list(meta.get("multiplier_sites", []))
        updates: dict[str, str] = dict(meta.get("weight_updates", {}))
        functions: dict[str, str] = dict(meta.get("scalar_functions", {}))
        expected = set(sites) | ({"multipliers"} if scaled else set()) | set(functions)
        expected |= {f"{k}.{part}" for k in updates for part in ("a", "b")}
        if expected != set(tensors):
            raise ArtifactError(f"{path}: the tensors do not match the sites listed in meta.json")
        vectors = {sites[k]: tensors[k].to(check_dtype(meta["dtypes"][k])) for k in sites}
        multipliers: dict[str, float] = {}
        if scaled:
            values = tensors["multipliers"]
            if values.shape != (len(scaled),):
                raise ArtifactError(f"{path}: {len(scaled)} scaled sites but {values.shape} values")
            multipliers = dict(zip(scaled, values.tolist(), strict=True))
        clamps = load_clamps(Path(path), list(meta.get("clamps", [])))
        weight_updates = {
            name: LowRankUpdate(
                tensors[f"{k}.a"].to(check_dtype(meta["dtypes"][k])),
                tensors[f"{k}.b"].to(check_dtype(meta["dtypes"][k])),
            )
            for k, name in updates.items()
        }
        scalar_functions = {
            spec: ScalarFunction.unpack(tensors[k].to(check_dtype(meta["dtypes"][k])))
            for k, spec in functions.items()
        }
        return Intervention(
            str(meta["method"]),
            vectors,
            float(meta["scale"]),
            dict(meta.get("info", {})),
            multipliers,
            clamps,
            weight_updates,
            scalar_functions,
        )
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, ArtifactError):
            raise
        raise ArtifactError(f"intervention artifact {path} has bad metadata: {err}") from None
