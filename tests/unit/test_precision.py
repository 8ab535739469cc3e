"""Half-precision models: the metric functions compute on a float32 copy, agree with a float64
computation on the same (half) weights, and leave the model as found."""

from __future__ import annotations

import copy

import pytest
import torch

import steerlens as sl
from steerlens.errors import InputError
from steerlens.metric.precision import compute_model
from steerlens.tiny import tiny_model
from tests.conftest import assert_untouched, weights_snapshot


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_half_precision_metrics_match_float64(flavour, dtype, tokens):
    half = tiny_model(flavour, dtype=dtype)
    exact = copy.deepcopy(half).to(torch.float64, print_details=False)
    before = weights_snapshot(half)
    metric = sl.pullback_metric(half, tokens, "resid_post.0", vocab="full")
    reference = sl.pullback_metric(exact, tokens, "resid_post.0", vocab="full")
    assert metric.dtype in (torch.float32, torch.float64)
    err = (metric.matrix().double() - reference.matrix()).norm() / reference.matrix().norm()
    assert float(err) < 1e-4
    sweep = sl.pullback_sweep(half, tokens, ["resid_pre.1", "mlp_out.0"], vocab="full")
    ref_sweep = sl.pullback_sweep(exact, tokens, ["resid_pre.1", "mlp_out.0"], vocab="full")
    for name in ref_sweep:
        torch.testing.assert_close(
            sweep[name].matrix().double(), ref_sweep[name].matrix(), rtol=1e-4, atol=1e-6
        )
    expected = sl.expected_metric(half, [tokens], "resid_post.0", vocab="full", progress=False)
    torch.testing.assert_close(
        expected["blocks.0.hook_resid_post"].matrix().double(),
        reference.matrix(),
        rtol=1e-4,
        atol=1e-6,
    )
    assert half.cfg.dtype == dtype
    assert_untouched(half, before)
    assert all(p.dtype == dtype for p in half.parameters())


def test_the_float32_copy_is_reused_until_the_weights_change(tokens):
    half = tiny_model("gpt2", dtype=torch.float16)
    first = compute_model(half)
    assert compute_model(half) is first and first is not half
    with torch.no_grad():
        half.blocks[0].mlp.b_out.add_(1.0)
    second = compute_model(half)
    assert second is not first
    torch.testing.assert_close(
        second.blocks[0].mlp.b_out, half.blocks[0].mlp.b_out.float(), rtol=0, atol=0
    )
    assert compute_model(tiny_model("gpt2")) is not None


def test_steering_a_half_model_says_what_to_do(tokens):
    from steerlens.concepts import PairConcept

    half = tiny_model("gpt2", dtype=torch.float16)
    with pytest.raises(InputError, match="float32"):
        sl.fit(half, "fishback", site="resid_post.0", concept=PairConcept(1, 2), prompt=tokens)
