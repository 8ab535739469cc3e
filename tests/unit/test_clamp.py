"""Clamping an SAE feature (sae_intervention(mode="clamp")) against a direct implementation of
x ← x + (c − f(x))·W_dec[f], for a ReLU and a TopK SAE; save/load; bad input."""

from __future__ import annotations

import json

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig

import steerlens as sl
from steerlens import errors
from steerlens.methods.vector import sae_intervention
from tests.conftest import assert_untouched, weights_snapshot

SITE = "resid_post.0"


def _sae(model, kind: str):
    d = model.cfg.d_model
    sae = (
        TopKSAE(TopKSAEConfig(d_in=d, d_sae=32, k=4, dtype="float64"))
        if kind == "topk"
        else StandardSAE(StandardSAEConfig(d_in=d, d_sae=32, dtype="float64"))
    )
    with torch.no_grad():
        sae.b_enc.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
    return sae.to(model.cfg.device)


def _reference_logits(model, tokens, sae, feature: int, value: float, positions):
    """The definition, by hand: encode with the SAE, then x + (c − f(x))·W_dec[f]."""

    def hook(act, hook):
        act = act.clone()
        x = act[0, positions]
        f = sae.encode(x)[..., feature]
        act[0, positions] = x + (value - f).unsqueeze(-1) * sae.W_dec[feature]
        return act

    with torch.no_grad():
        return model.run_with_hooks(tokens[None], fwd_hooks=[("blocks.0.hook_resid_post", hook)])


@pytest.mark.parametrize("kind", ["standard", "topk"])
@pytest.mark.parametrize(("rule", "positions"), [("all", slice(None)), ("last", -1)])
def test_clamp_matches_its_definition(model, tokens, kind, rule, positions):
    sae = _sae(model, kind)
    feature = sl.sae_feature(sae, 5, SITE)
    before = weights_snapshot(model)
    iv = sae_intervention(model, feature, f"{SITE}@{rule}", scale=3.0, mode="clamp")
    with iv.apply(model), torch.no_grad():
        got = model(tokens[None])
    want = _reference_logits(model, tokens, sae, 5, 3.0, positions)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got, model(tokens[None]))  # it does something
    assert_untouched(model, before)


def test_clamp_to_the_current_value_changes_nothing(model, tokens):
    sae = _sae(model, "standard")
    feature = sl.sae_feature(sae, 5, SITE)
    with sl.record(model, [SITE]) as acts, torch.no_grad():
        clean = model(tokens[None])
    current = float(
        feature.activation(acts[SITE.replace("resid_post.0", "blocks.0.hook_resid_post")][0, -1])
    )
    iv = sl.fit(model, "sae", concept=feature, scale=current, mode="clamp")
    with iv.apply(model), torch.no_grad():
        torch.testing.assert_close(model(tokens[None]), clean, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["standard", "topk"])
def test_clamp_saves_and_loads(model, tokens, kind, tmp_path):
    sae = _sae(model, kind)
    iv = sl.fit(model, "sae", concept=sl.sae_feature(sae, 7, SITE), scale=2.0, mode="clamp")
    assert iv.method == "sae_clamp" and list(iv.clamps) == ["blocks.0.hook_resid_post"]
    loaded = sl.load_intervention(iv.save(tmp_path / "clamp"))
    assert type(loaded.clamps["blocks.0.hook_resid_post"].feature.sae) is type(sae)
    with torch.no_grad():
        with iv.apply(model):
            a = model(tokens[None])
        with loaded.apply(model):
            b = model(tokens[None])
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert "clamped_feature" in loaded.table().columns and "clamps at" in repr(loaded)


def test_clamp_bad_input(model, tokens, tmp_path):
    sae = _sae(model, "standard")
    feature = sl.sae_feature(sae, 5, SITE)
    before = weights_snapshot(model)
    with pytest.raises(errors.InputError, match="unknown SAE steering mode 'pin'"):
        sae_intervention(model, feature, mode="pin")
    with pytest.raises(
        errors.InputError, match=r"sae has no options \[.value.\]; its options: site, scale, mode"
    ):
        sl.fit(model, "sae", concept=feature, mode="clamp", value=3)
    with pytest.raises(errors.ConceptError, match="trained at"):
        sae_intervention(model, feature, "resid_post.1", mode="clamp")
    iv = sae_intervention(model, feature, scale=1.0, mode="clamp")
    with pytest.raises(errors.NonFiniteError, match="overflows"):
        with iv.apply(model, scale=float("inf")):
            model(tokens[None])
    with pytest.raises(errors.InputError, match="clamps"):
        iv.vector()
    with pytest.raises(errors.MethodError, match="no first-order tangent"):
        sl.audit(model, iv, tokens)
    folder = iv.save(tmp_path / "clamp")
    weights = next((folder / "sae_0").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(errors.ArtifactError, match="tampered"):
        sl.load_intervention(folder)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["clamps"][0]["feature"] == 5
    assert_untouched(model, before)
