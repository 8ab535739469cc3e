"""The iterative steering loop, written once for one prompt and for a batch of prompts.

:func:`walk` is one prompt's run as a generator: it does its own per-prompt work (the method's
direction, the metric, ρ along the path) on its :class:`~steerlens.metric.local.LocalPath`, and
yields what can be shared between prompts, the model evaluations:

- :class:`Evaluate` (one point: the concept, its gradient and the stop concept there),
- :class:`Grid` (many points of the last step's bisection: the stop concept at each).

:func:`drive_one` answers them on the prompt's own path; :func:`drive_many` answers the
requests of every unfinished prompt together, in one batched call through the blocks after the
site (:class:`~steerlens.metric.stacked.StackedPaths`), so each weight read serves every prompt.
Each prompt keeps its own δ, its own step halving and its own stop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from steerlens.concepts.base import Concept
from steerlens.diagnostics import PathRho, optimal_quad, spectral_cost_ratio
from steerlens.errors import MethodError, NonFiniteError, SteerlensError
from steerlens.methods.configs import IterativeConfig
from steerlens.methods.run import Checkpoint, Step
from steerlens.metric.core import Metric
from steerlens.metric.local import LocalPath
from steerlens.metric.stacked import StackedPaths

#: a method's update direction at a point of the path: (path, x, g) -> (u, the metric it solved
#: with, or None)
Direction = Callable[[LocalPath, Tensor, Tensor], tuple[Tensor, Metric | None]]
#: another method's direction at a point of the path: (path, x, g) -> v
Compared = Callable[[LocalPath, Tensor, Tensor], Tensor]

#: points per round of the bisection's grid, and its rounds (17⁻⁵ < 1e-6 in t)
BISECT_POINTS, BISECT_ROUNDS = 16, 5


@dataclass(frozen=True)
class Evaluate:
    """Asks for (concept value, its gradient, stop-concept value) at ``x``."""

    x: Tensor


@dataclass(frozen=True)
class Grid:
    """Asks for the stop concept's value at each row of ``points``."""

    points: Tensor


Request = Evaluate | Grid
Answer = tuple[float, Tensor, float] | Tensor


@dataclass
class Walked:
    """What one prompt's walk ends with."""

    reached: bool
    steps: int
    start_value: float
    final_value: float
    trajectory: list[Step]
    points: list[Tensor]
    marks: dict[float, Checkpoint] = field(default_factory=dict)
    path_rho: dict[str, float] = field(default_factory=dict)


def _checked(where: str, c: Tensor, g: Tensor, s: Tensor) -> tuple[float, Tensor, float]:
    if not (torch.isfinite(c) and torch.isfinite(g).all() and torch.isfinite(s)):
        raise NonFiniteError(f"the concept or its gradient is not finite at {where}")
    return float(c), g.detach(), float(s)


def evaluate(
    path: LocalPath, concept: Concept, stop: Concept, x: Tensor
) -> tuple[float, Tensor, float]:
    """The concept, its gradient and the stop concept at ``x`` on one prompt's path."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        logits = path.logits(xg)
        c = concept.value(xg, logits)
        (g,) = torch.autograd.grad(c, xg)
    c = c.detach()
    s = c if stop is concept else stop.value(xg.detach(), logits.detach()).detach()
    return _checked(path.site.name, c, g, s)


@torch.no_grad()
def stop_value(path: LocalPath, stop: Concept, x: Tensor) -> float:
    return float(stop.value(x, path.logits(x)))


def ask(x: Tensor) -> Generator[Request, Answer, tuple[float, Tensor, float]]:
    """Yield :class:`Evaluate` at ``x``; its answer."""
    answer = yield Evaluate(x)
    assert isinstance(answer, tuple)  # an Evaluate's answer
    return answer


def walk(
    cfg: IterativeConfig,
    path: LocalPath,
    concept: Concept,
    stop: Concept,
    target: float,
    checkpoints: Sequence[float],
    direction: Direction,
    along: Along,
) -> Generator[Request, Answer, Walked]:
    """One prompt's run from δ = 0 until the stop concept reaches ``target`` or
    ``cfg.max_steps``: the loop of :func:`~steerlens.methods.iterative.steer_iteratively`."""
    x = path.x0.clone()
    c, g, s = yield from ask(x)
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
            c_new, g_new, s_new = yield from ask(x_new)
            if s_new > s or s_new >= target:
                break
            eta /= 2
        while pending and s_new >= pending[0]:
            value = pending.pop(0)
            mark = yield from bisect(x, eta * u, value)
            rho: dict[str, float] = {}
            if along.rho:  # the crossing step counts only up to the checkpoint
                c_mark = value if stop is concept else stop_value(path, concept, mark)
                rho = along.values(c_mark - c)
            marks[value] = Checkpoint(value, (mark - path.x0).detach(), steps, rho)
        if s_new >= target:
            x_new = yield from bisect(x, eta * u, target)
            c_new, g_new, s_new = yield from ask(x_new)
            reached = True
        along.step(c_new - c)
        x, c, g, s = x_new, c_new, g_new, s_new
        points.append((x - path.x0).detach())
        trajectory.append(_step(steps, c, s, float(points[-1].norm()), metric))
    rho_all = along.values() if along.rho else {}
    return Walked(reached, steps, start_value, s, trajectory, points, marks, rho_all)


def _step(step: int, value: float, stop_value: float, norm: float, metric: Metric | None) -> Step:
    if metric is None or metric.info is None:
        return Step(step, value, stop_value, norm)
    return Step(step, value, stop_value, norm, metric.info.dropped_mass, metric.info.top_k)


def bisect(x: Tensor, step: Tensor, target: float) -> Generator[Request, Answer, Tensor]:
    """The point x + t·step, t ∈ (0, 1], where the stop concept first reaches ``target`` (to
    1e-6 in t), taking the upper end so the target is met. Each round asks for
    :data:`BISECT_POINTS` evenly spaced points of the bracket as one :class:`Grid` and keeps the
    interval before the first that reaches the target; the end t = 1 reaches it."""
    lo, hi = 0.0, 1.0
    for _ in range(BISECT_ROUNDS):
        ts = [lo + (hi - lo) * (k + 1) / (BISECT_POINTS + 1) for k in range(BISECT_POINTS)]
        grid = torch.tensor(ts, dtype=x.dtype, device=x.device)
        values = yield Grid(x + grid[:, None] * step)
        assert isinstance(values, Tensor)  # a Grid's answer
        first = next((i for i, v in enumerate(values.tolist()) if v >= target), None)
        if first is None:  # between the last point and hi
            lo = ts[-1]
            continue
        if first > 0:
            lo = ts[first - 1]
        hi = ts[first]
    return x + hi * step


class Along:
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


def drive_one(
    walker: Generator[Request, Answer, Walked], path: LocalPath, concept: Concept, stop: Concept
) -> Walked:
    """Run one walk, answering its requests on its own path."""

    def value(point: Tensor) -> Tensor:
        return stop.value(point, path.logits(point))

    answer: Answer | None = None
    while True:
        try:
            request = walker.send(answer) if answer is not None else next(walker)
        except StopIteration as done:
            return done.value
        if isinstance(request, Evaluate):
            answer = evaluate(path, concept, stop, request.x)
        else:
            with torch.no_grad():
                answer = path.batched(value, request.points)


def drive_many(
    walkers: Sequence[Generator[Request, Answer, Walked]],
    paths: StackedPaths,
    concepts: Sequence[Concept],
    stops: Sequence[Concept],
) -> list[Walked]:
    """Run every walk to its end together: each round, the pending :class:`Evaluate` requests
    of all unfinished walks go through the blocks in one batched call, and so do the pending
    :class:`Grid` requests."""
    n = len(walkers)
    done: list[Walked | None] = [None] * n
    requests: list[Request | None] = [None] * n
    answers: list[Answer | None] = [None] * n
    while True:
        for i, walker in enumerate(walkers):
            if done[i] is not None:
                continue
            try:
                a = answers[i]
                requests[i] = walker.send(a) if a is not None else next(walker)
            except StopIteration as end:
                done[i], requests[i] = end.value, None
            except SteerlensError as error:  # say which prompt of the batch failed
                raise type(error)(f"prompt {i} of the batch: {error}") from error
        if all(d is not None for d in done):
            return [d for d in done if d is not None]
        asked = [i for i, r in enumerate(requests) if isinstance(r, Evaluate)]
        if asked:
            for i, a in zip(asked, _evaluate_many(paths, concepts, stops, requests), strict=True):
                answers[i] = a
        gridded = [i for i, r in enumerate(requests) if isinstance(r, Grid)]
        if gridded:
            for i, a in zip(gridded, _grid_many(paths, stops, requests), strict=True):
                answers[i] = a


def _evaluate_many(
    paths: StackedPaths,
    concepts: Sequence[Concept],
    stops: Sequence[Concept],
    requests: Sequence[Request | None],
) -> list[tuple[float, Tensor, float]]:
    asked = [i for i, r in enumerate(requests) if isinstance(r, Evaluate)]
    counts = [int(isinstance(r, Evaluate)) for r in requests]
    xs = torch.stack([r.x.detach() for r in requests if isinstance(r, Evaluate)])
    with torch.enable_grad():
        xg = xs.requires_grad_(True)
        logits = paths.logits(xg, counts)
        cs = torch.stack([concepts[i].value(xg[row], logits[row]) for row, i in enumerate(asked)])
        (gs,) = torch.autograd.grad(cs.sum(), xg)
    out = []
    for row, i in enumerate(asked):
        c, stop, x = cs[row].detach(), stops[i], xs[row].detach()
        s = c if stop is concepts[i] else stop.value(x, logits[row].detach()).detach()
        out.append(_checked(f"{paths.site.name} (prompt {i})", c, gs[row], s))
    return out


@torch.no_grad()
def _grid_many(
    paths: StackedPaths, stops: Sequence[Concept], requests: Sequence[Request | None]
) -> list[Tensor]:
    counts = [r.points.shape[0] if isinstance(r, Grid) else 0 for r in requests]
    xs = torch.cat([r.points for r in requests if isinstance(r, Grid)])
    logits = paths.logits(xs, counts)
    out, start = [], 0
    for i, count in enumerate(counts):
        if not count:
            continue
        pts, lgs = xs[start : start + count], logits[start : start + count]
        if paths.stacked:
            out.append(torch.vmap(stops[i].value)(pts, lgs))
        else:
            out.append(torch.stack([stops[i].value(p, lg) for p, lg in zip(pts, lgs, strict=True)]))
        start += count
    return out
