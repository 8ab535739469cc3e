"""The site ranking against brute force on tiny float64 models: the gradient from a hand-written
hook, the metric from the jacrev oracle, and the second-order cost it predicts against the KL a
small Fisher-optimal step actually pays."""

from __future__ import annotations

import pytest
import torch

from steerlens import errors
from steerlens.concepts import PairConcept
from steerlens.diagnostics import concept_gradients, site_costs
from steerlens.sites import Site
from tests.conftest import assert_untouched, hook_count, weights_snapshot
from tests.oracle import kl, oracle_metric

BASE, TARGET = 5, 9
SITES = ["resid_pre.1", "resid_mid.0", "attn_out.1", "mlp_out.0", "resid_post.1"]


def _perturbed_logits(model, tokens, site: Site, delta=None):
    def hook(act, hook):
        act = act.clone()
        if site.head is None:
            act[0, -1] = act[0, -1] + delta
        else:
            act[0, -1, site.head] = act[0, -1, site.head] + delta
        return act

    hooks = [] if delta is None else [(site.hook_name, hook)]
    return model.run_with_hooks(tokens[None], fwd_hooks=hooks)[0, -1]


@pytest.mark.parametrize("name", SITES)
def test_gradient_and_cost_match_brute_force(model, tokens, name):
    concept = PairConcept(BASE, TARGET)
    site = Site.parse(name)
    before = weights_snapshot(model)
    grad = concept_gradients(model, tokens, concept, [site])[site.name]
    assert_untouched(model, before)

    def value(delta):
        return concept.value(None, _perturbed_logits(model, tokens, site, delta))

    ref = torch.func.grad(value)(torch.zeros(site.dim(model), dtype=torch.float64))
    torch.testing.assert_close(grad, ref, rtol=1e-9, atol=1e-12)

    damping = 1e-2
    table = site_costs(model, [(tokens, concept)], [site], damping=damping, vocab="full")
    g_metric = oracle_metric(model, tokens, site, exclude=(BASE, TARGET)).detach()
    ref = ref.detach()
    lam = damping * torch.trace(g_metric) / g_metric.shape[0]
    damped = g_metric + lam * torch.eye(g_metric.shape[0], dtype=torch.float64)
    expected = 0.5 / float(ref @ torch.linalg.solve(damped, ref))
    assert table.kl_per_unit.iloc[0] == pytest.approx(expected, rel=1e-6)


def test_cost_is_the_kl_a_small_optimal_step_pays(llama_model, tokens):
    """With a vanishing ridge, the cheapest step that moves the concept by ε pays
    kl_per_unit·ε² of off-target KL (second order)."""
    model, concept, site = llama_model, PairConcept(BASE, TARGET), Site.parse("resid_post.0")
    cost = site_costs(model, [(tokens, concept)], [site], damping=1e-9, vocab="full")
    cost = cost.kl_per_unit.iloc[0]
    g = concept_gradients(model, tokens, concept, [site])[site.name]
    metric = oracle_metric(model, tokens, site, exclude=(BASE, TARGET)).detach()
    v = torch.linalg.lstsq(
        metric + 1e-9 * torch.eye(metric.shape[0], dtype=metric.dtype), g
    ).solution
    eps = 1e-4
    delta = v * eps / float(g @ v)
    clean = torch.log_softmax(_perturbed_logits(model, tokens, site), -1).detach()
    steered = torch.log_softmax(_perturbed_logits(model, tokens, site, delta), -1).detach()
    keep = torch.ones_like(clean, dtype=torch.bool)
    keep[[BASE, TARGET]] = False
    measured = float(kl(torch.log_softmax(clean[keep], -1), torch.log_softmax(steered[keep], -1)))
    assert measured == pytest.approx(cost * eps**2, rel=2e-2)


def test_ranking_is_sorted_and_averages_contexts(gpt2_model):
    model = gpt2_model
    contexts = [
        (torch.tensor([3, 1, 4, 1, 5]), PairConcept(BASE, TARGET)),
        (torch.tensor([2, 7, 1, 8]), PairConcept(2, 11)),
    ]
    table = site_costs(model, contexts, SITES)
    assert list(table["rank"]) == sorted(table["rank"])
    assert set(table.site) == {Site.parse(s).name for s in SITES}
    assert (table.contexts == 2).all()
    one = site_costs(model, contexts[:1], SITES).set_index("site").kl_per_unit
    two = site_costs(model, contexts[1:], SITES).set_index("site").kl_per_unit
    both = table.set_index("site").kl_per_unit
    torch.testing.assert_close(
        torch.tensor(both.sort_index().to_numpy()),
        torch.tensor(((one + two) / 2).sort_index().to_numpy()),
    )


@pytest.mark.parametrize(
    ("sites", "contexts", "error"),
    [
        (["z.0:1"], True, "whole sites"),
        (["resid_post.0@all"], True, "whole sites"),
        ([], True, "no sites"),
        (["resid_post.0"], False, "at least one"),
    ],
)
def test_bad_inputs(gpt2_model, tokens, sites, contexts, error):
    ctxs = [(tokens, PairConcept(BASE, TARGET))] if contexts else []
    with pytest.raises(errors.SteerlensError, match=error):
        site_costs(gpt2_model, ctxs, sites)
    assert hook_count(gpt2_model) == 0


def test_concept_gradient_at_a_head(model, tokens):
    """A per-head site's gradient (read off the whole hook_z) equals brute-force autodiff."""
    concept = PairConcept(BASE, TARGET)
    site = Site.parse("z.1:2")
    grad = concept_gradients(model, tokens, concept, [site, Site.parse("z.1:0")])[site.name]

    def value(delta):
        return concept.value(None, _perturbed_logits(model, tokens, site, delta))

    ref = torch.func.grad(value)(torch.zeros(site.dim(model), dtype=torch.float64))
    torch.testing.assert_close(grad, ref, rtol=1e-10, atol=1e-12)
