"""Property-based tests (hypothesis) of the metric on tiny float64 models: over random prompts,
sites, concepts and directions,

- G ⪰ 0 at every site kind;
- ρ(v) ≥ 1 for any direction that moves the concept, and ρ = 1 for the Fisher-optimal one;
- the coarse-grained (top-K + rest) metric is ⪯ the full one;
- the sweep's metric at a site equals the direct whole-graph pullback (one VJP per factor row).
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from steerlens.concepts import PairConcept
from steerlens.diagnostics import concept_gradients, spectral_cost_ratio
from steerlens.metric import pullback_metric, pullback_sweep
from steerlens.metric.direct import direct_rows
from steerlens.metric.pullback import MetricOptions, lens_rows
from steerlens.metric.state import prompt_state
from steerlens.sites import Site
from steerlens.testing import tiny_model
from tests.conftest import DEVICE

MODELS = {f: tiny_model(f, device=DEVICE) for f in ("gpt2", "llama")}
VOCAB = 48
KINDS = ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "mlp_pre", "z"]
SETTINGS = settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


@st.composite
def cases(draw):
    """A model flavour, a prompt, a site (kind, layer, head for per-head sites)."""
    flavour = draw(st.sampled_from(sorted(MODELS)))
    model = MODELS[flavour]
    n = draw(st.integers(2, 12))
    tokens = torch.tensor(draw(st.lists(st.integers(0, VOCAB - 1), min_size=n, max_size=n)))
    kind = draw(st.sampled_from(KINDS))
    layer = draw(st.integers(0, model.cfg.n_layers - 1))
    head = draw(st.integers(0, model.cfg.n_heads - 1)) if kind == "z" else None
    return model, tokens, Site(kind, layer, head=head)


def _psd_gap(a: torch.Tensor, scale: torch.Tensor) -> float:
    """The smallest eigenvalue of ``a`` relative to ``scale``'s norm."""
    return float(torch.linalg.eigvalsh((a + a.T) / 2).min() / scale.norm().clamp_min(1e-300))


@SETTINGS
@given(case=cases())
def test_metric_is_positive_semidefinite(case):
    model, tokens, site = case
    g = pullback_metric(model, tokens, site, vocab="full").matrix()
    assert _psd_gap(g, g) > -1e-10


@SETTINGS
@given(case=cases(), dropped=st.sampled_from([0.3, 0.1, 1e-2, 1e-3]))
def test_coarse_grained_metric_is_below_the_full_one(case, dropped):
    model, tokens, site = case
    full = pullback_metric(model, tokens, site, vocab="full").matrix()
    coarse = pullback_metric(model, tokens, site, dropped_mass=dropped).matrix()
    assert _psd_gap(full - coarse, full) > -1e-10


@SETTINGS
@given(
    case=cases(),
    pair=st.lists(st.integers(0, VOCAB - 1), min_size=2, max_size=2, unique=True),
    seed=st.integers(0, 2**16),
    damping=st.sampled_from([1e-3, 1e-2, 1e-1]),
)
def test_rho_is_at_least_one_and_one_at_the_fisher_optimum(case, pair, seed, damping):
    model, tokens, site = case
    site = Site(site.kind, site.layer, head=site.head)  # the last position
    metric = pullback_metric(model, tokens, site, vocab="full")
    g = concept_gradients(model, tokens, PairConcept(pair[0], pair[1]), [site])[site.name]
    g = g.double()
    assume(float(g.norm()) >= 1e-12)  # else the concept does not depend on this site
    v = torch.randn(g.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assume(abs(float(v @ g)) > 1e-6 * float(v.norm() * g.norm()))  # else ρ(v) is infinite
    optimum = metric.solve(g, damping)
    assert abs(spectral_cost_ratio(metric, optimum, g, damping) - 1) < 1e-8
    assert spectral_cost_ratio(metric, v.to(g), g, damping) >= 1 - 1e-9


@SETTINGS
@given(case=cases())
def test_sweep_equals_the_direct_whole_graph_pullback(case):
    model, tokens, site = case
    sweep = pullback_sweep(model, tokens, [site], vocab="full", decompose=False)
    state = prompt_state(model, tokens)
    n_layers = model.cfg.n_layers
    b_full = lens_rows(model, state.resid[n_layers], MetricOptions(vocab="full"))[0]
    rows = direct_rows(model, tokens, site, b_full, n_layers)
    direct = rows.T @ rows
    got = sweep[site.name].matrix()
    assert float((got - direct).norm()) <= 1e-9 * float(direct.norm()) + 1e-14
