"""Weight updates as activation shifts at the post-block site, and back (Adila, Cooper, Yun, Trost
and Sala, *Weight Updates as Activation Shifts: A Principled Framework for Steering*, arXiv
2603.00425, 2026: its first-order equivalence, for a block's output projections).

A small update W → W + ΔW (and b → b + Δb) of block L's output projection (attention's ``W_O``
or the MLP's ``W_out``, :class:`~steerlens.methods.lowrank.OutputProjection`) moves the residual
stream after block ``at`` ≥ L (``hook_resid_post``, the post-block site) by

    δh_p = J_p (x_p ΔW + Δb) + O(‖ΔW‖²)      at each position p of each prompt,

x_p the projection's input at p and J_p the derivative of ``resid_post.at`` with respect to the
projection's output (all positions' outputs feed position p's residual through attention; the
forward-mode pass below carries them all). For the MLP's ``W_out`` read at its own block
(``at = L``) nothing after the projection comes before the site: J = I and the shift x ΔW + Δb
is the exact change, not only its first order; a bias Δb alone is one constant vector, the
exact bias edit of :func:`~steerlens.methods.postblock.bias_edit`. Everything downstream of
``resid_post.at`` sees only that activation, so adding the per-position shifts there reproduces
the edited model's outputs up to O(‖ΔW‖²), and exactly where the shift is exact.

- :func:`shift_from_weight_update`: the shifts δh (one forward-mode pass per prompt length),
  their mean (the constant post-block vector, :meth:`UpdateShift.as_intervention`) and whether
  they are exact;
- :func:`weight_update_from_shift`: the least-squares ΔW of block L's projection whose induced
  first-order shift at ``resid_post.L`` best matches given shifts over prompts (closed form for
  ``W_out``, optionally reduced-rank; conjugate gradients through the MLP for ``W_O``);
- :func:`apply_shift`: add one prompt's per-position shifts at the site, inside a block.

>>> import copy, torch
>>> from steerlens.testing import tiny_model
>>> model = tiny_model()
>>> prompts = [torch.tensor([1, 2, 3, 4])]
>>> dW = 1e-3 * torch.randn(32, 16, generator=torch.Generator().manual_seed(0),
...                         dtype=torch.float64)
>>> shift = shift_from_weight_update(model, 1, dW, prompts)        # W_out of block 1
>>> shift.exact, shift.shifts[0].shape
(True, torch.Size([4, 16]))
>>> edited = copy.deepcopy(model)
>>> with torch.no_grad():
...     _ = edited.blocks[1].mlp.W_out.add_(dW)
>>> with apply_shift(model, 1, shift.shifts[0]):
...     steered = model(prompts[0][None])
>>> bool((steered - edited(prompts[0][None])).abs().max() < 1e-10)
True
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.autograd.forward_ad as fwad
from jaxtyping import Float
from torch import Tensor

from steerlens.errors import InputError, MethodError, NonFiniteError, SiteError
from steerlens.hooks import hooked
from steerlens.methods.intervention import Intervention
from steerlens.methods.lowrank import (
    LowRankUpdate,
    OutputProjection,
    ProjectionKind,
    check_delta,
)
from steerlens.metric.autodiff import load_forward_ad
from steerlens.prompts import PromptsLike, as_prompts
from steerlens.sites import as_site

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer


@dataclass(frozen=True)
class UpdateShift:
    """The activation shift at ``site`` (``blocks.<at>.hook_resid_post@all``) of a weight update
    of ``projection``: ``shifts[i]`` ``[pos, d_model]`` for prompt i; ``exact`` when it is the
    exact change (W_out read at its own block), else the first-order one."""

    projection: str
    site: str
    shifts: tuple[Float[Tensor, "_pos d_model"], ...]
    exact: bool

    @property
    def mean(self) -> Float[Tensor, " d_model"]:
        """The mean shift over every position of every prompt: the constant post-block vector
        nearest the shifts in mean square."""
        return torch.cat(list(self.shifts)).mean(0)

    def as_intervention(self, method: str = "weight_shift") -> Intervention:
        """The mean shift as a post-block vector at every position."""
        info = {"projection": self.projection, "exact": self.exact, "prompts": len(self.shifts)}
        return Intervention(method, {self.site: self.mean}, 1.0, info)


@dataclass(frozen=True)
class ShiftFit:
    """The least-squares ΔW (``delta``, ``[d_in, d_model]``) of ``projection`` for given shifts at
    ``site``; ``rank`` its rank constraint (None: unconstrained); ``relative_residual``
    ‖induced − given‖ / ‖given‖ over the ``n_positions`` positions; ``iterations`` of conjugate
    gradients (0 for the closed form)."""

    projection: str
    site: str
    delta: Float[Tensor, "d_in d_model"]
    rank: int | None
    relative_residual: float
    n_positions: int
    iterations: int

    def as_low_rank(self) -> LowRankUpdate:
        """``delta`` factored as a :class:`LowRankUpdate` (of ``rank``, or full rank)."""
        rank = self.rank if self.rank is not None else min(self.delta.shape)
        return LowRankUpdate.from_delta(self.delta, rank)

    def as_intervention(self, method: str = "shift_fit") -> Intervention:
        """The fitted update as an intervention (applied through hooks, not to the weights)."""
        info = {"site": self.site, "relative_residual": self.relative_residual}
        return Intervention(
            method, {}, 1.0, info, weight_updates={self.projection: self.as_low_rank()}
        )


def _projection(model: HookedTransformer, layer: int, kind: str) -> OutputProjection:
    return OutputProjection(layer, kind).validate(model)  # type: ignore[arg-type]


def _at_layer(model: HookedTransformer, proj: OutputProjection, at: int | None) -> int:
    if at is None:
        return proj.layer
    site = as_site(f"resid_post.{at}", model)
    if site.layer < proj.layer:
        raise SiteError(
            f"resid_post.{at} comes before {proj.name}: the shift of an update of block "
            f"{proj.layer} is read at resid_post of a layer in "
            f"{proj.layer}..{model.cfg.n_layers - 1}"
        )
    return site.layer


def _groups(tokens: list[Tensor]) -> dict[int, list[int]]:
    """Prompt indices by length, so that equal-length prompts run as one batch."""
    groups: dict[int, list[int]] = {}
    for i, t in enumerate(tokens):
        groups.setdefault(len(t), []).append(i)
    return groups


def _tangents(
    model: HookedTransformer,
    proj: OutputProjection,
    at: int,
    tokens: list[Tensor],
    tangent_of: Any,
) -> list[Tensor]:
    """Per prompt, the forward-mode derivative of ``resid_post.at`` ``[pos, d_model]`` when the
    projection's output at each position moves by ``tangent_of(x)`` (x its ``[..., pos, d_in]``
    input)."""
    load_forward_ad()
    out: list[Tensor | None] = [None] * len(tokens)
    kept: dict[str, Tensor] = {}
    read: dict[str, Tensor] = {}

    def keep(act: Tensor, hook: object) -> None:
        kept["x"] = proj.flat_input(fwad.unpack_dual(act).primal)

    def push(act: Tensor, hook: object) -> Tensor:
        return act + fwad.make_dual(torch.zeros_like(act), tangent_of(kept.pop("x")).to(act))

    def grab(act: Tensor, hook: object) -> None:
        tangent = fwad.unpack_dual(act).tangent
        read["t"] = torch.zeros_like(act) if tangent is None else tangent

    fwd = [
        (proj.input_hook, keep),
        (proj.output_hook, push),
        (f"blocks.{at}.hook_resid_post", grab),
    ]
    with torch.no_grad(), hooked(model, fwd):
        for idx in _groups(tokens).values():
            with fwad.dual_level():
                model(torch.stack([tokens[i] for i in idx]), stop_at_layer=at + 1)
                for row, i in enumerate(idx):
                    out[i] = read["t"][row].clone()
    return [t for t in out if t is not None]


def shift_from_weight_update(
    model: HookedTransformer,
    layer: int,
    delta_W: Tensor | None,
    prompts: PromptsLike,
    *,
    kind: ProjectionKind = "mlp",
    delta_b: Float[Tensor, " d_model"] | None = None,
    at: int | None = None,
) -> UpdateShift:
    """The shift at ``resid_post.at`` (default: block ``layer``'s own) of the update ``delta_W``
    (``[d_in, d_model]``; W_O's ``[n_heads, d_head, d_model]`` too) and/or ``delta_b``
    (``[d_model]``) of block ``layer``'s ``kind`` projection, on each prompt: the exact change
    for W_out at its own block, else the first-order one (module docstring)."""
    proj = _projection(model, layer, kind)
    at_layer = _at_layer(model, proj, at)
    if delta_W is None and delta_b is None:
        raise InputError("give delta_W (a weight update), delta_b (a bias update) or both")
    dtype = model.cfg.dtype
    dw = None if delta_W is None else check_delta(delta_W, proj, model, "delta_W").to(dtype)
    db = None
    if delta_b is not None:
        if not isinstance(delta_b, Tensor) or delta_b.shape != (model.cfg.d_model,):
            shape = tuple(delta_b.shape) if isinstance(delta_b, Tensor) else type(delta_b)
            raise InputError(
                f"delta_b must be a [{model.cfg.d_model}] tensor (d_model), got {shape}"
            )
        if not torch.isfinite(delta_b).all():
            raise NonFiniteError("delta_b contains NaN or inf")
        db = delta_b.to(dtype)

    def tangent_of(x: Tensor) -> Tensor:
        t = torch.zeros(*x.shape[:-1], model.cfg.d_model, dtype=x.dtype, device=x.device)
        if dw is not None:
            t = t + x @ dw.to(x)
        if db is not None:
            t = t + db.to(x)
        return t

    tokens = as_prompts(model, prompts)
    shifts = _tangents(model, proj, at_layer, tokens, tangent_of)
    return UpdateShift(
        proj.name,
        as_site(f"resid_post.{at_layer}@all", model).name,
        tuple(shifts),
        exact=kind == "mlp" and at_layer == proj.layer,
    )


@contextmanager
def apply_shift(
    model: HookedTransformer, at: int, shift: Float[Tensor, "*batch pos d_model"]
) -> Iterator[HookedTransformer]:
    """While inside the block, add ``shift`` (``[pos, d_model]``, the same for every row of a
    batch, or ``[batch, pos, d_model]``) at ``resid_post.at``; a forward pass of another length
    is an :class:`InputError`."""
    site = as_site(f"resid_post.{at}@all", model)
    d_model = model.cfg.d_model
    if not isinstance(shift, Tensor) or shift.dim() not in (2, 3) or shift.shape[-1] != d_model:
        shape = tuple(shift.shape) if isinstance(shift, Tensor) else type(shift).__name__
        raise InputError(f"a shift is [pos, {d_model}] or [batch, pos, {d_model}], got {shape}")
    if not torch.isfinite(shift).all():
        raise NonFiniteError(f"the shift at {site.name} contains NaN or inf")

    def hook(act: Tensor, hook: object) -> Tensor:
        if act.shape[1] != shift.shape[-2] or (shift.dim() == 3 and act.shape[0] != shift.shape[0]):
            raise InputError(
                f"the shift covers {tuple(shift.shape[:-1])} (batch, pos) but the forward pass at "
                f"{site.name} has {tuple(act.shape[:2])}"
            )
        return act + shift.to(act)

    with hooked(model, [(site.hook_name, hook)]):
        yield model


def _given_shifts(shift: Any, tokens: list[Tensor], d_model: int) -> list[Tensor]:
    """The target shifts per prompt, ``[pos, d_model]`` each (one ``[d_model]`` vector: the same
    at every position)."""
    if isinstance(shift, UpdateShift):
        shift = list(shift.shifts)
    if isinstance(shift, Tensor) and shift.shape == (d_model,):
        return [shift.expand(len(t), d_model) for t in tokens]
    if not isinstance(shift, Sequence) or isinstance(shift, str) or len(shift) != len(tokens):
        n = len(shift) if isinstance(shift, Sequence) else type(shift).__name__
        raise InputError(
            f"give one [pos, {d_model}] shift per prompt ({len(tokens)} prompts, got {n}) or "
            f"one [{d_model}] vector for every position"
        )
    for i, (s, t) in enumerate(zip(shift, tokens, strict=True)):
        if not isinstance(s, Tensor) or tuple(s.shape) != (len(t), d_model):
            shape = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
            raise InputError(
                f"shift {i} has shape {shape} but prompt {i} needs ({len(t)}, {d_model})"
            )
        if not torch.isfinite(s).all():
            raise NonFiniteError(f"shift {i} contains NaN or inf")
    return list(shift)


def _inputs(model: HookedTransformer, proj: OutputProjection, tokens: list[Tensor]) -> Tensor:
    """The projection's inputs at every position of every prompt, ``[n, d_in]``, in prompt
    order."""
    out: list[Tensor | None] = [None] * len(tokens)
    kept: dict[str, Tensor] = {}

    def keep(act: Tensor, hook: object) -> None:
        kept["x"] = proj.flat_input(act)

    with torch.no_grad(), hooked(model, [(proj.input_hook, keep)]):
        for idx in _groups(tokens).values():
            model(torch.stack([tokens[i] for i in idx]), stop_at_layer=proj.layer + 1)
            for row, i in enumerate(idx):
                out[i] = kept["x"][row]
    return torch.cat([x for x in out if x is not None])


def _output_jacobians(
    model: HookedTransformer, proj: OutputProjection, tokens: list[Tensor]
) -> Float[Tensor, "n d_model d_model"]:
    """At every position p of every prompt (in prompt order), J_p = ∂ resid_post_p / ∂ y_p, y
    the projection's output in the same block: one forward-mode pass per residual direction.
    Only the block's MLP half, which acts position by position, lies between y and the site,
    so the tangent e_k at every position at once gives column k of every J_p."""
    d_model = model.cfg.d_model
    columns = []
    for k in range(d_model):
        unit = torch.zeros(d_model, dtype=model.cfg.dtype, device=model.cfg.device)
        unit[k] = 1.0

        def tangent_of(x: Tensor, unit: Tensor = unit) -> Tensor:
            return unit.to(x).expand(*x.shape[:-1], d_model)

        columns.append(torch.cat(_tangents(model, proj, proj.layer, tokens, tangent_of)))
    return torch.stack(columns, -1)


def _kronecker_inverse(gx: Tensor, gj: Tensor, ridge: float) -> Any:
    """R ↦ the solution W of gx W gj + ridge W = R (through both eigendecompositions): the
    preconditioner of the conjugate gradients, exact when J_p is the same at every position."""
    lx, ux = torch.linalg.eigh(gx)
    lj, uj = torch.linalg.eigh(gj)
    scale = lx.clamp_min(0)[:, None] * lj.clamp_min(0)[None, :] + ridge
    scale = scale.clamp_min(1e-12 * float(scale.max()))
    return lambda r: ux @ ((ux.T @ r @ uj) / scale) @ uj.T


def weight_update_from_shift(
    model: HookedTransformer,
    layer: int,
    shift: Any,
    prompts: PromptsLike,
    *,
    kind: ProjectionKind = "mlp",
    rank: int | None = None,
    ridge: float = 0.0,
    tol: float = 1e-10,
    max_iter: int = 2000,
) -> ShiftFit:
    """The ΔW of block ``layer``'s ``kind`` projection minimizing Σ_p ‖δh_p(ΔW) − s_p‖² +
    ``ridge``·‖ΔW‖²_F over every position p of ``prompts``, δh the first-order shift it induces
    at ``resid_post.layer`` and s the given ``shift`` (one ``[pos, d_model]`` tensor per prompt,
    an :class:`UpdateShift`, or one ``[d_model]`` vector meant at every position).

    ``kind="mlp"``: δh = x ΔW, ordinary (ridge) least squares in closed form; with ``rank`` the
    optimal rank-constrained ΔW (reduced-rank regression: the fit projected on the top ``rank``
    right singular vectors of its fitted shifts). ``kind="attn"``: δh_p = J_p (x_p ΔW) passes
    through the MLP half, J_p its Jacobian at p (d_model forward-mode passes), and the normal
    equations are solved by conjugate gradients (preconditioned by their Kronecker
    approximation, Σ x_pᵀx_p ⊗ mean JᵀJ) to a relative residual of ``tol``, a
    :class:`MethodError` past ``max_iter``; ``rank`` truncates that solution's SVD (not the
    rank-constrained optimum)."""
    proj = _projection(model, layer, kind)
    if ridge < 0 or not tol > 0 or max_iter < 1:
        raise InputError(f"need ridge >= 0, tol > 0, max_iter >= 1; got {ridge}, {tol}, {max_iter}")
    d_in, d_model = proj.d_in(model), model.cfg.d_model
    if rank is not None and not (isinstance(rank, int) and 1 <= rank <= min(d_in, d_model)):
        raise InputError(f"rank must be None or an int in 1..{min(d_in, d_model)}, got {rank!r}")
    tokens = as_prompts(model, prompts)
    given = [s.to(model.cfg.dtype) for s in _given_shifts(shift, tokens, d_model)]
    target = torch.cat(given)
    norm = float(target.norm())
    if norm == 0:
        raise InputError("the given shifts are all zero: their least-squares update is ΔW = 0")
    iterations = 0
    if kind == "mlp":
        x = _inputs(model, proj, tokens)
        if ridge > 0:
            eye = torch.eye(d_in, dtype=x.dtype, device=x.device)
            delta = torch.linalg.solve(x.T @ x + ridge * eye, x.T @ target)
        else:
            delta = torch.linalg.lstsq(
                x, target, driver="gelsd" if x.device.type == "cpu" else None
            )
            delta = delta.solution
        if rank is not None:
            v = torch.linalg.svd(x @ delta, full_matrices=False).Vh[:rank]
            delta = delta @ v.T @ v
        fitted = x @ delta
    else:
        x, jac = _inputs(model, proj, tokens), _output_jacobians(model, proj, tokens)

        def induced(dw: Tensor) -> Tensor:
            return torch.einsum("ni,ij,nkj->nk", x, dw, jac)

        def normal(dw: Tensor) -> Tensor:
            return torch.einsum("ni,nk,nkj->ij", x, induced(dw), jac) + ridge * dw

        rhs = torch.einsum("ni,nk,nkj->ij", x, target, jac)
        precondition = _kronecker_inverse(
            x.T @ x, torch.einsum("nkj,nkl->jl", jac, jac) / len(x), ridge
        )
        delta = torch.zeros_like(rhs)
        res = rhs.clone()
        z = precondition(res)
        direction = z.clone()
        rz, stop = float((res * z).sum()), tol * float(rhs.norm())
        while float(res.norm()) > stop:
            if iterations >= max_iter:
                raise MethodError(
                    f"conjugate gradients for {proj.name} did not converge in {max_iter} "
                    f"iterations (relative residual {float(res.norm() / rhs.norm()):.2e} > tol "
                    f"{tol}): raise max_iter or ridge, or give more positions"
                )
            applied = normal(direction)
            step = rz / float((direction * applied).sum())
            delta = delta + step * direction
            res = res - step * applied
            z = precondition(res)
            rz, before = float((res * z).sum()), rz
            direction = z + (rz / before) * direction
            iterations += 1
        if rank is not None:
            delta = LowRankUpdate.from_delta(delta, rank).delta()
        fitted = induced(delta)
    return ShiftFit(
        proj.name,
        as_site(f"resid_post.{proj.layer}@all", model).name,
        delta,
        rank,
        float((fitted - target).norm()) / norm,
        int(target.shape[0]),
        iterations,
    )
