"""Activation scaling (Stoehr et al., 2024): learned signed scalars on component outputs.

Each component c (an attention head's ``hook_z``, an MLP's ``hook_mlp_out``) at the chosen
position rule has its activation multiplied by 1 + m_c, m_c ∈ ℝ (m = 0 leaves it, −1 ablates it,
negative values past −1 flip its sign). The multipliers minimize, over a set of prompts each
with a target token t and a source token s (the answer to flip away from),

    effectiveness  mean softplus(margin − (z_t − z_s))     (z the next-token logits)
    faithfulness   mean KL(p_clean ‖ p_steered) on every token but t and s, renormalized
    minimality     l1 · Σ|m_c|

by proximal gradient descent (ISTA: a gradient step on the first two, then the L1's
soft-threshold), so components whose gradient never outweighs the L1 weight stay at exactly 0
and are dropped. The paper gives no
code; where it leaves choices open this module states them: the multiplier is parametrized
around 1 (1 + m, so L1 pulls towards "unchanged"), the logit-difference flip is a softplus with
a margin, and one set of scalars is shared by all the prompts (the paper's dataset-level
variant; a single prompt is a dataset of one; the dynamic variant is
:mod:`steerlens.methods.dynamic_scaling`). The result is an :class:`Intervention` whose
``multipliers`` are the kept components; ``info["kept"]`` lists them largest first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from steerlens.errors import InputError, MethodError, NonFiniteError
from steerlens.hooks import _position_slice, hooked
from steerlens.methods.intervention import Intervention
from steerlens.methods.registry import FitInputs, MethodSpec, register_method
from steerlens.methods.scalar_function import check_scalable
from steerlens.prompts import PromptsLike, as_prompts
from steerlens.sites import Site, as_site

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer


def component_sites(
    model: HookedTransformer, layers: Sequence[int] | None = None, position: str = "last"
) -> list[str]:
    """Every head (``z.L:h``) and MLP output (``mlp_out.L``) of ``layers`` (default: all), at
    ``position`` ("last", "all" or an index)."""
    layers = range(model.cfg.n_layers) if layers is None else layers
    out = []
    for layer in layers:
        out += [f"z.{layer}:{h}@{position}" for h in range(model.cfg.n_heads)]
        out.append(f"mlp_out.{layer}@{position}")
    return [as_site(s, model).name for s in out]


def _scaled_hooks(model: HookedTransformer, sites: list[Site], m: Tensor) -> list[Any]:
    """Forward hooks multiplying each site's activation by 1 + m[i] (differentiable in m)."""
    by_hook: dict[str, list[tuple[int, Site]]] = {}
    for i, site in enumerate(sites):
        by_hook.setdefault(site.hook_name, []).append((i, site))

    def make(entries: list[tuple[int, Site]]):
        def hook(act: Tensor, hook: object) -> Tensor:
            factor = torch.ones(act.shape[1:], dtype=act.dtype, device=act.device)
            for i, site in entries:
                sl = _position_slice(site, act.shape[1], 0)
                if sl is None:
                    continue
                if site.head is not None:
                    factor = factor.index_put(_index(factor, sl, site.head), 1 + m[i].to(act.dtype))
                else:
                    factor = factor.index_put(_index(factor, sl, None), 1 + m[i].to(act.dtype))
            return act * factor

        return hook

    return [(name, make(entries)) for name, entries in by_hook.items()]


def _index(factor: Tensor, sl: slice | int, head: int | None) -> tuple[Tensor, ...]:
    """Index tensors selecting positions ``sl`` (and ``head``) of a [pos, ...] factor."""
    positions = torch.arange(factor.shape[0], device=factor.device)[sl].reshape(-1)
    if head is None:
        return (positions,)
    return (positions, torch.full_like(positions, head))


def _losses(
    steered: Tensor, clean_logp: Tensor, targets: Tensor, sources: Tensor, margin: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Per prompt: the flip loss, the off-target KL, and whether the target beats the source."""
    rows = torch.arange(len(targets), device=steered.device)
    diff = steered[rows, targets] - steered[rows, sources]
    keep = torch.ones_like(steered, dtype=torch.bool)
    keep[rows, targets] = False
    keep[rows, sources] = False
    n_keep = steered.shape[-1] - 2
    p = torch.log_softmax(clean_logp[keep].view(-1, n_keep), -1)
    q = torch.log_softmax(steered[keep].view(-1, n_keep), -1)
    kl = (p.exp() * (p - q)).sum(-1)
    return F.softplus(margin - diff), kl, diff > 0


@dataclass(frozen=True)
class _Task:
    """Prompts grouped by length (one batch each, no padding), their clean last-position logits,
    and each prompt's target and source token."""

    toks: list[Tensor]
    groups: dict[int, list[int]]
    clean: dict[int, Tensor]
    targets: Tensor
    sources: Tensor


def _task(
    model: HookedTransformer, prompts: PromptsLike, targets: Sequence[int], sources: Sequence[int]
) -> _Task:
    toks = as_prompts(model, prompts)
    if len(targets) != len(toks) or len(sources) != len(toks):
        raise InputError(
            f"{len(toks)} prompts but {len(targets)} targets and {len(sources)} sources: "
            "give one target and one source token per prompt"
        )
    vocab = model.cfg.d_vocab
    for t, s in zip(targets, sources, strict=True):
        if not (0 <= t < vocab and 0 <= s < vocab) or t == s:
            raise InputError(f"target {t} / source {s}: two different token ids below {vocab}")
    groups: dict[int, list[int]] = {}
    for i, t in enumerate(toks):
        groups.setdefault(len(t), []).append(i)
    device = model.cfg.device
    with torch.no_grad():
        clean = {n: model(torch.stack([toks[i] for i in idx]))[:, -1] for n, idx in groups.items()}
    return _Task(
        toks,
        groups,
        clean,
        torch.tensor(list(targets), device=device),
        torch.tensor(list(sources), device=device),
    )


def _check_options(steps: int, lr: float, l1: float, faithfulness: float, margin: float) -> None:
    for name, value in (("steps", steps), ("lr", lr), ("margin", margin)):
        if not value > 0:
            raise InputError(f"{name} must be > 0, got {value}")
    if l1 < 0 or faithfulness < 0:
        raise InputError(f"l1 and faithfulness must be >= 0, got {l1} and {faithfulness}")


def _sites(
    model: HookedTransformer,
    components: Sequence[str] | None,
    layers: Sequence[int] | None,
    position: str,
) -> list[Site]:
    """The components to scale, checked: scalable kinds, none listed twice."""
    names = list(components) if components is not None else component_sites(model, layers, position)
    if not names:
        raise InputError("no components to scale")
    sites = [as_site(s, model) for s in names]
    for site in sites:
        check_scalable(site)
    if len({s.name for s in sites}) != len(sites):
        raise InputError("a component is listed twice")
    return sites


def shrink_rows(x: Float[Tensor, "n_rows k"], threshold: float) -> None:
    """The proximal step of ``threshold``·Σ‖row‖₂, in place: each row shrunk towards 0 by
    ``threshold`` in norm, rows shorter than that set to exactly 0 (one-column rows: the L1's
    soft-threshold)."""
    norms = x.norm(dim=-1, keepdim=True)
    x.mul_((1 - threshold / norms.clamp_min(torch.finfo(x.dtype).tiny)).clamp_min(0))


def _optimize(
    model: HookedTransformer,
    task: _Task,
    steer: Callable[[], AbstractContextManager[Any]],
    params: Sequence[Tensor],
    penalty: Callable[[], float],
    *,
    steps: int,
    lr: float,
    l1: float,
    faithfulness: float,
    margin: float,
    progress: bool,
    desc: str,
) -> tuple[dict[str, float], dict[str, float]]:
    """ISTA on the mean flip + ``faithfulness``·KL over ``task``'s prompts: a gradient step on
    ``params`` (each [n_rows, k], one row a component), then :func:`shrink_rows` by lr·l1.
    ``steer()`` is the context of one steered forward pass; ``penalty()`` the L1 term now. The
    loss terms before the first step and after the last, or a NonFiniteError if it diverges."""
    opt = torch.optim.SGD(list(params), lr=lr)
    n = len(task.toks)

    def evaluate(train: bool, step: int) -> dict[str, float]:
        flip = kl_sum = eff_sum = 0.0
        total = torch.zeros((), dtype=torch.float64, device=model.cfg.device)
        for length, idx in task.groups.items():
            batch = torch.stack([task.toks[i] for i in idx])
            with steer():
                steered = model(batch)[:, -1].double()
            eff, kl, flipped = _losses(
                steered,
                task.clean[length].double(),
                task.targets[idx],
                task.sources[idx],
                margin,
            )
            total = total + (eff.sum() + faithfulness * kl.sum()) / n
            eff_sum += float(eff.sum().detach())
            kl_sum += float(kl.sum().detach())
            flip += float(flipped.sum())
        if not math.isfinite(float(total.detach())):
            raise NonFiniteError(
                f"{desc} diverged at step {step} (loss {float(total.detach())}): lower lr={lr}"
            )
        if train:
            # only the scalars' gradients: none computed for, or left on, the model's weights
            for p, g in zip(params, torch.autograd.grad(total, list(params)), strict=True):
                p.grad = g
            opt.step()
            with torch.no_grad():  # the proximal step of the L1 term: exact zeros
                for p in params:
                    shrink_rows(p, lr * l1)
            if not all(bool(torch.isfinite(p.detach()).all()) for p in params):
                raise NonFiniteError(f"{desc} diverged at step {step}: lower lr={lr}")
        return {
            "effectiveness": eff_sum / n,
            "faithfulness": kl_sum / n,
            "flip_rate": flip / n,
            "l1": penalty(),
        }

    with torch.enable_grad():
        start = evaluate(train=False, step=0)
        for step in tqdm(range(steps), disable=not progress, desc=desc):
            evaluate(train=True, step=step)
    with torch.no_grad():
        end = evaluate(train=False, step=steps)
    return start, end


def scaling_intervention(
    model: HookedTransformer,
    prompts: PromptsLike,
    targets: Sequence[int],
    sources: Sequence[int],
    *,
    components: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    position: str = "last",
    steps: int = 60,
    lr: float = 0.5,
    l1: float = 0.05,
    faithfulness: float = 1.0,
    margin: float = 1.0,
    progress: bool = False,
) -> Intervention:
    """Learn signed scalars on component outputs that make each prompt's ``targets[i]`` beat
    ``sources[i]`` (see the module docstring). ``components``: site strings to scale (default
    :func:`component_sites` of ``layers`` at ``position``)."""
    task = _task(model, prompts, targets, sources)
    _check_options(steps, lr, l1, faithfulness, margin)
    sites = _sites(model, components, layers, position)
    sites_named = [s.name for s in sites]
    m = torch.zeros(len(sites), 1, dtype=torch.float64, device=model.cfg.device)
    m.requires_grad_(True)
    need_result = any(s.kind == "result" for s in sites)
    start, end = _optimize(
        model,
        task,
        lambda: hooked(model, _scaled_hooks(model, sites, m[:, 0]), need_result=need_result),
        [m],
        lambda: l1 * float(m.detach().abs().sum()),
        steps=steps,
        lr=lr,
        l1=l1,
        faithfulness=faithfulness,
        margin=margin,
        progress=progress,
        desc="activation scaling",
    )
    values = m.detach()[:, 0]
    order = values.abs().argsort(descending=True).tolist()
    kept = {sites_named[i]: float(values[i]) for i in order if float(values[i]) != 0.0}
    if not kept:
        raise MethodError(
            f"activation scaling kept no component (l1={l1} zeroed all {len(sites)} scalars): "
            "lower l1 or raise steps"
        )
    info: dict[str, Any] = {
        "prompts": len(task.toks),
        "components": len(sites),
        "kept": [[k, v] for k, v in kept.items()],
        "steps": steps,
        "lr": lr,
        "l1": l1,
        "faithfulness": faithfulness,
        "margin": margin,
        "start": start,
        "end": end,
    }
    return Intervention("scaling", {}, 1.0, info, multipliers=kept)


@dataclass(frozen=True)
class ScalingConfig:
    """``targets`` / ``sources``: one token id each per prompt, the answer to flip to and from;
    ``components`` (or the heads and MLPs of ``layers``, default all) scaled at ``position``;
    ``steps`` proximal gradient steps (ISTA) at ``lr`` on flip + ``faithfulness``·KL +
    ``l1``·‖m‖₁."""

    targets: Sequence[int]
    sources: Sequence[int]
    components: Sequence[str] | None = None
    layers: Sequence[int] | None = None
    position: str = "last"
    steps: int = 60
    lr: float = 0.5
    l1: float = 0.05
    faithfulness: float = 1.0
    margin: float = 1.0
    progress: bool = False


def _options(cfg: Any) -> dict[str, Any]:
    """A scaling config's fields but ``targets`` and ``sources``: the fit's keyword options."""
    return {
        f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in ("targets", "sources")
    }


def _fit_scaling(model: HookedTransformer, cfg: ScalingConfig, inputs: FitInputs) -> Intervention:
    assert inputs.prompt is not None
    return scaling_intervention(model, inputs.prompt, cfg.targets, cfg.sources, **_options(cfg))


register_method(
    MethodSpec(
        "scaling",
        ScalingConfig,
        _fit_scaling,
        needs=("prompt",),
        implicit_metric="none (multiplicative, per component)",
        description="signed scalars on head and MLP outputs: flip target vs source, KL, L1 "
        "(Stoehr et al.)",
    )
)
