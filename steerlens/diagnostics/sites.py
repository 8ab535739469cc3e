"""Where to steer: rank sites by the Fisher-optimal cost of moving a concept there.

At a site with concept gradient g and (off-target) pullback metric G, a change δ that moves the
concept by Δc costs at least ½Δc²/(gᵀG⁺g) nats of off-target KL to second order, whatever its
direction (the bound is met by δ ∝ G⁺g, FishBack's step). So

    cost(site) = ½ / (gᵀ(G + λI)⁻¹g)        (KL per squared unit of concept change)

is the least a method can pay there; λ = ``damping``·tr(G)/d as everywhere in steerlens. Sites
are ranked by this cost averaged over contexts (each context with its own pair concept and its
off-target metric, from one recursive sweep per context and one backward for g at every site).

>>> from steerlens.testing import tiny_model
>>> from steerlens.concepts import PairConcept
>>> model = tiny_model("llama")
>>> table = site_costs(model, [(torch.tensor([3, 1, 4, 1, 5]), PairConcept(7, 9))])
>>> list(table.columns)[:4], int(table["rank"].min())
(['site', 'kind', 'layer', 'kl_per_unit'], 1)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch import Tensor

from steerlens.concepts import PairConcept
from steerlens.errors import InputError, NonFiniteError
from steerlens.hooks import record
from steerlens.metric.outcomes import DEFAULT_DROPPED_MASS
from steerlens.metric.pullback import pullback_sweep
from steerlens.sites import Site, all_sites, as_site

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer

#: site kinds ranked by default: the residual stream and the block outputs
WHERE_KINDS: tuple[str, ...] = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


def concept_gradients(
    model: HookedTransformer, tokens: Tensor, concept: PairConcept, sites: Sequence[Site]
) -> dict[str, Tensor]:
    """∂c/∂(activation at the last position) at every site, from one backward pass (a per-head
    site's gradient is read off its whole hook activation: a head's slice is a view that the
    forward pass never uses, so autograd has no gradient for it)."""
    whole = {s.name: Site(s.kind, s.layer) for s in sites}
    with torch.enable_grad(), record(model, set(whole.values()), detach=False) as acts:
        logits = model(tokens.view(1, -1))[0, -1]
        value = concept.value(None, logits)
        keys = sorted({w.name for w in whole.values()})
        found = torch.autograd.grad(value, [acts[k] for k in keys], allow_unused=True)
        grads = dict(zip(keys, found, strict=True))
    out = {}
    for s in sites:
        grad = grads[whole[s.name].name]
        if grad is None:
            raise InputError(f"the concept does not depend on {s.name}")
        last = grad[0, -1] if s.head is None else grad[0, -1, s.head]
        out[s.name] = last.reshape(-1).detach()
    return out


def site_costs(
    model: HookedTransformer,
    contexts: Sequence[tuple[Tensor, PairConcept]],
    sites: Sequence[str | Site] | None = None,
    *,
    damping: float = 1e-2,
    vocab: str = "auto",
    dropped_mass: float = DEFAULT_DROPPED_MASS,
) -> pd.DataFrame:
    """The table of the module docstring: one row per site (default: every layer's
    :data:`WHERE_KINDS`), with ``kl_per_unit`` (mean over contexts), its spread, and ``rank``
    (1 = cheapest). ``vocab``, ``dropped_mass``: as :func:`~steerlens.pullback_metric`."""
    if not contexts:
        raise InputError("site_costs needs at least one (tokens, concept) context")
    parsed = all_sites(model, WHERE_KINDS) if sites is None else [as_site(s, model) for s in sites]
    if not parsed:
        raise InputError(f"no sites given; kinds ranked by default: {', '.join(WHERE_KINDS)}")
    for s in parsed:
        if s.position != "last" or s.head is not None:
            raise InputError(f"where ranks whole sites at the last position, got {s.name}")
    rows: list[dict[str, Any]] = []
    for index, (tokens, concept) in enumerate(contexts):
        if not isinstance(concept, PairConcept):
            raise InputError(f"context {index}: the concept must be a PairConcept")
        grads = concept_gradients(model, tokens, concept, parsed)
        sweep = pullback_sweep(
            model,
            tokens,
            parsed,
            vocab=vocab,
            dropped_mass=dropped_mass,
            off_target=concept.off_target(),
            decompose=False,
        )
        for s in parsed:
            g = grads[s.name].double()
            metric = sweep[s]
            best = float(g @ metric.solve(g, damping).double())
            if not best > 0:
                raise NonFiniteError(f"gᵀG⁺g = {best:.3g} at {s.name}: the concept cannot move")
            rows.append(
                {
                    "site": s.name,
                    "kind": s.kind,
                    "layer": s.layer,
                    "context": index,
                    "kl_per_unit": 0.5 / best,
                    "grad_norm": float(g.norm()),
                }
            )
    frame: Any = pd.DataFrame(rows)
    table = frame.groupby(["site", "kind", "layer"], as_index=False, sort=False).agg(
        kl_per_unit=("kl_per_unit", "mean"),
        kl_per_unit_min=("kl_per_unit", "min"),
        kl_per_unit_max=("kl_per_unit", "max"),
        grad_norm=("grad_norm", "mean"),
        contexts=("context", "nunique"),
    )
    table["rank"] = table["kl_per_unit"].rank(method="min").astype(int)
    return table.sort_values("rank", kind="stable").reset_index(drop=True)
