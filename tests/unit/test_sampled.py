"""The sampled expected metric: unbiased for the exact one, reproducible, and checked on input.

Unbiasedness is checked exactly, not statistically: the sampled factor's rows come from
:func:`steerlens.metric.outcomes.outcome_factor`, and weighting every outcome by its probability
instead of by its draw count is the estimator's expectation. Swapping that enumeration in for the
draws must give the exact full-vocabulary metric at every site to 1e-10. A second test checks the
error of real draws falls like 1/√k.
"""

from __future__ import annotations

import pytest
import torch

from steerlens import errors
from steerlens.metric import MetricInfo, OffTarget
from steerlens.metric import pullback as pullback_module
from steerlens.metric.dataset import expected_metric
from steerlens.metric.outcomes import (
    outcome_distribution,
    outcome_factor,
    sampled_factor,
    unembed_factor,
)
from steerlens.metric.pullback import lens_logits
from steerlens.metric.state import prompt_state
from steerlens.sites import Site
from steerlens.testing import tiny_model
from tests.conftest import assert_untouched, hook_count, unchecked, weights_snapshot

PROMPTS = [
    torch.tensor(p) for p in ([3, 1, 4, 1], [5, 9, 2], [6, 5, 3, 5, 8], [9, 7], [9, 3, 2, 3])
]
SITES = ["resid_pre.0", "z.1:1", "mlp_post.0", "resid_post.0@all"]
NAMES = [Site.parse(s).name for s in SITES]
TRANSFORMS = {
    "none": None,
    "complement": OffTarget.complement([3, 9, 40]),
    "pair_merge": OffTarget.pair_merge({5: 6, 7: 8, 11: 40}),
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _enumerated(logits, w_u, samples, generator, *, off_target=None, softcap=None):
    """The sampled factor's expectation: every outcome of positive mass, weighted by q."""
    q = outcome_distribution(logits, off_target)
    outcomes = torch.nonzero(q > 0).flatten()
    rows = outcome_factor(
        logits, w_u, outcomes, q[outcomes], off_target=off_target, softcap=softcap
    )
    return rows, MetricInfo("sampled", 0.0, int(outcomes.numel()), samples=samples)


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_outcome_factor_weighted_by_q_is_the_exact_fisher(model, transform, softcap):
    state = prompt_state(model, PROMPTS[2])
    logits = lens_logits(model, state.resid[model.cfg.n_layers]).detach()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    off = TRANSFORMS[transform]
    rows, _ = _enumerated(logits, model.W_U.detach(), 1, None, off_target=off, softcap=softcap)
    exact, _ = unembed_factor(
        logits, model.W_U.detach(), vocab="full", off_target=off, softcap=softcap
    )
    assert _rel(rows.T @ rows, exact.T @ exact) < 1e-10


def test_outcome_factor_of_a_float32_unembedding_is_exact_to_float32():
    model = tiny_model("llama", dtype=torch.float32)
    state = prompt_state(model, PROMPTS[2])
    logits = lens_logits(model, state.resid[model.cfg.n_layers]).detach()
    w32 = model.W_U.detach()
    rows, _ = _enumerated(logits, w32, 1, None)
    exact, _ = unembed_factor(logits.double(), w32.double(), vocab="full")
    assert rows.dtype == torch.float64
    assert _rel(rows.T @ rows, exact.T @ exact) < 1e-5


@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_sampled_expectation_equals_exact_metric_at_every_site(model, monkeypatch, transform):
    off = TRANSFORMS[transform]
    exact = expected_metric(model, PROMPTS, SITES, vocab="full", off_target=off, progress=False)
    monkeypatch.setattr(pullback_module, "sampled_factor", _enumerated)
    expectation = expected_metric(model, PROMPTS, SITES, samples=1, off_target=off, progress=False)
    for name in NAMES:
        assert _rel(expectation[name].matrix(), exact[name].matrix()) < 1e-10, name


def test_sampled_error_falls_like_one_over_root_k(model):
    # E‖Ĝ − G‖²_F ∝ 1/k: from k = 64 to 4096 the RMS error over seeds should drop ~8×; 4× leaves
    # room for three seeds' spread, and 0.1 at k = 4096 is ~4× the RMS seen on these models.
    exact = expected_metric(model, PROMPTS, "resid_pre.0", vocab="full", progress=False)
    want = exact[NAMES[0]].matrix()
    rms = {}
    for k in (64, 4096):
        runs = [
            expected_metric(model, PROMPTS, "resid_pre.0", samples=k, seed=seed, progress=False)
            for seed in (1, 2, 3)
        ]
        errs = [_rel(run[NAMES[0]].matrix(), want) for run in runs]
        rms[k] = (sum(e * e for e in errs) / len(errs)) ** 0.5
    assert rms[4096] < 0.1
    assert rms[64] > 4 * rms[4096]


def test_sampled_factor_draws_only_kept_outcomes(llama_model):
    state = prompt_state(llama_model, PROMPTS[0])
    logits = lens_logits(llama_model, state.resid[llama_model.cfg.n_layers]).detach()
    off = OffTarget.pair_merge({5: 6, 7: 8})
    gen = torch.Generator().manual_seed(0)
    rows, info = sampled_factor(logits, llama_model.W_U.detach(), 500, gen, off_target=off)
    assert rows.shape[0] == info.top_k <= 500
    assert info.samples == 500 and info.off_target == off.name
    for token in (5, 7):  # merged-away bases are not outcomes
        with pytest.raises(errors.InputError, match="not outcomes"):
            outcome_factor(
                logits,
                llama_model.W_U.detach(),
                torch.tensor([token]),
                torch.ones(1),
                off_target=off,
            )


def test_seed_reproduces_and_another_seed_differs(model):
    def run(seed):
        out = expected_metric(model, PROMPTS, SITES, samples=6, seed=seed, progress=False)
        return [out[name].matrix() for name in NAMES]

    first, again, other = run(3), run(3), run(4)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert all(_rel(a, b) > 1e-3 for a, b in zip(first, other, strict=True))


def test_prompt_draws_do_not_depend_on_the_rest_of_the_dataset(model):
    # prompt i is seeded by (seed, i): the mean over 5 prompts is the mean of prompts 0-2 and 3-4
    # when those are run with their own indices (as shards are)
    whole = expected_metric(model, PROMPTS, "resid_pre.0", samples=5, progress=False)
    head = expected_metric(model, PROMPTS[:3], "resid_pre.0", samples=5, progress=False)
    assert _rel(whole[NAMES[0]].matrix(), head[NAMES[0]].matrix()) > 1e-3
    both = expected_metric(
        model, PROMPTS[:3] + PROMPTS[3:], "resid_pre.0", samples=5, progress=False
    )
    assert torch.equal(whole[NAMES[0]].matrix(), both[NAMES[0]].matrix())


def test_info_carries_samples_and_seed(model):
    sampled = expected_metric(model, PROMPTS, SITES, samples=7, seed=2, progress=False)
    for metric in sampled.values():
        assert metric.info is not None
        assert metric.info.samples == 7
        assert metric.info.seed == 2
        assert metric.info.vocab == "sampled"
        assert metric.info.dropped_mass == 0.0
        assert metric.info.n_prompts == len(PROMPTS)
        assert metric.info.world_size == 1
    exact = expected_metric(model, PROMPTS, "resid_pre.0", progress=False)[NAMES[0]]
    assert exact.info is not None
    assert exact.info.samples is None and exact.info.seed is None
    assert exact.info.vocab == "auto"


@pytest.mark.parametrize("samples", [0, -3, 2.5, True, "4"])
def test_bad_samples_raise_and_leave_the_model(model, samples):
    before = weights_snapshot(model)
    with pytest.raises(errors.InputError, match=f"samples must be a positive integer.*{samples!r}"):
        with unchecked():  # 2.5 and "4" are not ints
            expected_metric(model, PROMPTS, "resid_pre.0", samples=samples, progress=False)
    assert_untouched(model, before)


@pytest.mark.parametrize("seed", [-1, 1.5, False])
def test_bad_seed_raises(model, seed):
    with pytest.raises(errors.InputError, match=f"seed must be a non-negative integer.*{seed!r}"):
        with unchecked():  # 1.5 is not an int
            expected_metric(model, PROMPTS, "resid_pre.0", samples=4, seed=seed, progress=False)


@pytest.mark.parametrize("options", [{"vocab": "full"}, {"dropped_mass": 1e-2}])
def test_exact_only_options_are_rejected_with_samples(model, options):
    with pytest.raises(errors.InputError, match="apply only to the exact metric"):
        expected_metric(model, PROMPTS, "resid_pre.0", samples=4, progress=False, **options)


def test_sampled_run_leaves_the_model_as_found(model):
    before = weights_snapshot(model)
    hooks = hook_count(model)
    expected_metric(
        model, PROMPTS, SITES, samples=4, off_target=TRANSFORMS["complement"], progress=False
    )
    assert hook_count(model) == hooks
    assert_untouched(model, before)
