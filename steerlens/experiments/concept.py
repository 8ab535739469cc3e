"""A user's concept on a user's contexts: evaluate methods × layers at matched concept
probability, and diagnose their directions with ρ — what ``steerlens evaluate`` and
``steerlens diagnose`` run.

The fixed-direction methods (CAA, ActAdd, probe) learn from contrast pairs built from
``train_contexts`` (context + target form vs context + base form); when none are given they learn
from the evaluation contexts themselves (in-sample; the output says so).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from steerlens.concepts import ContrastPairs, PairMapping
from steerlens.datasets import VerbContext, verb_contrast_pairs
from steerlens.diagnostics import kantorovich_bound
from steerlens.errors import InputError
from steerlens.experiments.inputs import user_contexts
from steerlens.experiments.matched import (
    FIXED,
    IMPLICIT_METRIC,
    MatchedSettings,
    clean_point,
    context_records,
    context_tokens,
    fit_fixed,
)
from steerlens.methods.intervention import Intervention
from steerlens.sites import Site

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer


@dataclass(frozen=True)
class _Inputs:
    """Checked layers, evaluation contexts, and the contrastive fit (pairs, training contexts,
    whether they are the evaluation contexts themselves)."""

    test: list[VerbContext]
    train: list[VerbContext]
    pairs: ContrastPairs | None
    in_sample: bool

    def fixed(
        self, model: HookedTransformer, settings: MatchedSettings, layer: int
    ) -> dict[str, Intervention]:
        if self.pairs is None:
            return {}
        return fit_fixed(model, settings.methods, self.pairs, layer, self.train, seed=settings.seed)


def _inputs(
    model: HookedTransformer,
    mapping: PairMapping,
    contexts: Sequence[str],
    layers: Sequence[int],
    settings: MatchedSettings,
    train_contexts: Sequence[str] | None,
) -> _Inputs:
    if not layers:
        raise InputError("no layers given")
    for layer in layers:
        Site("resid_post", layer).validate(model)
    test = user_contexts(model, mapping, contexts)
    if not any(m in FIXED for m in settings.methods):
        return _Inputs(test, [], None, False)
    in_sample = not train_contexts
    train = test if in_sample else user_contexts(model, mapping, train_contexts or [])
    return _Inputs(test, train, verb_contrast_pairs(train, name=mapping.name), in_sample)


def evaluate_concept(
    model: HookedTransformer,
    mapping: PairMapping,
    contexts: Sequence[str],
    layers: Sequence[int],
    settings: MatchedSettings | None = None,
    *,
    train_contexts: Sequence[str] | None = None,
    progress: bool = True,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """One record per (context, method, layer, target probability) — reached or not — with the
    measures of :mod:`steerlens.evaluation`, ρ and the implicit metric; and an info dict (the
    settings, whether the contrastive methods were fitted in-sample)."""
    settings = settings or MatchedSettings()
    inputs = _inputs(model, mapping, contexts, layers, settings, train_contexts)
    merge = mapping.as_dict()
    records: list[dict[str, Any]] = []
    bar = tqdm(total=len(layers) * len(inputs.test), desc="evaluate", disable=not progress)
    for layer in layers:
        fixed = inputs.fixed(model, settings, layer)
        for ctx in inputs.test:
            common = {"concept": mapping.name, "context_index": ctx.sentence}
            records += context_records(model, ctx, layer, settings, fixed, merge, common)
            bar.update()
    bar.close()
    info = {
        "concept": mapping.name,
        "pairs": len(mapping),
        "contexts": len(inputs.test),
        "layers": list(layers),
        "methods": list(settings.methods),
        "targets": list(settings.targets),
        "fixed_methods_fitted_in_sample": inputs.in_sample,
    }
    return pd.DataFrame(records), info


def diagnose_concept(
    model: HookedTransformer,
    mapping: PairMapping,
    contexts: Sequence[str],
    layers: Sequence[int],
    settings: MatchedSettings | None = None,
    *,
    train_contexts: Sequence[str] | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """ρ of each method's direction at each context's clean point, per layer, in the damped
    off-target metric, with the method's implicit metric and (for methods whose implicit metric
    is a matrix here: Euclidean, depth-0) the Kantorovich bound. ActAdd edits the prompt's first
    positions, not the site, so it has no ρ here."""
    settings = settings or MatchedSettings()
    inputs = _inputs(model, mapping, contexts, layers, settings, train_contexts)
    lam = settings.damping
    rows = []
    for layer in layers:
        fixed = inputs.fixed(model, settings, layer)
        site = Site("resid_post", layer)
        for ctx in inputs.test:
            point = clean_point(model, site, context_tokens(model, ctx), ctx)
            depth0 = point.depth0
            d0 = depth0.matrix().double()
            d0 = d0 + depth0.damping_value(lam) * torch.eye(
                d0.shape[0], dtype=d0.dtype, device=d0.device
            )
            directions = {
                "fishback": point.fishback(lam),
                "euclidean": point.g,
                "depth0": depth0.solve(point.g, lam),
                **{k: iv.vector() for k, iv in fixed.items() if k != "actadd"},
            }
            bounds = {
                "fishback": 1.0,
                "euclidean": kantorovich_bound(point.off_target, None, lam),
                "depth0": kantorovich_bound(point.off_target, d0, lam),
            }
            for method in settings.methods:
                rows.append(
                    {
                        "layer": layer,
                        "context_index": ctx.sentence,
                        "context": ctx.text,
                        "method": method,
                        "implicit_metric": IMPLICIT_METRIC[method],
                        "rho": point.rho(directions.get(method), lam),
                        "kantorovich_bound": bounds.get(method, math.nan),
                    }
                )
    info = {
        "concept": mapping.name,
        "contexts": len(inputs.test),
        "damping": lam,
        "fixed_methods_fitted_in_sample": inputs.in_sample,
    }
    return pd.DataFrame(rows), info


def rho_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Median ρ and bound per (method, layer) over contexts."""
    grouped: Any = frame.groupby(["method", "layer"], sort=True)
    out = grouped.agg(
        implicit_metric=("implicit_metric", "first"),
        rho_median=("rho", "median"),
        rho_min=("rho", "min"),
        rho_max=("rho", "max"),
        kantorovich_bound_median=("kantorovich_bound", "median"),
    )
    return out.reset_index()
