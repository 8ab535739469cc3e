"""The first-order equivalence of an output-projection update and a post-block shift, on tiny
float64 models: the shift against hand-written references (x ΔW recorded by hand, central finite
differences of the edited model), the steered outputs against the edited model's (exact for
W_out and for a bias, error O(ε²) otherwise: halving ε quarters it), and the least-squares
inverse against closed forms and a dense brute-force solve."""

from __future__ import annotations

import copy

import pytest
import torch

from steerlens import errors
from steerlens.hooks import record
from steerlens.methods.equivalence import (
    UpdateShift,
    apply_shift,
    shift_from_weight_update,
    weight_update_from_shift,
)
from steerlens.methods.lowrank import OutputProjection
from steerlens.testing import tiny_model
from tests.conftest import assert_untouched, unchecked, weights_snapshot


def prompts_for(model, n: int = 3, length: int = 6, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, model.cfg.d_vocab, (length - i % 2,), generator=gen) for i in range(n)]


def random_delta(model, kind: str, seed: int = 1, scale: float = 1.0) -> torch.Tensor:
    d_in = OutputProjection(0, kind).d_in(model)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(d_in, model.cfg.d_model, generator=gen, dtype=torch.float64)


def edited_copy(model, layer: int, kind: str, delta_w=None, delta_b=None):
    edited = copy.deepcopy(model)
    proj = OutputProjection(layer, kind)  # type: ignore[arg-type]
    with torch.no_grad():
        if delta_w is not None:
            w = edited.blocks[layer].attn.W_O if kind == "attn" else edited.blocks[layer].mlp.W_out
            w.add_(delta_w.reshape(w.shape))
        if delta_b is not None:
            proj.bias(edited).add_(delta_b)
    return edited


def steered_logits(model, at: int, shift: UpdateShift, prompts, eps: float = 1.0):
    out = []
    for tokens, s in zip(prompts, shift.shifts, strict=True):
        with apply_shift(model, at, eps * s):
            out.append(model(tokens[None])[0])
    return out


def max_gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).detach().abs().max()) for x, y in zip(a, b, strict=True))


def test_w_out_shift_is_x_delta_and_exact(model):
    prompts = prompts_for(model)
    dw = random_delta(model, "mlp")
    before = weights_snapshot(model)
    shift = shift_from_weight_update(model, 1, dw, prompts)
    assert_untouched(model, before)
    assert shift.exact and shift.site == "blocks.1.hook_resid_post@all"
    for tokens, s in zip(prompts, shift.shifts, strict=True):
        with record(model, ["mlp_post.1"]) as acts:
            model(tokens[None])
        torch.testing.assert_close(s, acts["blocks.1.mlp.hook_post"][0] @ dw, rtol=0, atol=1e-12)
    edited = edited_copy(model, 1, "mlp", dw)
    clean = [model(t[None])[0] for t in prompts]
    want = [edited(t[None])[0] for t in prompts]
    assert max_gap(steered_logits(model, 1, shift, prompts), want) < 1e-10
    assert max_gap(want, clean) > 1e-2  # a large update, still reproduced exactly
    assert_untouched(model, before)


def test_a_bias_update_is_one_constant_shift_exactly(model):
    prompts = prompts_for(model)
    v = torch.randn(
        model.cfg.d_model, generator=torch.Generator().manual_seed(4), dtype=torch.float64
    )
    shift = shift_from_weight_update(model, 0, None, prompts, delta_b=v)
    for s in shift.shifts:
        torch.testing.assert_close(s, v.expand_as(s), rtol=0, atol=1e-14)
    iv = shift.as_intervention()
    assert iv.sites == ("blocks.0.hook_resid_post@all",)
    torch.testing.assert_close(iv.vector(), v, rtol=0, atol=1e-14)
    edited = edited_copy(model, 0, "mlp", delta_b=v)
    with iv.apply(model):
        got = [model(t[None])[0] for t in prompts]
    assert max_gap(got, [edited(t[None])[0] for t in prompts]) < 1e-10


CASES = [("attn", 0, None), ("attn", 1, None), ("mlp", 0, 1), ("attn", 0, 1)]


@pytest.mark.parametrize(("kind", "layer", "at"), CASES)
def test_first_order_shift_matches_finite_differences(model, kind, layer, at):
    prompts = prompts_for(model, n=2)
    dw = random_delta(model, kind)
    shift = shift_from_weight_update(model, layer, dw, prompts, kind=kind, at=at)
    read = at if at is not None else layer
    assert not shift.exact
    h = 1e-5
    plus = edited_copy(model, layer, kind, h * dw)
    minus = edited_copy(model, layer, kind, -h * dw)
    for tokens, s in zip(prompts, shift.shifts, strict=True):
        hp = plus(tokens[None], stop_at_layer=read + 1)[0]
        hm = minus(tokens[None], stop_at_layer=read + 1)[0]
        torch.testing.assert_close(s, (hp - hm) / (2 * h), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("kind", "layer", "at"), CASES)
def test_steered_outputs_agree_to_first_order(model, kind, layer, at):
    prompts = prompts_for(model)
    dw = random_delta(model, kind)
    shift = shift_from_weight_update(model, layer, dw, prompts, kind=kind, at=at)
    read = at if at is not None else layer
    clean = [model(t[None])[0] for t in prompts]
    errors_, changes = [], []
    for eps in (1e-3, 5e-4, 2.5e-4):
        edited = edited_copy(model, layer, kind, eps * dw)
        want = [edited(t[None])[0] for t in prompts]
        errors_.append(max_gap(steered_logits(model, read, shift, prompts, eps), want))
        changes.append(max_gap(want, clean))
    for big, small in zip(errors_, errors_[1:], strict=False):
        assert 3.6 < big / small < 4.4  # O(ε²): halving ε quarters the error
    for big, small in zip(changes, changes[1:], strict=False):
        assert 1.9 < big / small < 2.1  # while the change itself is O(ε)
    assert errors_[0] < 1e-2 * changes[0]


def test_weight_update_shapes_and_w_o_layout(llama_model):
    model = llama_model
    prompts = prompts_for(model, n=2)
    dw = random_delta(model, "attn")
    heads = dw.reshape(model.cfg.n_heads, model.cfg.d_head, model.cfg.d_model)
    a = shift_from_weight_update(model, 0, dw, prompts, kind="attn")
    b = shift_from_weight_update(model, 0, heads, prompts, kind="attn")
    for x, y in zip(a.shifts, b.shifts, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert a.mean.shape == (model.cfg.d_model,)
    torch.testing.assert_close(a.mean, torch.cat(list(a.shifts)).mean(0))


def test_w_out_least_squares_recovers_the_update(model):
    prompts = prompts_for(model, n=8, length=8)  # 60 positions > d_mlp = 32
    dw = random_delta(model, "mlp", seed=5)
    shift = shift_from_weight_update(model, 1, dw, prompts)
    fit = weight_update_from_shift(model, 1, shift, prompts)
    assert fit.projection == "blocks.1.mlp.W_out" and fit.iterations == 0
    assert fit.n_positions == sum(len(t) for t in prompts)
    torch.testing.assert_close(fit.delta, dw, rtol=1e-7, atol=1e-7)
    assert fit.relative_residual < 1e-10


def test_w_out_least_squares_is_the_normal_equations_solution(gpt2_model):
    model = gpt2_model
    prompts = prompts_for(model, n=5, length=8)
    gen = torch.Generator().manual_seed(9)
    given = [
        torch.randn(len(t), model.cfg.d_model, generator=gen, dtype=torch.float64) for t in prompts
    ]
    with record(model, ["mlp_post.0"]) as acts:
        xs = []
        for t in prompts:
            model(t[None])
            xs.append(acts["blocks.0.mlp.hook_post"][0])
    x, s = torch.cat(xs), torch.cat(given)
    for ridge in (0.0, 0.3):
        fit = weight_update_from_shift(model, 0, given, prompts, ridge=ridge)
        gradient = x.T @ (x @ fit.delta - s) + ridge * fit.delta
        assert float(gradient.abs().max()) < 1e-9
        assert fit.relative_residual == pytest.approx(float((x @ fit.delta - s).norm() / s.norm()))


def test_reduced_rank_fit(gpt2_model):
    model = gpt2_model
    prompts = prompts_for(model, n=8, length=8)
    gen = torch.Generator().manual_seed(2)
    low = torch.randn(32, 2, generator=gen, dtype=torch.float64) @ torch.randn(
        2, 16, generator=gen, dtype=torch.float64
    )
    exact = weight_update_from_shift(
        model, 1, shift_from_weight_update(model, 1, low, prompts), prompts, rank=2
    )
    torch.testing.assert_close(exact.delta, low, rtol=1e-7, atol=1e-7)
    assert int(torch.linalg.matrix_rank(exact.delta)) == 2
    assert exact.as_low_rank().rank == 2

    given = [torch.randn(len(t), 16, generator=gen, dtype=torch.float64) for t in prompts]
    full = weight_update_from_shift(model, 1, given, prompts)
    reduced = weight_update_from_shift(model, 1, given, prompts, rank=3)
    svd3 = torch.linalg.svd(full.delta)
    naive = svd3.U[:, :3] @ torch.diag(svd3.S[:3]) @ svd3.Vh[:3]
    x = []
    with record(model, ["mlp_post.1"]) as acts:
        for t in prompts:
            model(t[None])
            x.append(acts["blocks.1.mlp.hook_post"][0])
    xs, s = torch.cat(x), torch.cat(given)
    naive_res = float((xs @ naive - s).norm() / s.norm())
    assert reduced.relative_residual <= naive_res + 1e-12
    # Pythagoras: the rank-3 optimum leaves the full fit's residual plus its dropped singular mass
    sv = torch.linalg.svdvals(xs @ full.delta)
    want = (full.relative_residual**2 + float(sv[3:].pow(2).sum() / s.pow(2).sum())) ** 0.5
    assert reduced.relative_residual == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_w_o_fit_by_conjugate_gradients_matches_a_dense_solve(flavour):
    model = tiny_model(flavour, d_model=8, n_heads=2)  # 64 unknowns for the dense oracle
    gen = torch.Generator().manual_seed(6)
    prompts = list(torch.randint(0, model.cfg.d_vocab, (4, 8), generator=gen))  # one batch
    given = [
        torch.randn(len(t), model.cfg.d_model, generator=gen, dtype=torch.float64) for t in prompts
    ]
    fit = weight_update_from_shift(model, 0, given, prompts, kind="attn")
    assert fit.iterations > 0
    d_in, d_model = 8, model.cfg.d_model
    columns = []  # the linearized map, one unit ΔW at a time
    for k in range(d_in * d_model):
        unit = torch.zeros(d_in * d_model, dtype=torch.float64)
        unit[k] = 1.0
        s = shift_from_weight_update(model, 0, unit.view(d_in, d_model), prompts, kind="attn")
        columns.append(torch.cat(list(s.shifts)).reshape(-1))
    dense = torch.stack(columns, 1)
    solution = torch.linalg.lstsq(dense, torch.cat(given).reshape(-1)).solution
    torch.testing.assert_close(fit.delta.reshape(-1), solution, rtol=1e-6, atol=1e-7)


def test_w_o_round_trip(model):
    prompts = prompts_for(model, n=6, length=8)
    dw = random_delta(model, "attn", seed=8)
    shift = shift_from_weight_update(model, 1, dw, prompts, kind="attn")
    before = weights_snapshot(model)
    fit = weight_update_from_shift(model, 1, shift, prompts, kind="attn")
    assert_untouched(model, before)
    torch.testing.assert_close(fit.delta, dw, rtol=1e-6, atol=1e-6)
    iv = fit.as_intervention()
    edited = edited_copy(model, 1, "attn", dw)
    with iv.apply(model):
        got = [model(t[None])[0] for t in prompts]
    assert max_gap(got, [edited(t[None])[0] for t in prompts]) < 1e-6
    assert_untouched(model, before)


def test_a_constant_shift_target(gpt2_model):
    model = gpt2_model
    prompts = prompts_for(model, n=4, length=8)
    v = torch.ones(16, dtype=torch.float64)
    fit = weight_update_from_shift(model, 0, v, prompts)
    per_position = weight_update_from_shift(
        model, 0, [v.expand(len(t), 16) for t in prompts], prompts
    )
    torch.testing.assert_close(fit.delta, per_position.delta)
    assert 0 < fit.relative_residual < 1


def test_bad_input(model):
    prompts = prompts_for(model, n=2)
    dw = random_delta(model, "mlp")
    before = weights_snapshot(model)
    with pytest.raises(errors.SiteError, match=r"layer 7 does not exist.*valid: 0\.\.1"):
        shift_from_weight_update(model, 7, dw, prompts)
    with pytest.raises(errors.SiteError, match=r"layer 2 does not exist"):
        weight_update_from_shift(model, 2, torch.ones(16, dtype=torch.float64), prompts)
    with unchecked(), pytest.raises(errors.InputError, match=r"unknown projection kind 'mlpx'"):
        shift_from_weight_update(model, 0, dw, prompts, kind="mlpx")  # type: ignore[arg-type]
    with pytest.raises(errors.InputError, match=r"shape \(16, 16\).*needs shape \(32, 16\)"):
        shift_from_weight_update(model, 0, dw[:16], prompts)
    with pytest.raises(errors.InputError, match=r"needs shape \(16, 16\) or \(4, 4, 16\)"):
        shift_from_weight_update(model, 0, dw, prompts, kind="attn")
    with pytest.raises(errors.SiteError, match=r"resid_post.0 comes before blocks.1.mlp.W_out"):
        shift_from_weight_update(model, 1, dw, prompts, at=0)
    with pytest.raises(errors.InputError, match="give delta_W"):
        shift_from_weight_update(model, 0, None, prompts)
    with pytest.raises(errors.NonFiniteError):
        shift_from_weight_update(model, 0, dw * float("nan"), prompts)
    with pytest.raises(errors.InputError, match=r"one \[pos, 16\] shift per prompt"):
        weight_update_from_shift(model, 0, [torch.zeros(6, 16)], prompts)
    with pytest.raises(errors.InputError, match=r"shift 1 has shape \(6, 16\).*needs \(5, 16\)"):
        weight_update_from_shift(model, 0, [torch.ones(6, 16), torch.ones(6, 16)], prompts)
    with pytest.raises(errors.InputError, match="all zero"):
        weight_update_from_shift(model, 0, torch.zeros(16, dtype=torch.float64), prompts)
    with pytest.raises(errors.InputError, match=r"rank must be None or an int in 1\.\.16"):
        weight_update_from_shift(model, 0, torch.ones(16), prompts, rank=17)
    with pytest.raises(errors.MethodError, match="did not converge in 1 iterations"):
        weight_update_from_shift(
            model, 0, torch.ones(16, dtype=torch.float64), prompts, kind="attn", max_iter=1
        )
    with pytest.raises(errors.InputError, match=r"covers \(6,\).*has \(1, 5\)"):
        with apply_shift(model, 0, torch.zeros(6, 16, dtype=torch.float64)):
            model(prompts[1][None])
    assert_untouched(model, before)
