"""The spectral cost ratio of a steering direction, its Kantorovich bound, and ρ integrated
along a steering path (:class:`PathRho`); the Fisher length of a path of distributions is
:mod:`steerlens.diagnostics.path`'s.

For a concept with gradient g at a site with metric G (damped: G_λ = G + λI with
λ = ``damping``·tr G/d), a step v that changes the concept by ε costs ½ε²·vᵀG_λv/(gᵀv)² nats
of KL to second order; the cheapest direction is G_λ⁻¹g, costing ½ε²/(gᵀG_λ⁻¹g). Their ratio is

    ρ(v) = (vᵀG_λv)(gᵀG_λ⁻¹g) / (gᵀv)²  ≥ 1,  with equality iff v ∝ G_λ⁻¹g

(Cauchy–Schwarz in the G_λ inner product). The damping is part of the definition: with the same
λ the Fisher-optimal step has ρ = 1 exactly. A method whose direction is M⁻¹g (its implicit
metric M) pays at most the Kantorovich bound (κ+1)²/(4κ), κ the condition number of
M^{-½}G_λM^{-½}.

>>> import torch
>>> from steerlens.metric import Metric
>>> m = Metric(torch.diag(torch.tensor([2.0, 1.0], dtype=torch.float64)), "toy")  # G = diag(4, 1)
>>> g = torch.tensor([1.0, 1.0], dtype=torch.float64)
>>> round(spectral_cost_ratio(m, g, g, damping=0.0), 4)   # Euclidean: (5)(1.25)/4
1.5625
>>> round(spectral_cost_ratio(m, m.solve(g, 0.0), g, damping=0.0), 12)
1.0
>>> round(kantorovich_bound(m, damping=0.0), 4)            # κ = 4
1.5625
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from steerlens.errors import InputError, MetricError
from steerlens.metric.core import Metric


def spectral_cost_ratio(
    metric: Metric,
    v: Float[Tensor, " d"],
    g: Float[Tensor, " d"],
    damping: float = 1e-2,
    *,
    best: float | None = None,
) -> float:
    """ρ(v) for concept gradient ``g`` in the damped metric (see the module docstring).
    ``best``: gᵀG_λ⁻¹g where the caller already has it (one damped solve saved per direction).
    Raises :class:`InputError` if v does not move the concept (gᵀv = 0)."""
    v64, g64 = v.double(), g.double()
    if float(v64.norm()) == 0 or float(g64.norm()) == 0:
        raise InputError("spectral cost ratio of a zero direction or a zero gradient")
    lam = metric.damping_value(damping)
    gv = float(g64 @ v64)
    if gv == 0:
        raise InputError("the direction is orthogonal to the concept gradient: ρ is infinite")
    cost = float(metric.quad(v64).double()) + lam * float(v64 @ v64)
    if best is None:
        best = optimal_quad(metric, g64, damping)
    return cost * best / gv**2


def optimal_quad(metric: Metric, g: Float[Tensor, " d"], damping: float = 1e-2) -> float:
    """gᵀG_λ⁻¹g in float64 (g and the solve promoted; :meth:`Metric.pinv_quad` works in the
    metric's dtype): the concept change per unit of off-target cost of the best direction, the
    ``best`` of :func:`spectral_cost_ratio`."""
    g64 = g.double()
    return float((g64 * metric.solve(g64, damping).double()).sum())


def kantorovich_bound(
    metric: Metric, implicit: Float[Tensor, "d d"] | None = None, damping: float = 1e-2
) -> float:
    """(κ+1)²/(4κ) with κ = cond(M^{-½}G_λM^{-½}); ``implicit`` M defaults to the identity
    (Euclidean gradient ascent). Infinite when κ is (an undamped singular metric)."""
    lam = metric.damping_value(damping)
    g = metric.matrix().double()
    g = g + lam * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    if implicit is not None:
        m = implicit.double()
        if m.shape != g.shape:
            raise InputError(f"implicit metric has shape {tuple(m.shape)}, need {tuple(g.shape)}")
        evals, evecs = torch.linalg.eigh((m + m.T) / 2)
        if float(evals.min()) <= 0:
            raise MetricError("the implicit metric must be positive definite")
        inv_sqrt = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
        g = inv_sqrt @ g @ inv_sqrt
    evals = torch.linalg.eigvalsh((g + g.T) / 2)
    lo, hi = float(evals.min()), float(evals.max())
    if lo <= 0:
        return float("inf")
    kappa = hi / lo
    return (kappa + 1) ** 2 / (4 * kappa)


@dataclass
class PathRho:
    """ρ integrated along a steering path. At each step t of the path (concept change Δc_t,
    damped metric G_t, gradient g_t), the Fisher-optimal direction costs √κ*_t of Fisher length
    per unit of concept, κ*_t = 1/(g_tᵀG_t⁻¹g_t), and a direction v_t costs √(ρ_t(v_t)κ*_t).
    The ratio of the two lengths over the path, squared, is the second-order KL ratio of moving
    the concept along the same ladder in v's direction rather than the optimal one:

        ρ_path = (Σ_t Δc_t √(ρ_t κ*_t) / Σ_t Δc_t √κ*_t)²

    It equals ρ when ρ_t is constant and weighs each step by where the concept actually moves;
    steps where v does not raise the concept (ρ_t undefined) make it NaN.

    >>> acc = PathRho()
    >>> acc.add(4.0, 1.0, 1.0); acc.add(1.0, 1.0, 1.0)
    >>> acc.value()   # ((2 + 1) / 2)²
    2.25
    """

    num: float = 0.0
    den: float = 0.0

    def add(self, rho: float, best: float, change: float) -> None:
        """One step: ρ_t, g_tᵀG_t⁻¹g_t and Δc_t."""
        weight = abs(change) / math.sqrt(best) if best > 0 else math.nan
        self.num += weight * math.sqrt(rho)
        self.den += weight

    def value(self) -> float:
        return (self.num / self.den) ** 2 if self.den > 0 else math.nan
