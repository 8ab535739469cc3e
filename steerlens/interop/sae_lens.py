"""A sae-lens SAE's decoder row as an :class:`~steerlens.Intervention`: feature f's ``W_dec[f]``
added, as is (not renormalised), at the SAE's own hook (``sae.cfg.metadata.hook_name``, and
its ``hook_head_index`` where the SAE reads one head), every position by default.

:func:`steerlens.methods.vector.sae_intervention` is steerlens's own SAE steering method (a unit
direction, or clamping the feature); this is the row as sae-lens users add it.

>>> from sae_lens import StandardSAE, StandardSAEConfig
>>> from steerlens.testing import tiny_model
>>> sae = StandardSAE(StandardSAEConfig(d_in=16, d_sae=32, dtype="float64"))
>>> sae.cfg.metadata.hook_name = "blocks.1.hook_resid_post"
>>> from_sae_feature(sae, 5, tiny_model())
Intervention('sae_lens', sites=[blocks.1.hook_resid_post@all], scale=1)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from steerlens.concepts.sae import SaeFeature
from steerlens.errors import ConceptError
from steerlens.interop.tensor import imported
from steerlens.methods.intervention import Intervention
from steerlens.sites import Position, Site

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer


def _hook_site(sae: Any) -> Site:
    metadata = getattr(getattr(sae, "cfg", None), "metadata", None)
    hook = getattr(metadata, "hook_name", None)
    if not hook:
        raise ConceptError(
            "the SAE does not record its hook name (cfg.metadata.hook_name): pass site="
        )
    site = Site.parse(str(hook))
    head = getattr(metadata, "hook_head_index", None)
    return site if head is None else Site(site.kind, site.layer, int(head))


def from_sae_feature(
    sae: Any,
    feature: int,
    model: HookedTransformer | None = None,
    *,
    site: str | Site | None = None,
    position: Position | None = None,
    scale: float = 1.0,
) -> Intervention:
    """``scale × sae.W_dec[feature]`` added at the SAE's hook (module docstring).

    Args:
        sae: a sae-lens ``SAE`` (any architecture).
        feature: the feature index, 0..d_sae − 1.
        site: where to add it instead of the SAE's hook (a steerlens site, its own position
            rule kept unless ``position`` is given).
        position: the position rule; default ``"all"`` at the SAE's hook.
    """
    if site is None:
        where = _hook_site(sae).at("all" if position is None else position)
    else:
        where = Site.parse(site, position=position)
    found = SaeFeature(sae, feature, where.name)
    label = f"SAE feature {feature} decoder row"
    info = {"source": "sae-lens", "feature": feature, "hook": where.hook_name}
    return imported("sae_lens", [(label, where, found.direction.clone())], model, scale, info)
