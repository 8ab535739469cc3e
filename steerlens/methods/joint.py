"""Joint adaptation (Adila, Cooper, Yun, Trost and Sala, *Weight Updates as Activation Shifts: A
Principled Framework for Steering*, arXiv 2603.00425, 2026): post-block shifts and low-rank
weight updates trained together on a supervised next-token task.

Trained, with the model's own weights frozen: a vector δ_L added at every position of
``resid_post.L`` for each L of ``shift_layers`` (the paper's post-block site), and a low-rank
update ΔW = A B of the output projection(s) ``lora_on`` ("mlp": W_out, "attn": W_O) of each L of
``lora_layers`` (applied through hooks, :mod:`steerlens.methods.lowrank`). For prompts with one
answer token each (``targets``), the loss of a minibatch is

    mean over its prompts of −log p(target | prompt) at the last position
    + ``orthogonality`` · mean over (L, k) of cos²(δ_L, b_{L,k})

the mean over the layers that have both a shift and an update and over the rows b_{L,k} of B
(the residual directions the update writes), in [0, 1] whatever the number of layers: zero when
the shift is orthogonal to everything the weight update can write, so the constant shift and the
input-dependent update take separate directions. Adam (``lr_shift`` for the δ, ``lr_lora`` for A
and B) for ``steps`` minibatches of ``batch_size`` prompts (:func:`minibatches`: epoch by epoch,
each a seeded permutation of the prompts, from a generator of their own, so every run of one
seed sees the same minibatches).
Post-block alone is ``lora_layers=()``, LoRA alone ``shift_layers=()``: the same loop on the same
minibatches.

The paper's code is not public here and its summary names an orthogonality constraint without
its form; the choices it leaves open are made here as follows. The weight update acts on the
output projections (the matrices of its first-order equivalence, :mod:`.equivalence`), not the
query/value projections common in LoRA. A is drawn N(0, 1/d_in) and B is zero, so ΔW = 0 and
δ = 0 at the start; there is no α/r factor (Adam's step size absorbs it). The constraint is the
squared-cosine penalty above, not a hard projection. Each update's A is drawn from a
``torch.Generator`` seeded ``seed``, in ``lora_layers`` order (``lora_on`` order within a
layer).

A run returns only when every step is done (``info["steps_done"] == steps``); an interrupt or a
non-finite loss raises, so no half-trained intervention exists to be saved as if finished.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from steerlens.errors import InputError, NonFiniteError
from steerlens.hooks import hooked
from steerlens.methods.intervention import Intervention
from steerlens.methods.lowrank import (
    PROJECTION_KINDS,
    LowRankUpdate,
    OutputProjection,
    apply_update,
)
from steerlens.methods.registry import FitInputs, MethodSpec, register_method
from steerlens.prompts import PromptsLike, as_prompts
from steerlens.sites import as_site

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer


def _layers(model: HookedTransformer, layers: Sequence[int], what: str) -> list[int]:
    if isinstance(layers, int | str) or not isinstance(layers, Sequence):
        raise InputError(f"{what} is a sequence of layers (e.g. (10, 20)), got {layers!r}")
    out = [as_site(f"resid_post.{layer}", model).layer for layer in layers]
    if len(set(out)) != len(out):
        raise InputError(f"{what} lists a layer twice: {list(layers)}")
    return out


def _checked_targets(model: HookedTransformer, targets: Sequence[int], n: int) -> Tensor:
    if len(targets) != n:
        raise InputError(f"{n} prompts but {len(targets)} targets: give one answer token each")
    vocab = model.cfg.d_vocab
    for t in targets:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
            raise InputError(f"target {t!r} is not a token id in 0..{vocab - 1}")
    return torch.tensor(list(targets), device=model.cfg.device)


def _batches(tokens: list[Tensor], idx: list[int]) -> list[list[int]]:
    """``idx`` split into groups of equal prompt length (one forward pass each)."""
    groups: dict[int, list[int]] = {}
    for i in idx:
        groups.setdefault(len(tokens[i]), []).append(i)
    return list(groups.values())


def minibatches(n: int, batch_size: int, steps: int, seed: int = 0) -> list[list[int]]:
    """``steps`` minibatches of ``min(batch_size, n)`` indices into ``n`` prompts: the epochs'
    permutations (``torch.randperm`` from a generator seeded ``seed``) read in order, a
    minibatch running on into the next epoch where one ends.

    >>> minibatches(5, 2, 3)[0] != minibatches(5, 2, 3, seed=1)[0], len(minibatches(5, 2, 3))
    (True, 3)
    """
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    out = []
    for _ in range(steps):
        batch = []
        while len(batch) < min(batch_size, n):
            if not order:
                order = torch.randperm(n, generator=gen).tolist()
            batch.append(order.pop(0))
        out.append(batch)
    return out


def orthogonality_penalty(delta: Tensor, b: Tensor) -> Tensor:
    """The mean over the rows b_k of ``b`` of cos²(δ, b_k) (0 where a row or δ is zero)."""
    eps = torch.finfo(delta.dtype).eps
    d_hat = delta / delta.norm().clamp_min(eps)
    b_hat = b / b.norm(dim=-1, keepdim=True).clamp_min(eps)
    return (b_hat @ d_hat).pow(2).mean()


def joint_intervention(
    model: HookedTransformer,
    prompts: PromptsLike,
    targets: Sequence[int],
    *,
    shift_layers: Sequence[int],
    lora_layers: Sequence[int],
    lora_on: Sequence[str] = ("mlp",),
    rank: int = 4,
    steps: int = 200,
    batch_size: int = 8,
    lr_shift: float = 1e-2,
    lr_lora: float = 1e-3,
    orthogonality: float = 1.0,
    seed: int = 0,
    progress: bool = False,
) -> Intervention:
    """Train post-block shifts at ``shift_layers`` and rank-``rank`` updates of the ``lora_on``
    projections of ``lora_layers`` to predict ``targets[i]`` after ``prompts[i]`` (module
    docstring). ``info`` records the loss at the start and the end (the mean of the last ten
    steps; ``end_cross_entropy`` without the penalty), the parameters trained and the model's
    parameter count."""
    tokens = as_prompts(model, prompts)
    target_t = _checked_targets(model, targets, len(tokens))
    shift_at = _layers(model, shift_layers, "shift_layers")
    lora_at = _layers(model, lora_layers, "lora_layers")
    kinds = list(lora_on)
    if isinstance(lora_on, str) or not kinds or any(k not in PROJECTION_KINDS for k in kinds):
        raise InputError(f"lora_on is a sequence of {PROJECTION_KINDS}, got {lora_on!r}")
    if not shift_at and not lora_at:
        raise InputError("nothing to train: give shift_layers, lora_layers or both")
    if not isinstance(steps, int) or steps < 1 or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"need steps >= 1 and batch_size >= 1, got {steps} and {batch_size}")
    for name, value in (("lr_shift", lr_shift), ("lr_lora", lr_lora)):
        if not (math.isfinite(value) and value > 0):
            raise InputError(f"{name} must be a finite number > 0, got {value}")
    if not (math.isfinite(orthogonality) and orthogonality >= 0):
        raise InputError(f"orthogonality must be >= 0, got {orthogonality}")
    projections = [
        OutputProjection(layer, kind).validate(model)  # type: ignore[arg-type]
        for layer in lora_at
        for kind in dict.fromkeys(kinds)
    ]
    if lora_at:
        widest = min(min(p.d_in(model) for p in projections), model.cfg.d_model)
        if not isinstance(rank, int) or not 1 <= rank <= widest:
            raise InputError(f"rank must be an int in 1..{widest}, got {rank!r}")

    dtype, device = model.cfg.dtype, model.cfg.device
    gen = torch.Generator().manual_seed(seed)
    deltas = {
        layer: torch.zeros(model.cfg.d_model, dtype=dtype, device=device, requires_grad=True)
        for layer in shift_at
    }
    updates: dict[str, LowRankUpdate] = {}
    for proj in projections:
        d_in = proj.d_in(model)
        a = torch.randn(d_in, rank, generator=gen, dtype=torch.float64) / math.sqrt(d_in)
        b = torch.zeros(rank, model.cfg.d_model, dtype=dtype, device=device)
        updates[proj.name] = LowRankUpdate(
            a.to(dtype=dtype, device=device).requires_grad_(True), b.requires_grad_(True)
        )
    groups = [
        {"params": list(deltas.values()), "lr": lr_shift},
        {"params": [t for u in updates.values() for t in (u.a, u.b)], "lr": lr_lora},
    ]
    opt = torch.optim.Adam([g for g in groups if g["params"]])
    paired = [(deltas[p.layer], updates[p.name].b) for p in projections if p.layer in deltas]

    def shift_hook(delta: Tensor) -> Any:
        return lambda act, hook: act + delta.to(act.dtype)

    history: list[tuple[float, float]] = []
    with ExitStack() as stack, torch.enable_grad():
        stack.enter_context(
            hooked(
                model, [(f"blocks.{L}.hook_resid_post", shift_hook(d)) for L, d in deltas.items()]
            )
        )
        for name, update in updates.items():
            stack.enter_context(apply_update(model, name, update))
        grads = [p.requires_grad for p in model.parameters()]
        try:
            for p in model.parameters():
                p.requires_grad_(False)
            schedule = minibatches(len(tokens), batch_size, steps, seed)
            for batch in tqdm(schedule, disable=not progress, desc="joint adaptation"):
                opt.zero_grad()
                loss = torch.zeros((), dtype=torch.float64, device=device)
                for idx in _batches(tokens, batch):
                    logits = model(torch.stack([tokens[i] for i in idx]))[:, -1]
                    ce = F.cross_entropy(logits.double(), target_t[idx], reduction="sum")
                    loss = loss + ce / len(batch)
                ce = loss.detach()
                if paired:
                    penalty = torch.stack([orthogonality_penalty(d, b) for d, b in paired]).mean()
                    loss = loss + orthogonality * penalty.double()
                if not torch.isfinite(loss):
                    raise NonFiniteError(
                        f"joint adaptation: the loss is not finite at step {len(history)}; "
                        "lower lr_shift or lr_lora"
                    )
                loss.backward()
                opt.step()
                history.append((float(loss.detach()), float(ce)))
        finally:
            for p, g in zip(model.parameters(), grads, strict=True):
                p.requires_grad_(g)
    vectors = {
        as_site(f"resid_post.{L}@all", model).name: d.detach().clone() for L, d in deltas.items()
    }
    trained = {
        name: LowRankUpdate(u.a.detach().clone(), u.b.detach().clone())
        for name, u in updates.items()
    }
    n_trained = sum(d.numel() for d in deltas.values()) + sum(
        u.n_parameters for u in trained.values()
    )
    tail = history[-min(10, len(history)) :]
    info = {
        "paper": "arXiv 2603.00425 (joint adaptation)",
        "prompts": len(tokens),
        "steps": steps,
        "steps_done": len(history),
        "batch_size": batch_size,
        "rank": rank if trained else None,
        "lr_shift": lr_shift,
        "lr_lora": lr_lora,
        "orthogonality": orthogonality,
        "seed": seed,
        "start_loss": history[0][0],
        "end_loss": sum(h[0] for h in tail) / len(tail),
        "end_cross_entropy": sum(h[1] for h in tail) / len(tail),
        "trained_parameters": n_trained,
        "model_parameters": sum(p.numel() for p in model.parameters()),
    }
    return Intervention("joint", vectors, 1.0, info, weight_updates=trained)


def answer_accuracy(
    model: HookedTransformer,
    prompts: PromptsLike,
    targets: Sequence[int],
    intervention: Intervention | None = None,
    *,
    batch_size: int = 64,
) -> float:
    """The fraction of prompts whose likeliest next token (greedy, over the whole vocabulary)
    is their target, steered by ``intervention`` if given."""
    tokens = as_prompts(model, prompts)
    target_t = _checked_targets(model, targets, len(tokens))
    hits = 0
    with ExitStack() as stack, torch.no_grad():
        if intervention is not None:
            stack.enter_context(intervention.apply(model))
        for start in range(0, len(tokens), batch_size):
            for idx in _batches(tokens, list(range(start, min(start + batch_size, len(tokens))))):
                logits = model(torch.stack([tokens[i] for i in idx]))[:, -1]
                hits += int((logits.argmax(-1) == target_t[idx]).sum())
    return hits / len(tokens)


@dataclass(frozen=True)
class JointConfig:
    """``targets``: one answer token id per prompt; ``shift_layers``: the ``resid_post`` layers
    with a trained vector; ``lora_layers``: the layers whose ``lora_on`` output projections get
    a rank-``rank`` update (either may be empty, not both); Adam for ``steps`` minibatches of
    ``batch_size`` at ``lr_shift`` / ``lr_lora``, the ``orthogonality`` penalty's weight."""

    targets: Sequence[int]
    shift_layers: Sequence[int]
    lora_layers: Sequence[int]
    lora_on: Sequence[str] = ("mlp",)
    rank: int = 4
    steps: int = 200
    batch_size: int = 8
    lr_shift: float = 1e-2
    lr_lora: float = 1e-3
    orthogonality: float = 1.0
    seed: int = 0
    progress: bool = False


def _fit_joint(model: HookedTransformer, cfg: JointConfig, inputs: FitInputs) -> Intervention:
    assert inputs.prompt is not None
    return joint_intervention(
        model,
        inputs.prompt,
        cfg.targets,
        shift_layers=cfg.shift_layers,
        lora_layers=cfg.lora_layers,
        lora_on=cfg.lora_on,
        rank=cfg.rank,
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr_shift=cfg.lr_shift,
        lr_lora=cfg.lr_lora,
        orthogonality=cfg.orthogonality,
        seed=cfg.seed,
        progress=cfg.progress,
    )


register_method(
    MethodSpec(
        "joint",
        JointConfig,
        _fit_joint,
        needs=("prompt",),
        implicit_metric="none (trained on the answer's cross-entropy)",
        description="post-block vectors and low-rank output-projection updates trained together "
        "on a next-token task (adapted from Adila et al.'s joint adaptation: the paper's exact "
        "objective was not available, the orthogonality penalty is ours)",
    )
)
