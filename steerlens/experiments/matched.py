"""One context, one layer, every method at matched concept probability: the shared core of
``steerlens reproduce`` and ``steerlens evaluate``.

A context is a :class:`~steerlens.concepts.VerbContext`: a prompt whose next token should move
from a base form b to a target form t. The concept is the pair share p_t/(p_t + p_b)
(:class:`~steerlens.concepts.PairConcept`). Iterative methods (FishBack, Euclidean gradient
ascent, depth-0 Fisher) steer the residual at the prediction position until the share reaches
the highest target, keeping checkpoints for the lower ones; fixed-direction methods (CAA, ActAdd,
probe) are scaled by bisection to each target. Every (method, target) is one record, reached or
not, with the measures of :mod:`steerlens.evaluation` and what predicts its KL ratio to
FishBack: ``rho``, ρ of the method's direction at the clean point
(:mod:`steerlens.diagnostics.cost`); ``rho_path``, ρ of the method's direction at each point of
FishBack's own path, integrated over the concept change
(:class:`~steerlens.diagnostics.cost.PathRho`; Euclidean, depth-0, probe and SAE, whose edits sit
at the site); ``path_length``, the off-target Fisher length of the method's own path to its
matched edit (:func:`~steerlens.diagnostics.path.path_length`), whose squared ratio to
FishBack's is ρ along the method's own path (``rho_own``, every method); and
``kl_quadratic`` = ½δᵀG_offδ of the method's actual matched edit δ in the clean-point metric
(its ratio to FishBack's).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from steerlens.datasets import VerbContext
from steerlens.diagnostics import kantorovich_bound, path_length, spectral_cost_ratio
from steerlens.diagnostics.path import local_vector
from steerlens.errors import InputError
from steerlens.evaluation import (
    continuation_perplexity,
    generation_measures_many,
    next_logprobs,
    outcome_measures,
    strength_search,
)
from steerlens.evaluation.strength import StrengthMatch
from steerlens.experiments.baselines import FIXED, fit_fixed, has_shipped_sae, matching_sae_feature
from steerlens.experiments.verb_context import context_tokens, pair_concept, pair_share
from steerlens.methods.intervention import Intervention
from steerlens.methods.iterative import Compared, steer_iteratively
from steerlens.methods.registry import method_config, method_spec
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
    "UnitRecords",
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


@dataclass(frozen=True)
class Variant:
    """A method as the matched protocol runs it: the registered method it is (``method``,
    a :func:`~steerlens.methods.registry.method_spec` name) and, where the protocol's set-up
    narrows that entry's implicit metric (DESIGN.md §4), the narrower one."""

    method: str
    implicit_metric: str | None = None

    @property
    def metric(self) -> str:
        return self.implicit_metric or method_spec(self.method).implicit_metric


#: every method name a matched record can carry, and the registered method behind it
VARIANTS: dict[str, Variant] = {
    "fishback": Variant("fishback"),
    "euclidean": Variant("euclidean"),
    "depth0": Variant("truncated_fisher", "depth-0 Fisher (softmax at the site)"),
    "fishback_merge": Variant("fishback", "full pullback Fisher (pair merge)"),
    "fishback_plain": Variant("fishback", "full pullback Fisher (whole output)"),
    "caa": Variant("caa", "within-class covariance (tied over positions)"),
    "caa_last": Variant("caa", "within-class covariance (at the prediction position)"),
    "fishback_transfer": Variant(
        "fishback", "expected pullback Fisher over training contexts (off-target)"
    ),
    "actadd": Variant("actadd", "Euclidean on one pair (first positions)"),
    "probe": Variant("probe"),
    "sae": Variant("sae", "the SAE's dictionary (one decoder row)"),
}
ITERATIVE = ("fishback", "euclidean", "depth0")
#: FishBack descending other geometries (the optimize × evaluate grid): the pair-merge
#: distribution's metric, and the whole output's
FISHBACK_VARIANTS = ("fishback_merge", "fishback_plain")
METHOD_NAMES = ITERATIVE + FISHBACK_VARIANTS + FIXED
#: what runs unless methods are chosen: "sae" needs a shipped SAE at the layer
DEFAULT_METHODS = ITERATIVE + ("caa", "actadd", "probe")
#: each method's implicit metric, named beside its ρ
IMPLICIT_METRIC = {name: v.metric for name, v in VARIANTS.items()}


@dataclass(frozen=True)
class MatchedSettings:
    """``step``: the concept rise per iterative step (nats); ``damping``: FishBack's and ρ's
    relative ridge; ``fluency_tokens``: tokens generated per record for the perplexity measure
    (0: skip it); ``generation_tokens`` / ``samples``: the greedy and sampled continuations of
    :func:`~steerlens.evaluation.generation_measures` per record (0 tokens: skip them)."""

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
    """At the clean residual of one context: the concept gradient g, the off-target metric,
    the depth-0 metric and the residual's norm."""

    g: Tensor
    off_target: Metric
    depth0: Metric
    residual_norm: float = math.nan

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

    def kantorovich(self, method: str, damping: float) -> float:
        """The Kantorovich bound (κ+1)²/(4κ) on the off-target cost ratio of a method whose
        implicit metric is known at this point (``euclidean``: I; ``depth0``: the damped depth-0
        metric), a trivial predictor of its KL ratio; NaN for the others."""
        if method == "euclidean":
            return kantorovich_bound(self.off_target, None, damping)
        if method == "depth0":
            m = self.depth0.matrix().double()
            lam = self.depth0.damping_value(damping)
            implicit = m + lam * torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
            return kantorovich_bound(self.off_target, implicit, damping)
        return math.nan

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
        residual_norm = float(path.x0.double().norm())
    return CleanPoint(g, off, depth0, residual_norm)


class UnitRecords:
    """What every record of one (context, layer) shares, and how one record is written: the
    clean point, the methods' directions there (for ρ), and the context's columns.
    ``path_rho[target][name]``: ρ of ``name``'s direction integrated along FishBack's path to
    ``target`` (filled from FishBack's runs; a record without it gets NaN)."""

    def __init__(
        self,
        model: HookedTransformer,
        ctx: VerbContext,
        layer: int,
        settings: MatchedSettings,
        fixed: dict[str, Intervention],
        merge: dict[int, int],
        common: dict[str, Any] | None = None,
    ) -> None:
        self.model, self.ctx, self.settings, self.merge = model, ctx, settings, merge
        self.site = Site("resid_post", layer)
        self.tokens = context_tokens(model, ctx)
        self.clean = next_logprobs(model, self.tokens)
        self.point = point = clean_point(model, self.site, self.tokens, ctx)
        self.off = pair_concept(ctx).off_target()
        self.base = {
            **(common or {}),
            "layer": layer,
            "context": ctx.text,
            "verb": ctx.verb,
            "target_word": ctx.target_word,
            "clean_probability": float(pair_share(self.clean, ctx)),
        }
        self.grad_norm = float(point.g.norm())
        best = float(point.g.double() @ point.fishback(settings.damping).double())
        self.kl_per_unit = 0.5 / best if best > 0 else math.nan  # `steerlens where`'s site cost
        self.directions: dict[str, Tensor | None] = {
            "fishback": point.fishback(settings.damping),
            "fishback_merge": None,  # ρ is priced in the complement metric: see the KLs
            "fishback_plain": None,
            "euclidean": point.g,
            "depth0": point.depth0.solve(point.g, settings.damping),
            "actadd": None,  # added at the prompt's first positions, not at the site
            **{
                name: fixed[name].vector() if name in fixed else None
                for name in ("caa", "caa_last", "fishback_transfer", "probe", "sae")
            },
        }
        self.path_rho: dict[float, dict[str, float]] = {}
        #: records written but still without their generation measures (:meth:`generate`)
        self.pending: list[tuple[dict[str, Any], Intervention]] = []

    def record(
        self,
        name: str,
        target: float,
        iv: Intervention,
        extra: dict[str, Any],
        path: Tensor | None = None,
    ) -> dict[str, Any]:
        model, ctx, settings, point = self.model, self.ctx, self.settings, self.point
        steered = next_logprobs(model, self.tokens, iv)
        out = {
            **self.base,
            "method": name,
            "target_probability": target,
            **extra,
            **outcome_measures(
                self.clean, steered, ctx.target_id, self.merge, base=ctx.base_id
            ).row(),
            "rho": point.rho(self.directions[name], settings.damping),
            "rho_path": (
                1.0 if name == "fishback" else self.path_rho.get(target, {}).get(name, math.nan)
            ),
            "path_length": (
                path_length(model, self.tokens, iv, self.off, path=path)
                if extra["reached"]
                else math.nan
            ),
            "kl_quadratic": point.quadratic_kl(iv, self.site),
            "grad_norm": self.grad_norm,
            "kl_per_unit": self.kl_per_unit,
            "edit_norm": edit_norm(iv),
            "kantorovich": point.kantorovich(name, settings.damping),
            "implicit_metric": IMPLICIT_METRIC[name],
        }
        if settings.fluency_tokens:
            out["perplexity"] = continuation_perplexity(
                model, self.tokens, iv, settings.fluency_tokens
            )
        if settings.generation_tokens:
            self.pending.append((out, iv))
        return out

    def generate(self) -> None:
        """Append the generation measures to every record written since the last call, all
        of them generated together (:func:`~steerlens.evaluation.generation_measures_many`:
        the same continuations as one at a time, a batch reading the weights once); a record
        is complete only after this."""
        if not self.pending:
            return
        settings = self.settings
        found = generation_measures_many(
            self.model,
            self.tokens,
            [iv for _, iv in self.pending],
            self.ctx.target_id,
            n_tokens=settings.generation_tokens,
            samples=settings.samples,
            seed=settings.seed,
        )
        for (out, _), measures in zip(self.pending, found, strict=True):
            out |= measures.row()
        self.pending = []

    def search(
        self, iv: Intervention, extend_to: float | None = None
    ) -> dict[float, StrengthMatch]:
        """Every target's :func:`~steerlens.evaluation.strength_search` match of the fixed
        direction ``iv`` on this context (the grid extended up to the scale ``extend_to``)."""
        with shares_of(self.model, self.tokens, self.ctx, iv) as (one, many):
            return strength_search(one, self.settings.targets, many=many, extend_to=extend_to)

    def fixed_record(self, name: str, iv: Intervention, m: StrengthMatch) -> dict[str, Any]:
        """The record of the fixed direction ``iv`` scaled to its match ``m``."""
        extra = {
            "reached": m.reached,
            "strength": m.scale,
            "steps": math.nan,
            "reason": m.reason,
            "peak_share": m.peak_share,
        }
        return self.record(name, m.target, iv.scaled(m.scale), extra)


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
    unit = UnitRecords(model, ctx, layer, settings, fixed, merge, common)
    compare = along_directions(settings, ctx, fixed)
    runs = iterative_runs(model, settings, ctx, unit.tokens, unit.site, compare, merge)
    unit.path_rho = {e.target: e.path_rho for e in runs if e.method == "fishback"}
    records = [unit.record(e.method, e.target, e.intervention, e.fields(), e.path) for e in runs]
    for name, iv in fixed.items():
        found = unit.search(iv)
        records += [unit.fixed_record(name, iv, found[target]) for target in settings.targets]
    unit.generate()
    return records


def edit_norm(iv: Intervention) -> float:
    """The Euclidean size of what ``iv`` adds: the norm of its scaled vectors together (a vector
    added at every position counted once); NaN for an intervention that scales, clamps or
    updates weights."""
    if iv.multipliers or iv.clamps or iv.weight_updates:
        return math.nan
    return math.sqrt(sum(float((iv.scale * v).double().pow(2).sum()) for v in iv.vectors.values()))


def share_at(
    model: HookedTransformer, tokens: Tensor, ctx: VerbContext, iv: Intervention
) -> Callable[[float], float]:
    def prob(scale: float) -> float:
        return float(pair_share(next_logprobs(model, tokens, iv.scaled(scale)), ctx))

    return prob


@contextmanager
def shares_of(
    model: HookedTransformer, tokens: Tensor, ctx: VerbContext, iv: Intervention
) -> Iterator[tuple[Callable[[float], float], Callable[[Sequence[float]], list[float]] | None]]:
    """The pair share of ``iv.scaled(s)`` as a function of s and, where ``iv`` is one
    ``@last`` residual vector (:func:`local_vector`), the shares at many scales in one batched
    call through the blocks after its site (the scalar one through them too); otherwise the
    scalar one is :func:`share_at` (a forward of the whole prompt) and the batched one None."""
    found = local_vector(iv, model)
    if found is None:
        yield share_at(model, tokens, ctx, iv), None
        return
    site, vector = found
    with LocalPath(model, tokens, site) as path, torch.no_grad():
        v = vector.to(path.x0)  # iv.scaled(s) applies s · vector

        def share(x: Tensor) -> Tensor:
            return pair_share(torch.log_softmax(path.logits(x).double(), -1), ctx)

        def one(scale: float) -> float:
            return float(share(path.x0 + scale * v))

        def many(scales: Sequence[float]) -> list[float]:
            t = torch.tensor(list(scales), dtype=v.dtype, device=v.device)
            return path.batched(share, path.x0 + t[:, None] * v).tolist()

        yield one, many


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


@dataclass(frozen=True)
class MatchedEdit:
    """One iterative method's edit at one target of the matched protocol: the intervention,
    the path of δ that led to it (from 0, for its Fisher length), and ρ of the compared
    directions integrated along that path (FishBack's runs only)."""

    method: str
    target: float
    intervention: Intervention
    path: Tensor
    reached: bool
    steps: int
    path_rho: dict[str, float] = field(default_factory=dict)

    def fields(self) -> dict[str, Any]:
        """The record's columns this edit fills."""
        return {
            "reached": self.reached,
            "strength": float(self.intervention.vector().norm()),
            "steps": self.steps,
            "reason": "reached" if self.reached else "steps ran out",
            "peak_share": math.nan,
        }


def iterative_runs(
    model: HookedTransformer,
    settings: MatchedSettings,
    ctx: VerbContext,
    tokens: Tensor,
    site: Site,
    compare: dict[str, Compared] | None = None,
    merge: dict[int, int] | None = None,
) -> list[MatchedEdit]:
    """One run per iterative method to the highest target; lower targets from checkpoints.
    ``compare``: directions whose ρ is integrated along FishBack's path (per target).
    ``merge``: the base → target pairs whose merged distribution ``fishback_merge`` descends
    (default: this context's pair)."""
    concept = pair_concept(ctx)
    top = max(settings.targets)
    shared = {"site": site.name, "target_probability": top, "step": settings.step}
    damped = {**shared, "damping": settings.damping}
    configs = {
        "fishback": method_config("fishback", **damped),
        "euclidean": method_config("euclidean", **shared),
        "depth0": method_config("truncated_fisher", **damped, depth=0),
        "fishback_merge": method_config(
            "fishback",
            **damped,
            off_target=OffTarget.pair_merge(merge or {ctx.base_id: ctx.target_id}),
        ),
        "fishback_plain": method_config("fishback", **damped, off_target=False),
    }
    out = []
    checkpoints = [math.log(t) for t in settings.targets if t < top]
    for name, cfg in configs.items():
        if name not in settings.methods:
            continue
        along = compare if name == "fishback" else None
        run = steer_iteratively(model, cfg, concept, tokens, checkpoints=checkpoints, compare=along)
        for target in settings.targets:
            if target == top:
                vec, reached, path_rho = run.delta, run.reached, dict(run.path_rho)
            else:
                mark = run.checkpoint(math.log(target))
                reached = mark is not None
                vec = run.delta if mark is None else mark.delta
                path_rho = {} if mark is None else dict(mark.path_rho)
            made = Intervention(name, {site.name: vec})
            path = run.path if target == top else run.path_to(math.log(target))
            out.append(MatchedEdit(name, target, made, path, reached, run.steps, path_rho))
    return out


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
