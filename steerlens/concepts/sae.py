"""SAE features as concepts and directions, from any sae-lens :class:`~sae_lens.SAE`.

A feature's concept value is its pre-activation (what the SAE computes before its sparsity
nonlinearity, read at the SAE's own ``hook_sae_acts_pre``, so every architecture sae-lens loads
works the same way); its direction is its decoder row ``W_dec[f]``.

>>> import torch
>>> from sae_lens import StandardSAE, StandardSAEConfig
>>> sae = StandardSAE(StandardSAEConfig(d_in=16, d_sae=32, dtype="float64"))
>>> feature = SaeFeature(sae, 3, "blocks.0.hook_resid_post")
>>> feature.direction.shape, feature.value(torch.zeros(16, dtype=torch.float64), None).shape
(torch.Size([16]), torch.Size([]))
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from steerlens.errors import ConceptError, InputError
from steerlens.sites import Site, as_site

with warnings.catch_warnings():
    # sae-lens imports transformer_lens.utils, which warns that it is deprecated; only that
    # warning is silenced, and only during this import.
    warnings.filterwarnings("ignore", message="The 'utils' module has been deprecated")
    import sae_lens  # noqa: F401

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


@dataclass(frozen=True)
class SaeFeature:
    """Feature ``feature`` of ``sae``, trained on the activations at ``site``."""

    sae: Any
    feature: int
    site: str
    name: str = field(default="")

    def __post_init__(self) -> None:
        for attr in ("encode", "W_dec", "hook_sae_acts_pre", "cfg"):
            if not hasattr(self.sae, attr):
                raise InputError(f"expected a sae-lens SAE, got {type(self.sae).__name__}")
        d_sae = int(self.sae.cfg.d_sae)
        if not isinstance(self.feature, int) or not 0 <= self.feature < d_sae:
            raise ConceptError(
                f"SAE feature {self.feature!r} is out of range: the SAE has {d_sae} features "
                f"(valid: 0..{d_sae - 1})"
            )
        if not self.name:
            object.__setattr__(self, "name", f"sae feature {self.feature} at {self.site}")

    @property
    def d_in(self) -> int:
        return int(self.sae.cfg.d_in)

    @property
    def direction(self) -> Float[Tensor, " dim"]:
        """The decoder row W_dec[f]."""
        return self.sae.W_dec[self.feature].detach()

    def value(self, act: Float[Tensor, "... dim"], logits: Tensor | None = None) -> Tensor:
        """The feature's pre-activation for ``act`` (differentiable)."""
        if act.shape[-1] != self.d_in:
            raise InputError(
                f"{self.name} reads {self.d_in}-dim activations, got shape {tuple(act.shape)}"
            )
        captured: list[Tensor] = []

        def grab(pre: Tensor, hook: Any) -> None:
            captured.append(pre)

        with self.sae.hooks(fwd_hooks=[("hook_sae_acts_pre", grab)]):
            self.sae.encode(act.to(self.sae.dtype))
        return captured[-1][..., self.feature].to(act.dtype)

    def activation(self, act: Float[Tensor, "... dim"]) -> Tensor:
        """The feature's activation (after the SAE's nonlinearity)."""
        with torch.no_grad():
            return self.sae.encode(act.to(self.sae.dtype))[..., self.feature]

    def target_value(self, probability: float) -> float:
        raise ConceptError(
            f"{self.name}: an SAE feature has no probability; give target_value (a pre-activation)"
        )

    def check_site(self, site: str | Site, model: HookedTransformer) -> None:
        """Raise :class:`ConceptError` unless the SAE reads ``site`` of ``model``."""
        s = as_site(site, model)
        mine = as_site(self.site, model)
        if (s.kind, s.layer, s.head) != (mine.kind, mine.layer, mine.head):
            raise ConceptError(f"{self.name}: the SAE was trained at {self.site}, not {s.name}")
        if s.dim(model) != self.d_in:
            raise ConceptError(
                f"{self.name}: the SAE has width {self.d_in} but {s.name} has width {s.dim(model)}"
            )


def sae_feature(sae: Any, feature: int, site: str | Site | None = None) -> SaeFeature:
    """A feature of ``sae`` at ``site`` (default: the SAE's own ``metadata.hook_name``)."""
    if site is None:
        hook = getattr(getattr(sae.cfg, "metadata", None), "hook_name", None)
        if not hook:
            raise ConceptError("the SAE does not record its hook name: pass site=")
        site = str(hook)
    return SaeFeature(sae, feature, Site.parse(site).name)
