"""The spectral cost ratio, its Kantorovich bound, ρ along a path and Fisher lengths
(``steerlens.diagnostics.cost`` and ``.path``), against dense linear algebra and closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from steerlens.concepts import PairConcept
from steerlens.diagnostics import (
    PathRho,
    fisher_length,
    fisher_rao,
    kantorovich_bound,
    optimal_quad,
    spectral_cost_ratio,
)
from steerlens.errors import InputError, MetricError
from steerlens.metric import Metric, pullback_metric
from steerlens.metric.local import LocalPath


def toy(seed: int, n_rows: int = 3, d: int = 6) -> tuple[Metric, torch.Tensor, torch.Tensor]:
    """A random rank-``n_rows`` metric on R^d, a gradient g and a direction v."""
    gen = torch.Generator().manual_seed(seed)
    b = torch.randn(n_rows, d, generator=gen, dtype=torch.float64)
    g = torch.randn(d, generator=gen, dtype=torch.float64)
    v = torch.randn(d, generator=gen, dtype=torch.float64)
    return Metric(b, "toy"), g, v


def damped(metric: Metric, damping: float) -> torch.Tensor:
    """G + λI with λ = damping·tr G/d, densely."""
    g = metric.matrix()
    return g + damping * torch.trace(g) / g.shape[0] * torch.eye(g.shape[0], dtype=g.dtype)


def random_pd(seed: int, d: int = 6) -> torch.Tensor:
    a = torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a @ a.T + 0.1 * torch.eye(d, dtype=torch.float64)


# ----------------------------------------------------------------------------- spectral_cost_ratio


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), damping=st.sampled_from([1e-3, 1e-2, 1e-1]))
def test_rho_at_least_one_and_one_for_fisher_optimal(seed, damping):
    metric, g, v = toy(seed)
    assume(abs(float(g @ v)) > 1e-9 * float(g.norm() * v.norm()))  # else ρ(v) is infinite
    assert spectral_cost_ratio(metric, v, g, damping) >= 1 - 1e-12
    best = metric.solve(g, damping)
    assert spectral_cost_ratio(metric, best, g, damping) == pytest.approx(1.0, abs=1e-10)
    # Kantorovich: Euclidean ascent never pays more than the bound
    assert spectral_cost_ratio(metric, g, g, damping) <= kantorovich_bound(metric, None, damping)


@pytest.mark.parametrize("seed", range(5))
def test_rho_is_the_dense_formula_and_ignores_the_step_size(seed):
    metric, g, v = toy(seed)
    a = damped(metric, 1e-2)
    want = float((v @ a @ v) * (g @ torch.linalg.solve(a, g)) / (g @ v) ** 2)
    assert spectral_cost_ratio(metric, v, g) == pytest.approx(want, rel=1e-10)
    assert spectral_cost_ratio(metric, -3.0 * v, g) == pytest.approx(want, rel=1e-10)
    best = optimal_quad(metric, g)
    assert spectral_cost_ratio(metric, v, g, best=best) == pytest.approx(want, rel=1e-10)


def test_rho_refuses_a_direction_that_does_not_move_the_concept():
    metric, g, _ = toy(0)
    with pytest.raises(InputError, match="zero direction"):
        spectral_cost_ratio(metric, torch.zeros(6, dtype=torch.float64), g)
    orthogonal = torch.tensor([g[1], -g[0], 0, 0, 0, 0], dtype=torch.float64)
    with pytest.raises(InputError, match="orthogonal"):
        spectral_cost_ratio(metric, orthogonal, g)


def test_rho_predicts_second_order_kl_ratio(model, tokens):
    """At a small matched concept change, KL(v)/KL(fisher-optimal) → ρ(v) (undamped limit)."""
    concept = PairConcept(base=3, target=7)
    site = "resid_post.0"
    with LocalPath(model, tokens, site) as path:
        x0 = path.x0
        with torch.enable_grad():
            x = x0.clone().requires_grad_(True)
            g = torch.autograd.grad(concept.value(None, path.logits(x)), x)[0]
        metric = pullback_metric(model, tokens, site, vocab="full", off_target=concept.off_target())
        keep = torch.ones(model.cfg.d_vocab, dtype=torch.bool)
        keep[[3, 7]] = False

        def off_kl(delta):
            with torch.no_grad():
                p = torch.log_softmax(path.logits(x0)[keep], -1)
                q = torch.log_softmax(path.logits(x0 + delta)[keep], -1)
            return float((p.exp() * (p - q)).sum())

        eps = 1e-4
        best = metric.solve(g, 1e-8)
        ratio = off_kl(eps * g / (g @ g)) / off_kl(eps * best / (g @ best))
    assert ratio == pytest.approx(spectral_cost_ratio(metric, g, g, 1e-8), rel=1e-3)


# ----------------------------------------------------------------------------- optimal_quad


@pytest.mark.parametrize("damping", [1e-3, 1e-1])
def test_optimal_quad_is_g_against_the_damped_inverse_in_float64(damping):
    metric, g, _ = toy(1)
    want = float(g @ torch.linalg.solve(damped(metric, damping), g))
    assert optimal_quad(metric, g, damping) == pytest.approx(want, rel=1e-10)
    g32 = g.float()  # promoted, so the answer keeps float64 digits
    want32 = float(g32.double() @ torch.linalg.solve(damped(metric, damping), g32.double()))
    assert optimal_quad(metric, g32, damping) == pytest.approx(want32, rel=1e-10)


# ----------------------------------------------------------------------------- kantorovich_bound


@pytest.mark.parametrize("seed", range(4))
def test_kantorovich_bound_by_generalized_eigenvalues(seed):
    metric, g, _ = toy(seed)
    implicit = random_pd(seed + 100)
    evals = torch.linalg.eigvals(torch.linalg.solve(implicit, damped(metric, 1e-2))).real
    kappa = float(evals.max() / evals.min())
    want = (kappa + 1) ** 2 / (4 * kappa)
    got = kantorovich_bound(metric, implicit, 1e-2)
    assert got == pytest.approx(want, rel=1e-8)
    # the method whose direction is M⁻¹g pays at most the bound, for any gradient
    for k in range(10):
        gk = torch.randn(6, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
        assert spectral_cost_ratio(metric, torch.linalg.solve(implicit, gk), gk) <= got * (1 + 1e-9)


def test_kantorovich_bound_edge_cases():
    metric, _, _ = toy(2)
    assert kantorovich_bound(metric, damped(metric, 1e-2), 1e-2) == pytest.approx(1.0, abs=1e-9)
    eye = torch.eye(6, dtype=torch.float64)
    assert kantorovich_bound(metric, eye, 1e-2) == pytest.approx(kantorovich_bound(metric))
    assert kantorovich_bound(metric, damping=0.0) == math.inf  # rank 3 of 6, undamped
    with pytest.raises(InputError, match=r"need \(6, 6\)"):
        kantorovich_bound(metric, torch.eye(5, dtype=torch.float64))
    with pytest.raises(MetricError, match="positive definite"):
        kantorovich_bound(metric, -eye)


# ----------------------------------------------------------------------------- PathRho


def test_path_rho_weighs_steps_by_concept_change_per_optimal_cost():
    constant = PathRho()
    for best, change in ((1.0, 0.5), (4.0, 2.0), (0.25, 1.0)):
        constant.add(3.0, best, change)
    assert constant.value() == pytest.approx(3.0, rel=1e-12)
    acc = PathRho()
    acc.add(9.0, 4.0, 2.0)  # weight 2/√4 = 1, √ρ = 3
    acc.add(1.0, 1.0, -1.0)  # weight 1, √ρ = 1: a fall counts by its size
    assert acc.value() == pytest.approx(((3 + 1) / 2) ** 2, rel=1e-12)


def test_path_rho_is_nan_without_steps_or_with_a_vanishing_gradient():
    assert math.isnan(PathRho().value())
    acc = PathRho()
    acc.add(2.0, 1.0, 1.0)
    acc.add(2.0, 0.0, 1.0)  # gᵀG⁻¹g = 0: the step's optimal cost is undefined
    assert math.isnan(acc.value())


# ----------------------------------------------------------------------------- Fisher–Rao, length


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_fisher_rao_is_twice_the_angle_between_root_distributions(seed):
    gen = torch.Generator().manual_seed(seed)
    p, q = (torch.softmax(3 * torch.randn(9, generator=gen, dtype=torch.float64), 0) for _ in "pq")
    want = 2 * math.acos(float((p * q).sqrt().sum()))
    assert fisher_rao(p, q) == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert fisher_rao(q, p) == pytest.approx(fisher_rao(p, q), rel=1e-12)
    # locally KL ≈ ½d²: a tiny step of p's logits
    r = torch.softmax(p.log() + 1e-4 * torch.randn(9, generator=gen, dtype=torch.float64), 0)
    kl_pr = float((p * (p / r).log()).sum())
    assert kl_pr == pytest.approx(0.5 * fisher_rao(p, r) ** 2, rel=1e-3)


def test_fisher_rao_extremes():
    p = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    assert fisher_rao(p, p) == 0.0
    near = torch.tensor([0.2 + 1e-12, 0.3 - 1e-12, 0.5], dtype=torch.float64)
    assert 0 < fisher_rao(p, near) < 1e-10  # no cancellation to 0 for close distributions
    disjoint = (torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    assert fisher_rao(*disjoint) == pytest.approx(math.pi, rel=1e-12)


def test_fisher_length_converges_from_below_to_the_integral():
    """Along p_t = softmax(t·a), t ∈ [0, 1], the Fisher information is Var_{p_t}(a): the length
    is ∫√Var_{p_t}(a) dt (here by Simpson's rule on a fine grid)."""
    a = torch.tensor([1.0, -0.5, 2.0, 0.3], dtype=torch.float64)

    def path(n: int) -> list[torch.Tensor]:
        return [torch.softmax(t * a, 0) for t in torch.linspace(0, 1, n, dtype=torch.float64)]

    t = torch.linspace(0, 1, 2001, dtype=torch.float64)
    p = torch.softmax(t[:, None] * a, 1)
    speed = ((p * a**2).sum(1) - (p * a).sum(1) ** 2).sqrt()
    weights = torch.ones_like(t)
    weights[1:-1:2], weights[2:-1:2] = 4, 2
    integral = float((weights * speed).sum() / (3 * (len(t) - 1)))
    lengths = [fisher_length(path(n)) for n in (2, 5, 50, 500)]
    assert lengths[0] == pytest.approx(fisher_rao(*path(2)), rel=1e-12)
    assert all(x < y for x, y in zip(lengths, lengths[1:], strict=False))
    assert lengths[-1] < integral
    assert lengths[-1] == pytest.approx(integral, rel=1e-5)


def test_fisher_length_of_fewer_than_two_points_is_zero():
    p = torch.tensor([0.5, 0.5], dtype=torch.float64)
    assert fisher_length([]) == 0.0
    assert fisher_length([p]) == 0.0
    assert fisher_length(iter([p, p, p])) == 0.0
