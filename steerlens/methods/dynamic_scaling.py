"""Dynamic activation scaling (Stoehr et al., 2024, §"dynamic activation scalars"): the scalar on
each component is a learned function of that component's activation, so one intervention serves
prompts of any length and template; and the paper's three measures for comparing it with the
static scalars of :mod:`steerlens.methods.scaling`.

Each component c (a head's ``hook_z``, an MLP's ``hook_mlp_out``, ...) gets a
:class:`~steerlens.methods.scalar_function.ScalarFunction` m_c(a) = b_c + w_c · a/‖a‖, and at
every position of its rule (default ``@all``) its activation a is multiplied by 1 + m_c(a). The
parameters θ_c = (b_c, w_c) minimize the static objective (the same code:
:func:`steerlens.methods.scaling._optimize`) over prompts of varied length and template,

    effectiveness  mean softplus(margin − (z_t − z_s))     (z the last position's logits)
    faithfulness   mean KL(p_clean ‖ p_steered) on every token but t and s, renormalized
    minimality     l1 · Σ_c ‖θ_c‖₂

by proximal gradient descent: a gradient step, then the group soft-threshold of each θ_c, so a
component whose gradient never outweighs ``l1`` keeps θ_c = 0 exactly (it is never scaled) and
is dropped. With w = 0 this is the static objective on the multipliers b (‖θ_c‖ = |b_c|).

The paper gives no code and leaves the function's form open; the choices here are stated as
ours: the function is affine in the activation's *direction* (bounded, whatever the norm; no
hidden layer); it is applied at every position, not only the last; minimality is a group L1 on
each component's parameters (exact zeros per component), not an L1 on the scalars it outputs;
the flip is a softplus with a margin, as in the static variant. The bench
(``bench/dynamic_scaling.py``) compares the two on held-out templates and lengths.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from steerlens.errors import InputError, MethodError
from steerlens.hooks import _position_slice, record
from steerlens.methods.intervention import Intervention
from steerlens.methods.registry import FitInputs, MethodSpec, register_method
from steerlens.methods.scalar_function import ScalarFunction, scale_by_function
from steerlens.methods.scaling import _check_options, _losses, _optimize, _options, _sites, _task
from steerlens.prompts import PromptsLike
from steerlens.sites import Site, as_site

if TYPE_CHECKING:
    from collections.abc import Iterator

    from steerlens._tl import HookedTransformer


def dynamic_scaling_intervention(
    model: HookedTransformer,
    prompts: PromptsLike,
    targets: Sequence[int],
    sources: Sequence[int],
    *,
    components: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    position: str = "all",
    steps: int = 60,
    lr: float = 0.5,
    l1: float = 0.05,
    faithfulness: float = 1.0,
    margin: float = 1.0,
    progress: bool = False,
) -> Intervention:
    """Learn a scalar function per component that makes each prompt's ``targets[i]`` beat
    ``sources[i]`` (see the module docstring). ``components``: site strings to scale (default
    every head and MLP output of ``layers`` at ``position``). The result's
    ``scalar_functions`` are the kept components; ``info["kept"]`` lists them with ‖θ_c‖,
    largest first."""
    task = _task(model, prompts, targets, sources)
    _check_options(steps, lr, l1, faithfulness, margin)
    sites = _sites(model, components, layers, position)
    # one [n_rows, 1 + width] parameter matrix per activation width: row = (b_c, w_c)
    rows: dict[int, list[int]] = {}
    for i, site in enumerate(sites):
        rows.setdefault(site.dim(model), []).append(i)
    theta = {
        w: torch.zeros(len(idx), 1 + w, dtype=torch.float64, device=model.cfg.device)
        for w, idx in rows.items()
    }
    for t in theta.values():
        t.requires_grad_(True)

    def functions() -> dict[str, ScalarFunction]:
        out = {}
        for w, idx in rows.items():
            for r, i in enumerate(idx):
                out[sites[i].name] = ScalarFunction(theta[w][r, 1:], theta[w][r, 0])
        return out

    def penalty() -> float:
        return l1 * sum(float(t.detach().norm(dim=-1).sum()) for t in theta.values())

    start, end = _optimize(
        model,
        task,
        lambda: _applied(model, functions()),
        list(theta.values()),
        penalty,
        steps=steps,
        lr=lr,
        l1=l1,
        faithfulness=faithfulness,
        margin=margin,
        progress=progress,
        desc="dynamic activation scaling",
    )
    trained = {
        name: ScalarFunction(fn.weight.detach().clone(), fn.bias.detach().clone())
        for name, fn in functions().items()
    }
    kept = {k: fn for k, fn in trained.items() if fn.norm() > 0}
    if not kept:
        raise MethodError(
            f"dynamic activation scaling kept no component (l1={l1} zeroed all {len(sites)} "
            "functions): lower l1 or raise steps"
        )
    order = sorted(kept, key=lambda k: kept[k].norm(), reverse=True)
    info: dict[str, Any] = {
        "prompts": len(task.toks),
        "prompt_lengths": sorted(task.groups),
        "components": len(sites),
        "kept": [[k, kept[k].norm()] for k in order],
        "position": position,
        "steps": steps,
        "lr": lr,
        "l1": l1,
        "faithfulness": faithfulness,
        "margin": margin,
        "start": start,
        "end": end,
    }
    return Intervention(
        "dynamic_scaling", {}, 1.0, info, scalar_functions={k: kept[k] for k in order}
    )


@contextmanager
def _applied(
    model: HookedTransformer, functions: dict[str, ScalarFunction]
) -> Iterator[HookedTransformer]:
    with ExitStack() as stack:
        for spec, fn in functions.items():
            stack.enter_context(scale_by_function(model, spec, fn))
        yield model


@dataclass(frozen=True)
class ScalingMeasures:
    """Stoehr et al.'s three measures of a scaling intervention over prompts, each a mean over
    the prompts. Effectiveness: ``logit_diff`` (z_t − z_s steered, > 0 when flipped),
    ``flip_rate`` and ``flip_loss`` (softplus(margin − (z_t − z_s)), what is minimized);
    faithfulness: ``kl`` (off-target KL from the clean distribution, nats); minimality:
    ``scalar_l1`` (Σ|m| over every activation vector the intervention scaled in the prompt) and
    ``components`` (how many components it scales)."""

    logit_diff: float
    flip_rate: float
    flip_loss: float
    kl: float
    scalar_l1: float
    components: int

    def as_dict(self) -> dict[str, float]:
        return {
            "logit_diff": self.logit_diff,
            "flip_rate": self.flip_rate,
            "flip_loss": self.flip_loss,
            "kl": self.kl,
            "scalar_l1": self.scalar_l1,
            "components": self.components,
        }


def scaling_measures(
    model: HookedTransformer,
    iv: Intervention,
    prompts: PromptsLike,
    targets: Sequence[int],
    sources: Sequence[int],
    *,
    margin: float = 1.0,
) -> ScalingMeasures:
    """The three measures (see :class:`ScalingMeasures`) of ``iv`` — static multipliers or scalar
    functions — on ``prompts``, each with its ``targets[i]`` and ``sources[i]``."""
    if iv.vectors or iv.clamps or iv.weight_updates:
        raise InputError(
            f"intervention {iv.method!r} adds vectors, clamps features or updates weights: the "
            "scaling measures are for multipliers and scalar functions only"
        )
    if not margin > 0:
        raise InputError(f"margin must be > 0, got {margin}")
    task = _task(model, prompts, targets, sources)
    iv.check(model)
    scaled = [as_site(s, model) for s in (*iv.multipliers, *iv.scalar_functions)]
    diff = flip = loss = kl_sum = mass = 0.0
    for length, idx in task.groups.items():
        batch = torch.stack([task.toks[i] for i in idx])
        with torch.no_grad(), record(model, scaled) as acts, iv.apply(model):
            steered = model(batch)[:, -1].double()
        eff, kl, flipped = _losses(
            steered, task.clean[length].double(), task.targets[idx], task.sources[idx], margin
        )
        rows = torch.arange(len(idx), device=steered.device)
        d = steered[rows, task.targets[idx]] - steered[rows, task.sources[idx]]
        diff += float(d.sum())
        flip += float(flipped.sum())
        loss += float(eff.sum())
        kl_sum += float(kl.sum())
        mass += sum(_scalar_mass(iv, site, acts[site.name]) for site in scaled)
    n = len(task.toks)
    return ScalingMeasures(diff / n, flip / n, loss / n, kl_sum / n, mass / n, len(scaled))


def _scalar_mass(iv: Intervention, site: Site, act: Tensor) -> float:
    """Σ|scale·m| over the activation vectors (in ``act``, the batch's unscaled activation at
    ``site``, [batch, pos, dim]) that the intervention scales."""
    sl = _position_slice(site, act.shape[1], 0)
    if sl is None:
        return 0.0
    picked = act[:, sl]
    if site.name in iv.multipliers:
        vectors = picked.numel() // act.shape[-1]
        return abs(iv.scale * iv.multipliers[site.name]) * vectors
    return float((iv.scale * iv.scalar_functions[site.name](picked)).abs().sum())


@dataclass(frozen=True)
class DynamicScalingConfig:
    """``targets`` / ``sources``: one token id each per prompt, the answer to flip to and from;
    ``components`` (or the heads and MLPs of ``layers``, default all) scaled at ``position``
    (default every position) by a learned function of their activation; ``steps`` proximal
    gradient steps at ``lr`` on flip + ``faithfulness``·KL + ``l1``·Σ‖θ_c‖₂."""

    targets: Sequence[int]
    sources: Sequence[int]
    components: Sequence[str] | None = None
    layers: Sequence[int] | None = None
    position: str = "all"
    steps: int = 60
    lr: float = 0.5
    l1: float = 0.05
    faithfulness: float = 1.0
    margin: float = 1.0
    progress: bool = False


def _fit_dynamic(
    model: HookedTransformer, cfg: DynamicScalingConfig, inputs: FitInputs
) -> Intervention:
    assert inputs.prompt is not None
    return dynamic_scaling_intervention(
        model, inputs.prompt, cfg.targets, cfg.sources, **_options(cfg)
    )


register_method(
    MethodSpec(
        "dynamic_scaling",
        DynamicScalingConfig,
        _fit_dynamic,
        needs=("prompt",),
        implicit_metric="none (multiplicative, per component, a function of the activation)",
        description="signed scalars that are a learned affine function of each head's and "
        "MLP's activation direction: flip target vs source, KL, group L1 (an adaptation of "
        "Stoehr et al.'s dynamic scalars; the function's form is ours)",
    )
)
