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

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
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
    from steerlens._tl import HookedTransformer


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
            self.sae.encode(act.to(self.sae.W_dec))
        return captured[-1][..., self.feature].to(act)

    def activation(self, act: Float[Tensor, "... dim"]) -> Tensor:
        """The feature's activation (after the SAE's nonlinearity)."""
        with torch.no_grad():
            return self.sae.encode(act.to(self.sae.W_dec))[..., self.feature].to(act.device)

    def target_value(self, probability: float) -> float:
        raise ConceptError(
            f"{self.name}: an SAE feature has no probability; give target_value (a pre-activation)"
        )

    def off_target(self) -> None:
        """None: the concept is read at the site, so its off-target price is the whole
        next-token distribution's."""
        return None

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


#: where the SAEs that ship with steerlens live: ``<model_name>/<site>/`` holding sae-lens's own
#: files (``cfg.json``, ``sae_weights.safetensors``) and steerlens's training report
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "data" / "sae"


def shipped_saes() -> dict[str, list[str]]:
    """The SAEs that ship with steerlens: model name → sites.

    >>> "resid_post.12" in shipped_saes()["SmolLM2-135M-Instruct"]
    True
    """
    out: dict[str, list[str]] = {}
    if SHIPPED_DIR.is_dir():
        for model_dir in sorted(p for p in SHIPPED_DIR.iterdir() if p.is_dir()):
            sites = sorted(p.name for p in model_dir.iterdir() if (p / "cfg.json").is_file())
            if sites:
                out[model_dir.name] = sites
    return out


def sae_report(path: str | Path) -> dict[str, Any]:
    """The training report saved beside an SAE trained by steerlens (how it was made, held-out
    FVU and L0)."""
    from steerlens.sae_training import REPORT_FILE

    file = Path(path) / REPORT_FILE
    if not file.is_file():
        raise InputError(f"{path} has no steerlens training report ({REPORT_FILE})")
    return json.loads(file.read_text())


def pretrained_sae(
    model: HookedTransformer, site: str | Site = "resid_post.12", *, dtype: str = "float32"
) -> Any:
    """The SAE that ships with steerlens for ``site`` of ``model`` (loaded with sae-lens's
    ``SAE.load_from_disk``; stored in float16, returned in ``dtype``). Raises
    :class:`ConceptError` naming what ships when there is none for this model or site."""
    from sae_lens import SAE

    s = as_site(site, model)
    short = f"{s.kind}.{s.layer}"
    available = shipped_saes()
    name = str(model.cfg.model_name)
    if short not in available.get(name, []):
        listing = "; ".join(f"{m}: {', '.join(v)}" for m, v in available.items()) or "none"
        raise ConceptError(f"no shipped SAE for {name} at {short}; shipped: {listing}")
    sae = SAE.load_from_disk(SHIPPED_DIR / name / short, device=str(model.cfg.device), dtype=dtype)
    if int(sae.cfg.d_in) != s.dim(model):
        raise ConceptError(
            f"the shipped SAE at {short} reads width {sae.cfg.d_in}, but {name} has "
            f"{s.dim(model)} there"
        )
    return sae
