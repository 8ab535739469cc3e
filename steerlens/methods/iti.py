"""Inference-time intervention (Li et al.): shift the top-K attention heads along their probe
directions at the prediction position.

For every head h of the given layers, a logistic probe separates the head's output ``hook_z``
(before W_O) at the last token of the plus prompts from the minus prompts; heads are ranked by the
probe's held-out accuracy and the top ``k`` steered. Each steered head moves by α·σ·θ, θ the unit
mass-mean difference (``direction="mass_mean"``, the paper's best) or the unit probe weight
(``"probe"``), σ the standard deviation of all the head's activations projected on θ. The shift is
added at the last position of every forward pass (``@last``), so at every generation step, as the
paper applies it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch import Tensor

from steerlens.activations import harvest
from steerlens.concepts.pairs import ContrastPairs
from steerlens.concepts.probes import fit_probe
from steerlens.errors import InputError
from steerlens.methods.intervention import Intervention
from steerlens.methods.registry import FitInputs, MethodSpec, register_method
from steerlens.methods.vector import _pair_tokens
from steerlens.sites import Site, as_site

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer


def iti_intervention(
    model: HookedTransformer,
    pairs: ContrastPairs,
    *,
    layers: list[int] | None = None,
    k: int = 48,
    alpha: float = 15.0,
    direction: str = "mass_mean",
    test_fraction: float = 0.3,
    seed: int = 0,
) -> Intervention:
    """ITI on ``pairs`` (see the module docstring). ``info["heads"]`` ranks every probed head
    (layer, head, held-out accuracy, σ); the intervention steers the top ``k``."""
    if direction not in ("mass_mean", "probe"):
        raise InputError(f"direction must be 'mass_mean' or 'probe', got {direction!r}")
    if k < 1:
        raise InputError(f"k must be >= 1, got {k}")
    layer_list = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    if not layer_list:
        raise InputError("ITI needs at least one layer")
    plus, minus = _pair_tokens(model, pairs)
    n_heads, d_head = model.cfg.n_heads, model.cfg.d_head
    rows: list[dict[str, Any]] = []
    shifts: dict[str, Tensor] = {}
    for layer in layer_list:
        site = as_site(Site("z", layer), model)
        z_plus = harvest(model, plus, site).view(len(plus), n_heads, d_head)
        z_minus = harvest(model, minus, site).view(len(minus), n_heads, d_head)
        for head in range(n_heads):
            acts = torch.cat([z_plus[:, head], z_minus[:, head]])
            labels = [1] * len(plus) + [0] * len(minus)
            probe = fit_probe(
                acts,
                labels,
                site=f"{site.hook_name}:{head}",
                test_fraction=test_fraction,
                seed=seed,
            )
            if direction == "mass_mean":
                theta = z_plus[:, head].mean(0) - z_minus[:, head].mean(0)
            else:
                theta = probe.weight.to(acts.dtype)
            norm = float(theta.norm())
            if norm == 0:
                continue
            theta = theta / norm
            sigma = float((acts @ theta).std())
            rows.append(
                {"layer": layer, "head": head, "accuracy": probe.test_accuracy, "sigma": sigma}
            )
            shifts[f"{site.hook_name}:{head}"] = sigma * theta
    if not rows:
        raise InputError("no head separates the pairs: every direction is zero")
    ranking = pd.DataFrame(rows).sort_values("accuracy", ascending=False, kind="stable")
    top = ranking.head(k)
    names = [f"blocks.{r['layer']}.attn.hook_z:{r['head']}" for r in top.to_dict("records")]
    vectors = {name: shifts[name] for name in names}
    info = {
        "pairs": pairs.name,
        "k": int(len(top)),
        "direction": direction,
        "heads": ranking.to_dict("records"),
    }
    return Intervention("iti", vectors, alpha, info)


@dataclass(frozen=True)
class ItiConfig:
    """``layer``: one layer, a list, or None (every layer) whose heads are probed; ``k`` heads
    shifted by ``alpha``·σ·θ; ``direction``: ``"mass_mean"`` or ``"probe"``."""

    layer: int | list[int] | None = None
    k: int = 48
    alpha: float = 15.0
    direction: str = "mass_mean"
    test_fraction: float = 0.3
    seed: int = 0


def _fit_iti(model: HookedTransformer, cfg: ItiConfig, inputs: FitInputs) -> Intervention:
    layers = [cfg.layer] if isinstance(cfg.layer, int) else cfg.layer
    return iti_intervention(
        model,
        inputs.pairs,
        layers=layers,
        k=cfg.k,
        alpha=cfg.alpha,
        direction=cfg.direction,
        test_fraction=cfg.test_fraction,
        seed=cfg.seed,
    )


register_method(
    MethodSpec(
        "iti",
        ItiConfig,
        _fit_iti,
        needs=("pairs",),
        input_types={"pairs": ContrastPairs},
        implicit_metric="per-head Euclidean",
        description="top-K heads by probe accuracy shifted by α·σ·θ at hook_z, every generation "
        "step",
    )
)
