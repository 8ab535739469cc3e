"""Iterative steering at one residual site: FishBack, Euclidean gradient ascent, depth-k Fisher
and dual steering, all one loop with a different metric.

At each step, with g = ∇ₓc the concept's gradient at the current residual x (the prediction
position) and M the method's metric there, the update is u = (M + λI)⁻¹g, scaled so that the
concept is predicted to rise by ``step`` (η = step / gᵀu): every method climbs the same ladder of
concept values, so their costs compare at matched concept change. The loop stops when the stop
concept reaches its target; the last step is bisected to land on it. A step that lowers the
concept is halved (up to 6 times).

| method | M |
|---|---|
| ``euclidean`` | I (plain gradient ascent) |
| ``fishback`` | the full pullback Fisher metric at x, of the off-target distribution by default |
| ``truncated_fisher`` | the depth-k metric G^(k) (k = 0: the softmax geometry at the site) |
| ``dual`` | G^(0), solved by conjugate gradient, with a probe as the concept (Park et al.) |

Every metric is recomputed at the current x (natural-gradient steps; FishBack's ``metric_every``
can reuse one for several steps), from the single-position
path of the metric engine (:class:`~steerlens.metric.local.LocalPath`). The result is a
:class:`~steerlens.methods.run.SteeringRun` around an
:class:`~steerlens.methods.intervention.Intervention` holding δ = x − x₀ at ``site`` (``@last``:
applied at the prediction position of every forward pass, generated tokens included).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from steerlens.concepts.base import Concept
from steerlens.diagnostics import PathRho, optimal_quad, spectral_cost_ratio
from steerlens.errors import InputError, MethodError, NonFiniteError
from steerlens.methods.configs import (
    DualConfig,
    EuclideanConfig,
    FishBackConfig,
    IterativeConfig,
    TruncatedFisherConfig,
)
from steerlens.methods.intervention import Intervention
from steerlens.methods.registry import FitInputs, MethodSpec, register_method
from steerlens.methods.run import Checkpoint, SteeringRun, Step
from steerlens.metric.core import Metric
from steerlens.metric.local import LocalPath
from steerlens.metric.outcomes import OffTarget
from steerlens.metric.pullback import MetricOptions
from steerlens.prompts import PromptsLike, as_prompts

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer


#: a method's update direction at a point of the path: (path, x, g) -> (u, the metric it solved
#: with, or None)
Direction = Callable[[LocalPath, Tensor, Tensor], tuple[Tensor, Metric | None]]
#: another method's direction at a point of the path: (path, x, g) -> v
Compared = Callable[[LocalPath, Tensor, Tensor], Tensor]


def conjugate_gradient(
    mv: Callable[[Tensor], Tensor], b: Float[Tensor, " d"], iters: int, tol: float = 1e-10
) -> Float[Tensor, " d"]:
    """Solve A x = b for symmetric positive-definite A given as ``mv(x) = A x``.

    >>> a = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    >>> x = conjugate_gradient(lambda v: a @ v, torch.tensor([1.0, 2.0], dtype=torch.float64), 10)
    >>> torch.allclose(a @ x, torch.tensor([1.0, 2.0], dtype=torch.float64))
    True
    """
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = r @ r
    for _ in range(iters):
        if rs.sqrt() <= tol * b.norm():
            break
        ap = mv(p)
        alpha = rs / (p @ ap)
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = r @ r
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x


def _off_target(concept: Concept, stop: Concept, wanted: bool | OffTarget) -> OffTarget | None:
    """The off-target transform FishBack's metric uses: ``wanted`` itself if it is one, the
    concept's own (or the stop concept's) if True, none (the whole output) if False."""
    if isinstance(wanted, OffTarget):
        return wanted
    if not wanted:
        return None
    for c in (concept, stop):
        off = c.off_target()
        if off is not None:
            return off
    return None


def direction_fn(cfg: IterativeConfig, concept: Concept, stop: Concept) -> Direction:
    """The update direction u(x, g) of ``cfg``'s method."""
    if isinstance(cfg, FishBackConfig):
        off = _off_target(concept, stop, cfg.off_target)
        options = MetricOptions(
            cfg.vocab, cfg.dropped_mass, off, trace_kept=cfg.trace_kept, precision=cfg.precision
        )
        depth = cfg.depth if isinstance(cfg, TruncatedFisherConfig) else None
        every = cfg.metric_every
        held: list[Metric] = []  # the metric in use, recomputed every ``every`` steps
        age = [0]

        def natural(path: LocalPath, x: Tensor, g: Tensor) -> tuple[Tensor, Metric | None]:
            if not held or age[0] >= every:
                held[:] = [path.metric(x, options, depth=depth)]
                age[0] = 0
            age[0] += 1
            return held[0].solve(g, cfg.damping), held[0]

        return natural
    if isinstance(cfg, DualConfig):
        options = MetricOptions(cfg.vocab, cfg.dropped_mass, precision=cfg.precision)

        def dual(path: LocalPath, x: Tensor, g: Tensor) -> tuple[Tensor, Metric | None]:
            metric = path.metric(x, options, depth=0)
            lam = metric.damping_value(cfg.damping)
            u = conjugate_gradient(
                lambda v: metric.mv(v) + lam * v, g.to(metric.dtype), cfg.cg_iters
            )
            return u.to(g.dtype), metric

        return dual
    if isinstance(cfg, EuclideanConfig):
        return lambda path, x, g: (g, None)
    raise MethodError(f"no iterative method for config {type(cfg).__name__}")


def _step(step: int, value: float, stop_value: float, norm: float, metric: Metric | None) -> Step:
    if metric is None or metric.info is None:
        return Step(step, value, stop_value, norm)
    return Step(step, value, stop_value, norm, metric.info.dropped_mass, metric.info.top_k)


def _evaluate(
    path: LocalPath, concept: Concept, stop: Concept, x: Tensor
) -> tuple[float, Tensor, float]:
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        logits = path.logits(xg)
        c = concept.value(xg, logits)
        (g,) = torch.autograd.grad(c, xg)
    c = c.detach()
    s = c if stop is concept else stop.value(xg.detach(), logits.detach()).detach()
    if not (torch.isfinite(c) and torch.isfinite(g).all() and torch.isfinite(s)):
        raise NonFiniteError(f"the concept or its gradient is not finite at {path.site.name}")
    return float(c), g.detach(), float(s)


@torch.no_grad()
def _stop_value(path: LocalPath, stop: Concept, x: Tensor) -> float:
    return float(stop.value(x, path.logits(x)))


def steer_iteratively(
    model: HookedTransformer,
    cfg: IterativeConfig,
    concept: Concept,
    prompt: PromptsLike,
    *,
    stop_on: Concept | None = None,
    checkpoints: Sequence[float] = (),
    compare: Mapping[str, Compared] | None = None,
) -> SteeringRun:
    """Run ``cfg``'s method on one prompt until the stop concept (``stop_on``, default the
    concept) reaches its target, or ``max_steps``. Returns the :class:`SteeringRun`: the
    intervention δ at the site (its ``info`` a JSON summary: config, reached, steps, values,
    trajectory, seconds), every step, the path of δ and the wall time.

    ``checkpoints``: stop-concept values below the target passed on the way; where the path
    first crosses each, δ (bisected like the final step) is kept in ``run.checkpoints[value]``,
    so one run serves several matched targets.

    ``compare`` (FishBack and depth-k only: they hold the metric at every step): other methods'
    directions v(path, x, g) at the points of this path. ``run.path_rho[name]`` is ρ
    integrated along the path (:class:`~steerlens.diagnostics.cost.PathRho`), the predictor of that
    method's off-target KL over this one's at matched concept change; each checkpoint's
    ``path_rho`` the same up to the step that crosses it."""
    for c in (concept, stop_on):
        if c is not None and not isinstance(c, Concept):
            raise InputError(
                "a concept must have name, value(), target_value(), off_target() and "
                f"check_site() (steerlens.concepts.base.Concept), got {type(c).__name__}"
            )
    stop = concept if stop_on is None else stop_on
    target = (
        cfg.target_value
        if cfg.target_value is not None
        else stop.target_value(cfg.target_probability)
    )
    late = [float(v) for v in checkpoints if not float(v) < target]
    if late:
        raise InputError(
            f"checkpoints must lie below the run's target value {target:.6g}; got {late}"
        )
    started = time.perf_counter()
    prompts = as_prompts(model, prompt)
    if len(prompts) != 1:
        raise InputError(f"{cfg.name} steers one prompt at a time, got {len(prompts)}")
    with LocalPath(model, prompts[0], cfg.site) as path:
        concept.check_site(path.site, model)
        if stop is not concept:
            stop.check_site(path.site, model)
        direction = direction_fn(cfg, concept, stop)
        every = getattr(cfg, "metric_every", None)
        if compare and not (isinstance(cfg, FishBackConfig) and every == 1):
            raise InputError(
                "compare needs a method that computes the metric at every step (fishback, "
                f"truncated_fisher, with metric_every=1), not {cfg.name} (metric_every={every})"
            )
        along = _Along(compare or {}, getattr(cfg, "damping", None))
        x = path.x0.clone()
        c, g, s = _evaluate(path, concept, stop, x)
        trajectory = [Step(0, c, s, 0.0)]
        points = [torch.zeros_like(x)]
        start_value, reached, steps = s, s >= target, 0
        pending = sorted(float(v) for v in checkpoints)
        marks: dict[float, Checkpoint] = {}
        while pending and s >= pending[0]:
            value = pending.pop(0)
            marks[value] = Checkpoint(value, torch.zeros_like(x), 0)
        while not reached and steps < cfg.max_steps:
            steps += 1
            u, metric = direction(path, x, g)
            along.observe(metric, path, x, g)
            gu = float(g @ u)
            if not gu > 0:
                raise MethodError(
                    f"{cfg.name}: the update does not raise the concept (gᵀu = {gu:.3g}) at step "
                    f"{steps}; the gradient may vanish here"
                )
            eta = cfg.step / gu
            for _ in range(7):
                x_new = x + eta * u
                c_new, g_new, s_new = _evaluate(path, concept, stop, x_new)
                if s_new > s or s_new >= target:
                    break
                eta /= 2
            while pending and s_new >= pending[0]:
                value = pending.pop(0)
                mark = _bisect(path, stop, x, eta * u, value)
                rho: dict[str, float] = {}
                if along.rho:  # the crossing step counts only up to the checkpoint
                    c_mark = value if stop is concept else _stop_value(path, concept, mark)
                    rho = along.values(c_mark - c)
                marks[value] = Checkpoint(value, (mark - path.x0).detach(), steps, rho)
            if s_new >= target:
                x_new = _bisect(path, stop, x, eta * u, target)
                c_new, g_new, s_new = _evaluate(path, concept, stop, x_new)
                reached = True
            along.step(c_new - c)
            x, c, g, s = x_new, c_new, g_new, s_new
            points.append((x - path.x0).detach())
            trajectory.append(_step(steps, c, s, float(points[-1].norm()), metric))
        delta = points[-1]
        site = path.site.name
    seconds = time.perf_counter() - started
    info = {
        "config": asdict(cfg),
        "concept": getattr(concept, "name", type(concept).__name__),
        "stop_concept": getattr(stop, "name", type(stop).__name__),
        "reached": bool(reached),
        "steps": steps,
        "start_value": start_value,
        "final_value": s,
        "target_value": target,
        "trajectory": [asdict(t) for t in trajectory],
        "seconds": seconds,
    }
    return SteeringRun(
        Intervention(cfg.name, {site: delta}, 1.0, info),
        site,
        bool(reached),
        start_value,
        s,
        target,
        tuple(trajectory),
        torch.stack(points),
        marks,
        along.values() if along.rho else {},
        seconds,
    )


class _Along:
    """:class:`PathRho` of each compared direction, fed one step at a time."""

    def __init__(self, compare: Mapping[str, Compared], damping: float | None) -> None:
        self.compare, self.damping = compare, damping
        self.rho = {name: PathRho() for name in compare}
        self._now: dict[str, float] = {}
        self._best = math.nan

    def observe(self, metric: Metric | None, path: LocalPath, x: Tensor, g: Tensor) -> None:
        """ρ of every compared direction at the current point."""
        self._now = {}
        if not self.rho or metric is None or self.damping is None:
            return
        self._best = optimal_quad(metric, g, self.damping)
        for name, fn in self.compare.items():
            v = fn(path, x, g).to(g)
            ok = bool(torch.isfinite(v).all()) and float(v @ g) > 0
            self._now[name] = (
                spectral_cost_ratio(metric, v, g, self.damping, best=self._best) if ok else math.nan
            )

    def step(self, change: float) -> None:
        for name, rho in self._now.items():
            self.rho[name].add(rho, self._best, change)

    def values(self, pending_change: float | None = None) -> dict[str, float]:
        """The integrals so far (plus the current step with ``pending_change``)."""
        out = {}
        for name, acc in self.rho.items():
            part = replace(acc)
            if pending_change is not None and name in self._now:
                part.add(self._now[name], self._best, pending_change)
            out[name] = part.value()
        return out


#: points per round of :func:`_bisect`'s grid, and its rounds (17⁻⁵ < 1e-6 in t)
_BISECT_POINTS, _BISECT_ROUNDS = 16, 5


@torch.no_grad()
def _bisect(path: LocalPath, stop: Concept, x: Tensor, step: Tensor, target: float) -> Tensor:
    """The point x + t·step, t ∈ (0, 1], where the stop concept first reaches ``target`` (to
    1e-6 in t), taking the upper end so the target is met. Each round evaluates
    :data:`_BISECT_POINTS` evenly spaced points of the bracket in one batched call
    (:meth:`LocalPath.batched`) and keeps the interval before the first that reaches the
    target; the end t = 1 reaches it."""

    def value(point: Tensor) -> Tensor:
        return stop.value(point, path.logits(point))

    lo, hi = 0.0, 1.0
    for _ in range(_BISECT_ROUNDS):
        ts = [lo + (hi - lo) * (k + 1) / (_BISECT_POINTS + 1) for k in range(_BISECT_POINTS)]
        grid = torch.tensor(ts, dtype=x.dtype, device=x.device)
        values = path.batched(value, x + grid[:, None] * step)
        first = next((i for i, v in enumerate(values.tolist()) if v >= target), None)
        if first is None:  # between the last point and hi
            lo = ts[-1]
            continue
        if first > 0:
            lo = ts[first - 1]
        hi = ts[first]
    return x + hi * step


def _fit(model: HookedTransformer, cfg: IterativeConfig, inputs: FitInputs) -> Intervention:
    assert inputs.concept is not None and inputs.prompt is not None  # checked by the registry
    run = steer_iteratively(model, cfg, inputs.concept, inputs.prompt, stop_on=inputs.stop_on)
    return run.intervention


def _register(config: type[IterativeConfig], implicit_metric: str, description: str) -> None:
    register_method(
        MethodSpec(
            config.name,
            config,
            _fit,
            needs=("concept", "prompt"),
            accepts=("stop_on",),
            input_types={"concept": Concept, "stop_on": Concept},
            implicit_metric=implicit_metric,
            description=description,
            iterative=True,
        )
    )


_register(
    FishBackConfig,
    "full pullback Fisher (off-target)",
    "iterative natural gradient δ ∝ (G_off + λI)⁻¹g to a target probability",
)
_register(EuclideanConfig, "I", "iterative gradient ascent δ ∝ g to a target probability")
_register(
    TruncatedFisherConfig,
    "depth-k Fisher G^(k)",
    "iterative δ ∝ (G^(k) + λI)⁻¹g; k = 0 is the softmax geometry",
)
_register(
    DualConfig, "depth-0 Fisher", "Park et al.'s dual steering: CG-solved Newton steps on a probe"
)
