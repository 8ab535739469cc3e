"""Low-rank output-projection updates applied through hooks, on tiny float64 models: the hooked
model against the model with the edited weight, names and shapes, and interventions carrying
updates saved, loaded and refused where they do not fit."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import steerlens as sl
from steerlens import errors
from steerlens.methods import Intervention, LowRankUpdate, OutputProjection, apply_update
from steerlens.testing import tiny_model
from tests.conftest import assert_untouched, hook_count, unchecked, weights_snapshot

TOKENS = torch.tensor([[3, 1, 4, 1, 5, 9, 2]])


def update_for(model, kind: str, rank: int = 2, seed: int = 0) -> LowRankUpdate:
    d_in = OutputProjection(0, kind).d_in(model)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(d_in, rank, generator=gen, dtype=torch.float64)
    b = torch.randn(rank, model.cfg.d_model, generator=gen, dtype=torch.float64)
    return LowRankUpdate(a, b)


@pytest.mark.parametrize("kind", ["attn", "mlp"])
@pytest.mark.parametrize("layer", [0, 1])
def test_hooked_update_is_the_edited_weight(model, kind, layer):
    upd = update_for(model, kind)
    edited = copy.deepcopy(model)
    with torch.no_grad():
        w = edited.blocks[layer].attn.W_O if kind == "attn" else edited.blocks[layer].mlp.W_out
        w.add_(0.5 * upd.delta().reshape(w.shape))
    before = weights_snapshot(model)
    name = f"W_O.{layer}" if kind == "attn" else f"W_out.{layer}"
    with apply_update(model, name, upd, scale=0.5):
        got = model(TOKENS)
    assert_untouched(model, before)
    want = edited(TOKENS)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-11)
    assert float((want - model(TOKENS)).detach().abs().max()) > 1e-3


def test_hooks_are_removed_when_the_block_raises(model):
    upd = update_for(model, "mlp")
    with pytest.raises(RuntimeError, match="inside"), apply_update(model, "W_out.0", upd):
        assert hook_count(model) == 2
        raise RuntimeError("inside")
    assert hook_count(model) == 0


def test_projection_names():
    model = tiny_model()
    for spec in ("W_out.1", "blocks.1.mlp.W_out", "W_out.-1"):
        assert OutputProjection.parse(spec).validate(model).name == "blocks.1.mlp.W_out"
    proj = OutputProjection.parse("blocks.0.attn.W_O")
    assert (proj.input_hook, proj.output_hook) == ("blocks.0.attn.hook_z", "blocks.0.hook_attn_out")
    assert proj.weight(model).shape == (16, 16) and proj.d_in(model) == 16
    torch.testing.assert_close(proj.weight(model), model.blocks[0].attn.W_O.reshape(16, 16))
    with pytest.raises(errors.InputError, match=r"cannot parse projection 'W_Q.1'.*W_out.<layer>"):
        OutputProjection.parse("W_Q.1")
    with pytest.raises(
        errors.SiteError, match=r"layer 2 does not exist.*2 layers \(valid: 0\.\.1\)"
    ):
        OutputProjection.parse("W_out.2").validate(model)
    attn_only = tiny_model(n_layers=1)
    attn_only.cfg.attn_only = True
    with pytest.raises(errors.SiteError, match="attention-only.*valid kind: 'attn'"):
        OutputProjection(0, "mlp").validate(attn_only)


def test_low_rank_factors():
    gen = torch.Generator().manual_seed(1)
    low = torch.randn(12, 3, generator=gen, dtype=torch.float64) @ torch.randn(
        3, 8, generator=gen, dtype=torch.float64
    )
    upd = LowRankUpdate.from_delta(low, 3)
    assert upd.rank == 3 and upd.n_parameters == 3 * (12 + 8)
    torch.testing.assert_close(upd.delta(), low, rtol=1e-10, atol=1e-12)
    best2 = LowRankUpdate.from_delta(low, 2).delta()
    s = torch.linalg.svdvals(low)
    assert float((best2 - low).norm()) == pytest.approx(float(s[2]), rel=1e-9)  # Eckart–Young
    with unchecked(), pytest.raises(errors.InputError, match=r"a \[d_in, rank\] and b \[rank, "):
        LowRankUpdate(torch.zeros(4, 2), torch.zeros(3, 8))
    with pytest.raises(errors.NonFiniteError):
        LowRankUpdate(torch.full((4, 2), float("nan")), torch.zeros(2, 8))
    with pytest.raises(errors.InputError, match=r"rank must be an int in 1\.\.8"):
        LowRankUpdate.from_delta(low, 9)


def test_an_intervention_with_updates_saves_loads_and_applies(model, tmp_path):
    v = torch.randn(16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    iv = Intervention(
        "joint",
        {"resid_post.1@all": v},
        0.7,
        {"note": "x"},
        weight_updates={"W_out.1": update_for(model, "mlp"), "W_O.0": update_for(model, "attn")},
    )
    assert set(iv.weight_updates) == {"blocks.1.mlp.W_out", "blocks.0.attn.W_O"}
    assert "updates of [blocks.1.mlp.W_out, blocks.0.attn.W_O]" in repr(iv)
    table = iv.table().set_index("site")
    assert table.loc["blocks.0.attn.W_O", "rank"] == 2
    loaded = sl.load_intervention(iv.save(tmp_path / "iv"))
    for name, upd in iv.weight_updates.items():
        torch.testing.assert_close(loaded.weight_updates[name].delta(), upd.delta())
    before = weights_snapshot(model)
    with iv.apply(model):
        want = model(TOKENS)
    with loaded.apply(model):
        got = model(TOKENS)
    assert_untouched(model, before)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # scale multiplies the update as it does the vector: the edited weights, scaled
    edited = copy.deepcopy(model)
    with torch.no_grad():
        edited.blocks[1].mlp.W_out.add_(0.7 * iv.weight_updates["blocks.1.mlp.W_out"].delta())
        edited.blocks[0].attn.W_O.add_(
            0.7 * iv.weight_updates["blocks.0.attn.W_O"].delta().reshape(4, 4, 16)
        )
        edited.blocks[1].mlp.b_out.add_(0.7 * v)
    torch.testing.assert_close(want, edited(TOKENS), rtol=0, atol=1e-11)


def test_updates_that_do_not_fit_are_refused(tmp_path):
    small = tiny_model(n_layers=1)
    iv = Intervention("u", {}, weight_updates={"W_out.1": update_for(small, "mlp")})
    with pytest.raises(errors.SiteError, match=r"layer 1 does not exist.*valid: 0\.\.0"):
        with iv.apply(small):
            pass
    wide = tiny_model(d_model=32, n_heads=4)
    iv0 = Intervention("u", {}, weight_updates={"W_out.0": update_for(small, "mlp")})
    with pytest.raises(
        errors.InputError, match=r"this model needs a \[64, rank\] and b \[rank, 32\]"
    ):
        iv0.check(wide)
    assert hook_count(small) == 0 and hook_count(wide) == 0
    with unchecked(), pytest.raises(errors.InputError, match="must be a LowRankUpdate"):
        Intervention("u", {}, weight_updates={"W_out.0": torch.zeros(3, 3)})  # type: ignore[dict-item]
    with pytest.raises(errors.InputError, match="no weight updates"):
        Intervention("u", {})

    path = iv0.save(tmp_path / "u")
    meta = json.loads((path / "meta.json").read_text())
    meta["weight_updates"] = {}
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(errors.ArtifactError, match="do not match"):
        sl.load_intervention(path)
