"""Half-precision models: the metric functions compute on a float32 copy, agree with a float64
computation on the same (half) weights, and leave the model as found."""

from __future__ import annotations

import copy

import pytest
import torch

import steerlens as sl
from steerlens.errors import InputError
from steerlens.metric.precision import FLOAT32_COPIES, Float32Copies, compute_model
from steerlens.testing import tiny_model
from tests.conftest import assert_untouched, hook_count, weights_snapshot


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
        # float32 against float64: relative to the matrix (small entries carry the cancellation
        # error of the large ones, so an entrywise rtol measures the size of the entry instead)
        ref = ref_sweep[name].matrix()
        err = (sweep[name].matrix().double() - ref).norm() / ref.norm()
        assert float(err) < 1e-4, name
    expected = sl.expected_metric(half, [tokens], "resid_post.0", vocab="full", progress=False)
    got = expected["blocks.0.hook_resid_post"].matrix().double()
    assert float((got - reference.matrix()).norm() / reference.matrix().norm()) < 1e-4
    assert half.cfg.dtype == dtype
    assert_untouched(half, before)
    assert all(p.dtype == dtype for p in half.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_full_precision_model_is_its_own_compute_model(dtype):
    model = tiny_model("gpt2", dtype=dtype)
    before = weights_snapshot(model)
    got = compute_model(model)
    assert got.cfg.dtype == dtype, "a float64 model must not be narrowed"
    assert got is model, "a float32 or float64 model must be used as it is, not copied"
    assert model.cfg.dtype == dtype
    assert_untouched(model, before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_model_computes_on_a_float32_copy_of_its_weights(dtype, tokens):
    half = tiny_model("llama", dtype=dtype)
    before = weights_snapshot(half)
    full = compute_model(half)
    assert full is not half
    assert full.cfg.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in full.parameters())
    wide = dict(full.named_parameters())
    for name, value in half.named_parameters():  # the same numbers, only wider
        torch.testing.assert_close(wide[name], value.float(), rtol=0, atol=0, msg=name)
    with torch.no_grad():
        assert full(tokens[None]).dtype == torch.float32
    assert half.cfg.dtype == dtype
    assert all(p.dtype == dtype for p in half.parameters())
    assert_untouched(half, before)


def test_the_float32_copy_is_reused_until_the_weights_change():
    half = tiny_model("gpt2", dtype=torch.float16)
    first = compute_model(half)
    assert compute_model(half) is first and first is not half
    assert compute_model(tiny_model("gpt2", dtype=torch.float16)) is not first  # per model
    with torch.no_grad():
        half.blocks[0].mlp.b_out.add_(1.0)
    second = compute_model(half)
    assert second is not first
    torch.testing.assert_close(
        second.blocks[0].mlp.b_out, half.blocks[0].mlp.b_out.float(), rtol=0, atol=0
    )
    assert compute_model(half) is second
    half.blocks[0].mlp.b_out = torch.nn.Parameter(torch.zeros_like(half.blocks[0].mlp.b_out))
    third = compute_model(half)  # a replaced parameter is a change too
    assert third is not second
    assert torch.equal(third.blocks[0].mlp.b_out, torch.zeros_like(third.blocks[0].mlp.b_out))


def test_the_copies_are_dropped_with_their_model_or_on_clear():
    import gc

    copies = Float32Copies()
    half, other = tiny_model("gpt2", dtype=torch.float16), tiny_model("gpt2", dtype=torch.float16)
    first = copies.get(half)
    copies.get(other)
    assert len(copies) == 2 and copies.get(half) is first
    del other
    gc.collect()
    assert len(copies) == 1, "a copy must not keep a dead model's float32 twin alive"
    copies.clear()
    assert len(copies) == 0 and copies.get(half) is not first
    before = len(FLOAT32_COPIES)
    made = compute_model(tiny_model("gpt2", dtype=torch.bfloat16))
    assert made.cfg.dtype == torch.float32
    gc.collect()
    assert len(FLOAT32_COPIES) == before, "the shared cache keeps no copy of a dead model"


def test_hooks_on_the_half_model_stay_there_and_not_on_the_copy(tokens):
    half = tiny_model("gpt2", dtype=torch.float16)
    calls: list[str] = []
    point = half.hook_dict["blocks.0.hook_resid_post"]
    point.add_hook(lambda act, hook: calls.append(hook.name))
    try:
        full = compute_model(half)
        assert hook_count(full) == 0
        with torch.no_grad():
            full(tokens[None])
        assert calls == []
        with torch.no_grad():
            half(tokens[None])
        assert calls == ["blocks.0.hook_resid_post"]
    finally:
        point.remove_hooks("fwd")
    assert hook_count(half) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["fishback", "euclidean", "truncated_fisher"])
def test_steering_a_half_model_runs_on_its_float32_copy(method, dtype, tokens):
    """The iterative methods and the path measures accept a half model: they step in float32
    on a copy of the same half weights (the result equals a run on that float32 model), and the
    vector steers the half model itself close to the target."""
    from steerlens.concepts import PairConcept
    from steerlens.diagnostics import path_length
    from steerlens.methods import method_config, steer_iteratively

    half = tiny_model("gpt2", dtype=dtype)
    full = copy.deepcopy(half).to(torch.float32, print_details=False)
    before = weights_snapshot(half)
    concept = PairConcept(1, 2)
    cfg = method_config(method, site="resid_post.0", target_probability=0.8)
    run = steer_iteratively(half, cfg, concept, tokens)
    want = steer_iteratively(full, cfg, concept, tokens)
    assert run.reached and run.steps == want.steps
    assert run.delta.dtype == torch.float32 and torch.equal(run.delta, want.delta)
    with run.intervention.apply(half), torch.no_grad():
        p = torch.softmax(half(tokens[None])[0, -1].double(), -1)
    assert float(p[2] / (p[1] + p[2])) == pytest.approx(0.8, abs=0.02)
    off = concept.off_target()
    got = path_length(half, tokens, run.intervention, off, path=run.path)
    assert got == pytest.approx(path_length(full, tokens, want.intervention, off, path=want.path))
    assert_untouched(half, before)
    assert hook_count(half) == 0 and half.cfg.dtype == dtype


def test_the_prompt_state_of_a_half_model_names_the_float32_copy(tokens):
    from steerlens.metric.state import prompt_state

    with pytest.raises(InputError, match="compute_model"):
        prompt_state(tiny_model("gpt2", dtype=torch.float16), tokens)
