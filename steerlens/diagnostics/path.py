"""Lengths of steering paths in the Fisher geometry of the next-token distribution: the
Fisher–Rao distance between two distributions (:func:`fisher_rao`), the length of a sampled path
of them (:func:`fisher_length`), and the length of the path an intervention walks from the clean
model (:func:`path_length`), read off the model with :func:`next_logprobs`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from steerlens import _tl
from steerlens.errors import InputError
from steerlens.metric.local import LOCAL_KINDS, LocalPath
from steerlens.metric.outcomes import OffTarget, outcome_distribution
from steerlens.sites import Site, as_site

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer
    from steerlens.methods.intervention import Intervention


def fisher_rao(p: Float[Tensor, " n"], q: Float[Tensor, " n"]) -> float:
    """The Fisher–Rao distance between two distributions on the same outcomes: the geodesic
    length, in the metric Σ dp²/p whose local KL is ½ds², from p to q, 2·arccos Σ√(pq),
    computed as 4·arcsin(‖√p − √q‖/2) so that close distributions keep their digits.

    >>> p = torch.tensor([0.5, 0.5], dtype=torch.float64)
    >>> round(fisher_rao(p, torch.tensor([1.0, 0.0], dtype=torch.float64)), 6)  # 2·(π/4)
    1.570796
    """
    chord = (p.double().clamp_min(0).sqrt() - q.double().clamp_min(0).sqrt()).norm()
    return 4 * math.asin(min(1.0, float(chord) / 2))


def fisher_length(distributions: Iterable[Float[Tensor, " n"]]) -> float:
    """The Fisher length of a path sampled at ``distributions`` (in order): the sum of the
    :func:`fisher_rao` distances between neighbours, which converges from below to
    ∫√(ẋᵀG(x)ẋ)dt, G the Fisher metric of the distribution pulled back to the path, as the
    samples get denser. For a steering path, (length / FishBack's length)² is ρ along the
    method's own path; ½·length² is its second-order off-target KL if the path were straight
    in the Fisher geometry.

    >>> ps = [torch.tensor([1 - t, t], dtype=torch.float64) for t in (0.2, 0.35, 0.5)]
    >>> abs(fisher_length(ps) - fisher_rao(ps[0], ps[-1])) < 1e-12   # a geodesic: additive
    True
    """
    total, previous = 0.0, None
    for current in distributions:
        if previous is not None:
            total += fisher_rao(previous, current)
        previous = current
    return total


@torch.no_grad()
def next_logprobs(
    model: HookedTransformer, tokens: Tensor, intervention: Intervention | None = None
) -> Float[Tensor, " d_vocab"]:
    """log p of the next token after ``tokens`` (float64), optionally steered (the
    unembedding run at the last position only: :func:`steerlens._tl.last_logits`)."""
    batch = tokens.view(1, -1)
    if intervention is None:
        return torch.log_softmax(_tl.last_logits(model, batch)[0].double(), -1)
    with intervention.apply(model):
        return torch.log_softmax(_tl.last_logits(model, batch)[0].double(), -1)


def path_length(
    model: HookedTransformer,
    tokens: Tensor,
    intervention: Intervention,
    off_target: OffTarget | None = None,
    *,
    path: Float[Tensor, "n_points d_model"] | None = None,
    points: int = 16,
    sub: int = 2,
) -> float:
    """The Fisher length (:func:`fisher_length`) of the next-token distribution,
    after ``off_target``'s transform, along the path that brings the model from clean to
    ``intervention``: an iterative method's recorded ``path`` (its
    :class:`~steerlens.methods.run.SteeringRun`'s ``path``, or ``path_to`` a checkpoint: the
    points from 0 to the vector it applies, at one residual site at the last position; each
    segment sampled at
    ``sub`` evenly spaced points, through the blocks after the site only:
    :class:`~steerlens.metric.local.LocalPath`), otherwise the ray of its scale, s from 0 to
    ``intervention.scale`` at ``points`` evenly spaced points. Either starts at the unsteered
    model (for a clamp, scale 0 is not the clean model). (length / FishBack's)² is ρ along the
    method's own path: the matched protocol's ``rho_own``.

    >>> from steerlens.methods import Intervention
    >>> from steerlens.testing import tiny_model
    >>> model = tiny_model()
    >>> v = torch.ones(model.cfg.d_model, dtype=torch.float64)
    >>> iv = Intervention("v", {"blocks.1.hook_resid_pre": v})
    >>> tokens = torch.tensor([1, 2, 3])
    >>> round(path_length(model, tokens, iv.scaled(0.0)), 12)  # float noise at most
    0.0
    >>> path_length(model, tokens, iv) >= path_length(model, tokens, iv, points=1)  # chord
    True
    """
    if points < 1 or sub < 1:
        raise InputError(f"points and sub must be >= 1, got points={points}, sub={sub}")
    if path is None and local_vector(intervention, model) is not None:
        # one @last residual vector: its ray is a path through the blocks after the site
        applied = intervention.vector()  # scale × vector
        ts = torch.linspace(0, 1, points + 1, dtype=applied.dtype, device=applied.device)
        path, sub = ts[:, None] * applied, 1
    if path is None:  # from the unsteered model: a clamp at scale 0 is not clean
        scales = [intervention.scale * k / points for k in range(points + 1)]
        logps = [next_logprobs(model, tokens)]
        logps += [next_logprobs(model, tokens, intervention.scaled(s)) for s in scales]
        return fisher_length(outcome_distribution(lp, off_target) for lp in logps)
    site, path = _recorded_site(intervention, path)
    ends = zip(path[:-1], path[1:], strict=True)
    samples = [path[0]] + [a + (b - a) * (k / sub) for a, b in ends for k in range(1, sub + 1)]
    # only the blocks after the site, at the last position: a fraction of a forward pass; the
    # path starts at δ = 0, the clean model
    with LocalPath(model, tokens, site) as local, torch.no_grad():
        x0 = local.x0
        logits = local.batched(local.logits, x0 + torch.stack(samples).to(x0))
        return fisher_length(outcome_distribution(row, off_target) for row in logits)


def local_vector(iv: Intervention, model: HookedTransformer) -> tuple[Site, Tensor] | None:
    """The site and vector of ``iv`` if all it does is add one vector to the residual stream at
    the prediction position (``@last``), where the blocks after the site at that position
    (:class:`~steerlens.metric.local.LocalPath`) give its outcome exactly; else None."""
    if not _only_one_vector(iv):
        return None
    spec, vector = next(iter(iv.vectors.items()))
    site = as_site(spec, model)
    if site.kind not in LOCAL_KINDS or site.position != "last":
        return None
    return site, vector


def _only_one_vector(iv: Intervention) -> bool:
    """Whether all ``iv`` does is add one vector: no multipliers, clamps or weight updates."""
    return len(iv.vectors) == 1 and not (iv.multipliers or iv.clamps or iv.weight_updates)


def _recorded_site(intervention: Intervention, recorded: Tensor) -> tuple[str, Tensor]:
    """The one site of an intervention whose recorded path is walked, and the path, after
    checking that it starts clean and ends at the vector the intervention applies."""
    name = intervention.method
    if not _only_one_vector(intervention):
        raise InputError(
            f"{name}: a recorded path walks one vector site; this intervention has "
            f"{len(intervention.vectors)} vectors, {len(intervention.multipliers)} multipliers, "
            f"{len(intervention.clamps)} clamps and {len(intervention.weight_updates)} weight "
            "updates"
        )
    site, vector = next(iter(intervention.vectors.items()))
    if recorded.ndim != 2 or recorded.shape[0] < 1 or recorded.shape[1] != vector.shape[0]:
        raise InputError(
            f"{name}: a recorded path is (points, {vector.shape[0]}) with at least one point, "
            f"got shape {tuple(recorded.shape)}"
        )
    recorded = recorded.to(vector)
    start, end = recorded[0], recorded[-1]
    applied = intervention.scale * vector
    tol = 1e-6 * max(float(applied.norm()), 1.0)
    if float(start.norm()) > tol or float((end - applied).norm()) > tol:
        raise InputError(
            f"{name}: the recorded path must start at 0 and end at the vector the intervention "
            f"applies (scale × vector); it ends {float((end - applied).norm()):.3g} away. A "
            "rescaled or edited intervention is not at the end of its run's path: pass no path "
            "to measure the ray of its scale instead"
        )
    return site, recorded
