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

import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from steerlens.concepts.base import Concept
from steerlens.errors import InputError, MethodError
from steerlens.methods.configs import (
    DualConfig,
    EuclideanConfig,
    FishBackConfig,
    IterativeConfig,
    TruncatedFisherConfig,
)
from steerlens.methods.intervention import Intervention
from steerlens.methods.loop import (
    Along,
    Answer,
    Compared,
    Direction,
    Request,
    Walked,
    drive_many,
    drive_one,
    walk,
)
from steerlens.methods.registry import FitInputs, MethodSpec, register_method
from steerlens.methods.run import SteeringRun
from steerlens.metric.core import Metric
from steerlens.metric.local import LocalPath
from steerlens.metric.outcomes import OffTarget
from steerlens.metric.pullback import MetricOptions
from steerlens.metric.stacked import StackedPaths
from steerlens.prompts import PromptsLike, as_prompts

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer


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
    ``path_rho`` the same up to the step that crosses it.

    Many prompts at once: :func:`steer_batch`."""
    started = time.perf_counter()
    stop = _check_concepts(concept, stop_on)
    target = _target(cfg, stop, checkpoints)
    prompts = as_prompts(model, prompt)
    if len(prompts) != 1:
        raise InputError(
            f"{cfg.name} steers one prompt at a time here, got {len(prompts)}; "
            "steer_batch steers a batch"
        )
    with LocalPath(model, prompts[0], cfg.site) as path:
        walker = _walker(cfg, path, concept, stop, target, checkpoints, compare, model)
        walked = drive_one(walker, path, concept, stop)
    return _run(cfg, concept, stop, target, path.site.name, walked, time.perf_counter() - started)


def steer_batch(
    model: HookedTransformer,
    cfg: IterativeConfig,
    concept: Concept | Sequence[Concept],
    prompts: PromptsLike,
    *,
    attention_mask: Tensor | None = None,
    stop_on: Concept | Sequence[Concept] | None = None,
    checkpoints: Sequence[float] = (),
    compare: Mapping[str, Compared] | None = None,
) -> list[SteeringRun]:
    """:func:`steer_iteratively` on every prompt of a batch at once: one run per prompt, each
    with its own δ, step halving and stop, equal (to rounding) to the prompt steered alone.

    ``prompts``: strings, token tensors of any lengths, or a padded ``[batch, pos]`` tensor with
    its ``attention_mask`` (either padding side; each row's last real token is its prediction
    position). ``concept`` and ``stop_on``: one concept for every prompt, or one per prompt (a
    concept's target tokens often depend on its context). The model evaluations of every
    unfinished run (the concept and its gradient at each step, the points of each last-step
    bisection) go through the blocks after the site in one batched call, each row attending to
    its own prompt's keys and values (:class:`~steerlens.metric.stacked.StackedPaths`); the
    per-prompt work (the metric, its solve, ``compare``) runs prompt by prompt. Each run's
    ``seconds`` is the whole batch's wall time; ``info["batch"]`` the batch size."""
    started = time.perf_counter()
    tokens = as_prompts(model, prompts, attention_mask)
    n = len(tokens)
    concepts = _per_prompt(concept, n, "concept")
    stops_given = _per_prompt(stop_on, n, "stop_on") if stop_on is not None else [None] * n
    stops = [_check_concepts(c, s) for c, s in zip(concepts, stops_given, strict=True)]
    targets = [_target(cfg, s, checkpoints) for s in stops]
    with StackedPaths(model, tokens, cfg.site) as paths:
        walkers = [
            _walker(cfg, path, c, s, t, checkpoints, compare, model)
            for path, c, s, t in zip(paths.paths, concepts, stops, targets, strict=True)
        ]
        walked = drive_many(walkers, paths, concepts, stops)
        site = paths.site.name
    seconds = time.perf_counter() - started
    runs = []
    for c, s, t, w in zip(concepts, stops, targets, walked, strict=True):
        run = _run(cfg, c, s, t, site, w, seconds)
        run.intervention.info["batch"] = n
        runs.append(run)
    return runs


def _per_prompt(value: Any, n: int, name: str) -> list[Any]:
    """``value`` for each of ``n`` prompts: itself n times, or a sequence of exactly n."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != n:
            raise InputError(
                f"{name}: one for every prompt or one per prompt ({n}), got {len(value)}"
            )
        return list(value)
    return [value] * n


def _check_concepts(concept: Any, stop_on: Any) -> Concept:
    """The stop concept (``stop_on``, default the concept), after checking both are concepts."""
    for c in (concept, stop_on):
        if c is not None and not isinstance(c, Concept):
            raise InputError(
                "a concept must have name, value(), target_value(), off_target() and "
                f"check_site() (steerlens.concepts.base.Concept), got {type(c).__name__}"
            )
    if concept is None:
        raise InputError("iterative steering needs a concept")
    return concept if stop_on is None else stop_on


def _target(cfg: IterativeConfig, stop: Concept, checkpoints: Sequence[float]) -> float:
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
    return target


def _walker(
    cfg: IterativeConfig,
    path: LocalPath,
    concept: Concept,
    stop: Concept,
    target: float,
    checkpoints: Sequence[float],
    compare: Mapping[str, Compared] | None,
    model: HookedTransformer,
) -> Generator[Request, Answer, Walked]:
    """One prompt's walk, after the checks that need its path."""
    concept.check_site(path.site, model)
    if stop is not concept:
        stop.check_site(path.site, model)
    every = getattr(cfg, "metric_every", None)
    if compare and not (isinstance(cfg, FishBackConfig) and every == 1):
        raise InputError(
            "compare needs a method that computes the metric at every step (fishback, "
            f"truncated_fisher, with metric_every=1), not {cfg.name} (metric_every={every})"
        )
    along = Along(compare or {}, getattr(cfg, "damping", None))
    direction = direction_fn(cfg, concept, stop)
    return walk(cfg, path, concept, stop, target, checkpoints, direction, along)


def _run(
    cfg: IterativeConfig,
    concept: Concept,
    stop: Concept,
    target: float,
    site: str,
    walked: Walked,
    seconds: float,
) -> SteeringRun:
    delta = walked.points[-1]
    info = {
        "config": asdict(cfg),
        "concept": getattr(concept, "name", type(concept).__name__),
        "stop_concept": getattr(stop, "name", type(stop).__name__),
        "reached": bool(walked.reached),
        "steps": walked.steps,
        "start_value": walked.start_value,
        "final_value": walked.final_value,
        "target_value": target,
        "trajectory": [asdict(t) for t in walked.trajectory],
        "seconds": seconds,
    }
    return SteeringRun(
        Intervention(cfg.name, {site: delta}, 1.0, info),
        site,
        bool(walked.reached),
        walked.start_value,
        walked.final_value,
        target,
        tuple(walked.trajectory),
        torch.stack(walked.points),
        walked.marks,
        walked.path_rho,
        seconds,
    )


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
