"""Clamping an SAE feature: at the site, replace the feature's activation by a value c.

With f(x) the feature's activation (the SAE's own ``encode``, so any architecture sae-lens loads:
ReLU, JumpReLU, TopK...) and W_dec[f] its decoder row, the edit is

    x ← x + (c − f(x)) · W_dec[f],

which is what decoding the clamped feature code and adding back the SAE's reconstruction error
gives (Templeton et al., *Scaling Monosemanticity*). Unlike adding α·W_dec[f], the size of the
edit depends on the activation: a feature already at c is left alone. In an
:class:`~steerlens.methods.intervention.Intervention` the clamp value is ``scale`` × ``value``.

>>> import torch
>>> from sae_lens import StandardSAE, StandardSAEConfig
>>> from steerlens.concepts.sae import sae_feature
>>> from steerlens.testing import tiny_model
>>> model = tiny_model()
>>> sae = StandardSAE(StandardSAEConfig(d_in=16, d_sae=8, dtype="float64"))
>>> clamp = SaeClamp(sae_feature(sae, 3, "resid_post.0"))
>>> x = torch.randn(2, 16, dtype=torch.float64)
>>> clamp.edit(x, 5.0).shape
torch.Size([2, 16])
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from steerlens.concepts.sae import SaeFeature
from steerlens.errors import ArtifactError, InputError, NonFiniteError
from steerlens.hooks import edit_at
from steerlens.sites import Site, as_site

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer


@dataclass(frozen=True)
class SaeClamp:
    """Clamp ``feature`` to ``value`` (times the intervention's scale) at its site."""

    feature: SaeFeature
    value: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.feature, SaeFeature):
            raise InputError(f"a clamp needs an SaeFeature, got {type(self.feature).__name__}")
        if not isinstance(self.value, int | float) or not math.isfinite(self.value):
            raise NonFiniteError(f"clamp value {self.value!r} is not a finite number")

    def edit(self, x: Tensor, scale: float = 1.0) -> Tensor:
        """``x`` [..., d_in] with the feature's activation replaced by ``scale · value``."""
        with torch.no_grad():
            f = self.feature.activation(x).to(x.dtype)
        target = scale * self.value
        w_dec = self.feature.direction.to(x)
        return x + (target - f).unsqueeze(-1) * w_dec

    def check(self, site: Site, model: HookedTransformer) -> None:
        self.feature.check_site(site, model)


@contextmanager
def clamp_feature(
    model: HookedTransformer,
    site: str | Site,
    clamp: SaeClamp,
    scale: float = 1.0,
    *,
    attention_mask: Tensor | None = None,
) -> Iterator[HookedTransformer]:
    """While inside the block, clamp the feature at ``site`` (its position rule; with an
    ``attention_mask``, counted over each row's real tokens) to ``scale · clamp.value``."""
    site = as_site(site, model)
    clamp.check(site, model)
    if not math.isfinite(scale * clamp.value):
        raise NonFiniteError(f"clamp value {scale} × {clamp.value} overflows at {site.name}")
    with edit_at(model, site, lambda x, shape: clamp.edit(x, scale), attention_mask=attention_mask):
        yield model


def save_clamps(folder: Path, clamps: dict[str, SaeClamp]) -> list[dict[str, Any]]:
    """Write each clamp's SAE with sae-lens's own ``save_model`` (safetensors + cfg.json) into
    ``folder/sae_<i>``; the JSON entries that :func:`load_clamps` reads back."""
    entries = []
    for i, (spec, clamp) in enumerate(clamps.items()):
        sub = f"sae_{i}"
        clamp.feature.sae.save_model(str(folder / sub))
        entries.append(
            {
                "site": spec,
                "folder": sub,
                "feature": clamp.feature.feature,
                "sae_site": clamp.feature.site,
                "value": clamp.value,
                "architecture": type(clamp.feature.sae).__name__,
            }
        )
    return entries


def load_clamps(folder: Path, entries: list[dict[str, Any]]) -> dict[str, SaeClamp]:
    """The clamps saved by :func:`save_clamps` (each SAE through sae-lens's ``load_from_disk``,
    which reads safetensors and JSON only)."""
    from sae_lens import SAE

    out = {}
    for entry in entries:
        sub = folder / str(entry["folder"])
        if not (sub / "cfg.json").is_file():
            raise ArtifactError(f"{folder}: the clamped SAE folder {sub.name} is missing")
        try:
            sae = SAE.load_from_disk(str(sub), device="cpu")
        except (OSError, ValueError, KeyError) as err:
            raise ArtifactError(f"{sub}: not a loadable sae-lens SAE: {err}") from None
        feature = SaeFeature(sae, int(entry["feature"]), str(entry["sae_site"]))
        out[str(entry["site"])] = SaeClamp(feature, float(entry["value"]))
    return out
