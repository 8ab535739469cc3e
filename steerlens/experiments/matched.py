"""One context, one layer, every method at matched concept probability: the shared core of
``steerlens reproduce`` and ``steerlens evaluate``.

A context is a :class:`~steerlens.concepts.VerbContext`: a prompt whose next token should move
from a base form b to a target form t. The concept is the pair share p_t/(p_t + p_b)
(:class:`~steerlens.concepts.PairConcept`). Iterative methods (FishBack, Euclidean gradient
ascent, depth-0 Fisher) steer the residual at the prediction position until the share reaches
the highest target, keeping checkpoints for the lower ones; fixed-direction methods (CAA, ActAdd,
probe) are scaled by bisection to each target. Every (method, target) is one record, reached or
not, with the measures of :mod:`steerlens.evaluate` and what predicts its KL ratio to
FishBack: ``rho``, ρ of the method's direction at the clean point (:mod:`steerlens.cost`);
``rho_path``, ρ of the method's direction at each point of FishBack's own path, integrated over
the concept change (:class:`~steerlens.cost.PathRho`; Euclidean, depth-0, probe and
SAE, whose edits sit at the site); ``path_length``, the off-target Fisher length of the
method's own path to its matched edit (:func:`~steerlens.evaluate.path_length`), whose squared
ratio to FishBack's is ρ along the method's own path (``rho_own``, every method); and
``kl_quadratic`` = ½δᵀG_offδ of the method's actual matched edit δ in the clean-point metric
(its ratio to FishBack's).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from steerlens.datasets import VerbContext
from steerlens.diagnostics import path_length, spectral_cost_ratio
from steerlens.errors import InputError
from steerlens.evaluation import (
    continuation_perplexity,
    generation_measures,
    next_logprobs,
    outcome_measures,
    strength_search,
)
from steerlens.experiments.baselines import FIXED, fit_fixed, has_shipped_sae, matching_sae_feature
from steerlens.experiments.verb_context import context_tokens, pair_concept, pair_share
from steerlens.methods.intervention import Intervention
from steerlens.methods.iterative import (
    Compared,
    EuclideanConfig,
    FishBackConfig,
    TruncatedFisherConfig,
    steer_iteratively,
)
from steerlens.metric.core import Metric
from steerlens.metric.local import LocalPath
from steerlens.metric.outcomes import OffTarget
from steerlens.metric.pullback import MetricOptions
from steerlens.sites import Site

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer

__all__ = [
    "DEFAULT_METHODS",
    "FISHBACK_VARIANTS",
    "FIXED",
    "ITERATIVE",
    "METHOD_NAMES",
    "CleanPoint",
    "MatchedSettings",
    "clean_point",
    "context_records",
    "context_tokens",
    "fit_fixed",
    "has_shipped_sae",
    "iterative_runs",
    "matching_sae_feature",
    "pair_concept",
    "pair_share",
    "pick_test",
    "share_at",
]

ITERATIVE = ("fishback", "euclidean", "depth0")
#: FishBack descending other geometries (the optimize × evaluate grid): the pair-merge
#: distribution's metric, and the whole output's
FISHBACK_VARIANTS = ("fishback_merge", "fishback_plain")
METHOD_NAMES = ITERATIVE + FISHBACK_VARIANTS + FIXED
#: what runs unless methods are chosen: "sae" needs a shipped SAE at the layer
DEFAULT_METHODS = ITERATIVE + ("caa", "actadd", "probe")

#: each method's implicit metric (DESIGN.md §4), named beside its ρ
IMPLICIT_METRIC = {
    "fishback": "full pullback Fisher (off-target)",
    "fishback_merge": "full pullback Fisher (pair merge)",
    "fishback_plain": "full pullback Fisher (whole output)",
    "euclidean": "I",
    "depth0": "depth-0 Fisher (softmax at the site)",
    "caa": "within-class covariance (tied over positions)",
    "caa_last": "within-class covariance (at the prediction position)",
    "fishback_transfer": "expected pullback Fisher over training contexts (off-target)",
    "actadd": "Euclidean on one pair (first positions)",
    "probe": "I on the probe",
    "sae": "the SAE's dictionary (one decoder row)",
}


@dataclass(frozen=True)
class MatchedSettings:
    """``step``: the concept rise per iterative step (nats); ``damping``: FishBack's and ρ's
    relative ridge; ``fluency_tokens``: tokens generated per record for the perplexity measure
    (0: skip it); ``generation_tokens`` / ``samples``: the greedy and sampled continuations of
    :func:`~steerlens.evaluate.generation_measures` per record (0 tokens: skip them)."""

    targets: tuple[float, ...] = (0.5, 0.9)
    methods: tuple[str, ...] = DEFAULT_METHODS
    step: float = 1.0
    damping: float = 1e-2
    fluency_tokens: int = 0
    seed: int = 0
    generation_tokens: int = 0
    samples: int = 4

    def __post_init__(self) -> None:
        unknown = set(self.methods) - set(METHOD_NAMES)
        if unknown:
            raise InputError(f"unknown methods {sorted(unknown)}; valid: {', '.join(METHOD_NAMES)}")
        if not self.methods:
            raise InputError(f"no methods given; valid: {', '.join(METHOD_NAMES)}")
        if not self.targets or any(not 0 < t < 1 for t in self.targets):
            raise InputError(f"targets must be probabilities in (0, 1), got {self.targets}")
        if self.fluency_tokens < 0:
            raise InputError(f"fluency_tokens must be >= 0, got {self.fluency_tokens}")
        if self.generation_tokens < 0 or self.samples < 1:
            raise InputError(
                f"need generation_tokens >= 0 and samples >= 1, got {self.generation_tokens}, "
                f"{self.samples}"
            )


@dataclass(frozen=True)
class CleanPoint:
    """At the clean residual of one context: the concept gradient g, the off-target metric and
    the depth-0 metric."""

    g: Tensor
    off_target: Metric
    depth0: Metric

    def fishback(self, damping: float) -> Tensor:
        return self.off_target.solve(self.g, damping)

    def quadratic_kl(self, iv: Intervention, site: Site) -> float:
        """½δᵀG_offδ for an intervention that edits only ``site`` at the prediction position
        (the second-order KL of its actual matched edit); NaN for edits elsewhere (CAA at every
        position, ActAdd at the first positions)."""
        if iv.sites != (site.name,):
            return math.nan
        delta = iv.vector(site.name).to(self.g)
        return 0.5 * float(self.off_target.quad(delta))

    def rho(self, v: Tensor | None, damping: float) -> float:
        """ρ of ``v`` in the off-target metric (NaN if v is missing or lowers the concept)."""
        if v is None or float(v.to(self.g) @ self.g) <= 0:
            return math.nan
        return spectral_cost_ratio(self.off_target, v.to(self.g), self.g, damping)


def clean_point(
    model: HookedTransformer, site: Site, tokens: Tensor, ctx: VerbContext
) -> CleanPoint:
    concept = pair_concept(ctx)
    with LocalPath(model, tokens, site) as path:
        with torch.enable_grad():
            x = path.x0.clone().requires_grad_(True)
            g = torch.autograd.grad(concept.value(x, path.logits(x)), x)[0].detach()
        off = path.metric(path.x0, MetricOptions(off_target=concept.off_target()))
        depth0 = path.metric(path.x0, MetricOptions(), depth=0)
    return CleanPoint(g, off, depth0)


def context_records(
    model: HookedTransformer,
    ctx: VerbContext,
    layer: int,
    settings: MatchedSettings,
    fixed: dict[str, Intervention],
    merge: dict[int, int],
    common: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Every method of ``settings`` on one context at ``resid_post.layer``, one record per
    (method, target); ``common`` fields are copied into each record."""
    site = Site("resid_post", layer)
    tokens = context_tokens(model, ctx)
    clean = next_logprobs(model, tokens)
    point = clean_point(model, site, tokens, ctx)
    base = {
        **(common or {}),
        "layer": layer,
        "context": ctx.text,
        "verb": ctx.verb,
        "target_word": ctx.target_word,
        "clean_probability": float(pair_share(clean, ctx)),
    }
    directions: dict[str, Tensor | None] = {
        "fishback": point.fishback(settings.damping),
        "fishback_merge": None,  # ρ is priced in the complement metric: see the record's KLs
        "fishback_plain": None,
        "euclidean": point.g,
        "depth0": point.depth0.solve(point.g, settings.damping),
        "caa": fixed["caa"].vector() if "caa" in fixed else None,
        "caa_last": fixed["caa_last"].vector() if "caa_last" in fixed else None,
        "fishback_transfer": (
            fixed["fishback_transfer"].vector() if "fishback_transfer" in fixed else None
        ),
        "actadd": None,  # added at the prompt's first positions, not at the site
        "probe": fixed["probe"].vector() if "probe" in fixed else None,
        "sae": fixed["sae"].vector() if "sae" in fixed else None,
    }

    def record(name: str, target: float, iv: Intervention, extra: dict[str, Any]) -> dict:
        steered = next_logprobs(model, tokens, iv)
        out = {
            **base,
            "method": name,
            "target_probability": target,
            **extra,
            **outcome_measures(clean, steered, ctx.target_id, merge, base=ctx.base_id),
            "rho": point.rho(directions[name], settings.damping),
            "rho_path": 1.0 if name == "fishback" else path_rho.get(target, {}).get(name, math.nan),
            "path_length": path_length(model, tokens, iv, off) if extra["reached"] else math.nan,
            "kl_quadratic": point.quadratic_kl(iv, site),
            "implicit_metric": IMPLICIT_METRIC[name],
        }
        if settings.fluency_tokens:
            out["perplexity"] = continuation_perplexity(model, tokens, iv, settings.fluency_tokens)
        if settings.generation_tokens:
            out |= generation_measures(
                model,
                tokens,
                iv,
                ctx.target_id,
                n_tokens=settings.generation_tokens,
                samples=settings.samples,
                seed=settings.seed,
            )
        return out

    off = pair_concept(ctx).off_target()
    compare = along_directions(settings, ctx, fixed)
    runs = iterative_runs(model, settings, ctx, tokens, site, compare, merge)
    path_rho = {t: extra.pop("path_rho", {}) for name, t, _, extra in runs if name == "fishback"}
    records = []
    for name, target, iv, extra in runs:
        records.append(record(name, target, iv, extra))
    for name, iv in fixed.items():
        found = strength_search(share_at(model, tokens, ctx, iv), settings.targets)
        for target in settings.targets:
            m = found[target]
            extra = {
                "reached": m.reached,
                "strength": m.scale,
                "steps": math.nan,
                "reason": m.reason,
                "peak_share": m.peak_share,
            }
            records.append(record(name, target, iv.scaled(m.scale), extra))
    return records


def share_at(
    model: HookedTransformer, tokens: Tensor, ctx: VerbContext, iv: Intervention
) -> Callable[[float], float]:
    def prob(scale: float) -> float:
        return float(pair_share(next_logprobs(model, tokens, iv.scaled(scale)), ctx))

    return prob


def along_directions(
    settings: MatchedSettings, ctx: VerbContext, fixed: dict[str, Intervention]
) -> dict[str, Compared]:
    """Each other method's direction at a point x of FishBack's path, for ρ integrated along
    it: Euclidean g; depth-0 (G⁽⁰⁾(x) + λI)⁻¹g with G⁽⁰⁾ off-target like its own run; the
    probe's and the SAE feature's fixed vectors. CAA and ActAdd are left out: they edit other
    positions too, which no metric at the prediction position prices."""
    options = MetricOptions(off_target=pair_concept(ctx).off_target(), precision="float32")
    damping = settings.damping

    def depth0(path: LocalPath, x: Tensor, g: Tensor) -> Tensor:
        return path.metric(x, options, depth=0).solve(g, damping)

    out: dict[str, Compared] = {}
    if "euclidean" in settings.methods:
        out["euclidean"] = lambda path, x, g: g
    if "depth0" in settings.methods:
        out["depth0"] = depth0
    for name in ("probe", "sae", "caa_last", "fishback_transfer"):
        if name in fixed:
            vector = fixed[name].vector()
            out[name] = lambda path, x, g, v=vector: v
    return out


def iterative_runs(
    model: HookedTransformer,
    settings: MatchedSettings,
    ctx: VerbContext,
    tokens: Tensor,
    site: Site,
    compare: dict[str, Compared] | None = None,
    merge: dict[int, int] | None = None,
) -> list[tuple[str, float, Intervention, dict[str, Any]]]:
    """One run per iterative method to the highest target; lower targets from checkpoints.
    ``compare``: directions whose ρ is integrated along FishBack's path (its records' extra
    ``path_rho``, per target). ``merge``: the base → target pairs whose merged distribution
    ``fishback_merge`` descends (default: this context's pair). Each intervention's
    ``info["path"]`` is the run's path up to that target."""
    concept = pair_concept(ctx)
    top = max(settings.targets)
    step, damping = settings.step, settings.damping
    configs = {
        "fishback": FishBackConfig(site.name, top, step=step, damping=damping),
        "euclidean": EuclideanConfig(site.name, top, step=step),
        "depth0": TruncatedFisherConfig(site.name, top, step=step, damping=damping),
        "fishback_merge": FishBackConfig(
            site.name,
            top,
            step=step,
            damping=damping,
            off_target=OffTarget.pair_merge(merge or {ctx.base_id: ctx.target_id}),
        ),
        "fishback_plain": FishBackConfig(
            site.name, top, step=step, damping=damping, off_target=False
        ),
    }
    out = []
    checkpoints = [math.log(t) for t in settings.targets if t < top]
    for name, cfg in configs.items():
        if name not in settings.methods:
            continue
        along = compare if name == "fishback" else None
        iv = steer_iteratively(model, cfg, concept, tokens, checkpoints=checkpoints, compare=along)
        points = iv.info["path"]
        for target in settings.targets:
            if target == top:
                vec, reached = iv.vector(), bool(iv.info["reached"])
                path_rho = iv.info.get("path_rho", {})
                path = points
            else:
                mark = iv.info["checkpoints"].get(repr(math.log(target)))
                reached = mark is not None
                vec = iv.vector().new_tensor(mark) if reached else iv.vector()
                path_rho = iv.info.get("checkpoint_path_rho", {}).get(repr(math.log(target)), {})
                path = _path_to(points, iv.info["trajectory"], math.log(target), mark)
            extra = {
                "reached": reached,
                "strength": float(vec.norm()),
                "steps": iv.info["steps"],
                "reason": "reached" if reached else "steps ran out",
                "peak_share": math.nan,
            }
            if along:
                extra["path_rho"] = path_rho
            made = Intervention(name, {site.name: vec}, info={"path": path})
            out.append((name, target, made, extra))
    return out


def _path_to(
    points: list[list[float]], trajectory: list[dict[str, Any]], value: float, mark: Any
) -> list[list[float]]:
    """The points of an iterative run up to the checkpoint ``value``: those before the step
    that first crossed it, then the checkpoint's own δ (the whole path if it was not passed)."""
    if mark is None:
        return points
    crossed = next(i for i, t in enumerate(trajectory) if t["stop_value"] >= value)
    return points[:crossed] + [mark]


def pick_test(
    model: HookedTransformer, contexts: Sequence[VerbContext], n: int, top: float
) -> list[VerbContext]:
    """The n test contexts with the highest base-form probability, among those whose target
    probability is below the lowest target (one context per text)."""
    scored = []
    seen: set[str] = set()
    for ctx in contexts[: 12 * n]:
        if ctx.text in seen:
            continue
        seen.add(ctx.text)
        logp = next_logprobs(model, context_tokens(model, ctx))
        if float(pair_share(logp, ctx)) < top:
            scored.append((float(logp[ctx.base_id]), ctx))
    scored.sort(key=lambda s: -s[0])
    return [c for _, c in scored[:n]]
