"""The audit against brute force on tiny float64 models: first-order changes against finite
differences, the block decomposition against the pullback metric, direct effects against a
finite-difference DLA, SAE features against a direct encode, and the model left as found."""

from __future__ import annotations

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig

import steerlens as sl
from steerlens import plot
from steerlens.auditing import audit
from steerlens.concepts import PairConcept
from steerlens.errors import ConceptError, InputError
from tests.conftest import assert_untouched, weights_snapshot

CONCEPT = PairConcept(base=3, target=4)


def _components(model, tokens, site, vector):
    """Every head's z_h W_O[h] and every MLP output at the last position, [C, d], from a run
    with ``vector`` added at ``site`` (TransformerLens's own cache, no steerlens code)."""
    s = sl.Site.parse(site)

    def add(act, hook):
        act = act.clone()
        if s.head is not None:
            act[:, -1, s.head] += vector
        else:
            act[:, -1] += vector.view(act.shape[2:])  # all heads of hook_z: [n_heads, d_head]
        return act

    with torch.no_grad(), model.hooks(fwd_hooks=[(s.hook_name, add)]):
        _, cache = model.run_with_cache(tokens.unsqueeze(0))
    rows = []
    for layer in range(model.cfg.n_layers):
        z = cache[f"blocks.{layer}.attn.hook_z"][0, -1]
        rows.append(torch.einsum("hd,hdm->hm", z, model.blocks[layer].attn.W_O))
        rows.append(cache[f"blocks.{layer}.hook_mlp_out"][0, -1:])
    return torch.cat(rows), cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][0, -1]


@pytest.mark.parametrize("site", ["resid_pre.0", "z.0:1", "z.0", "resid_mid.0"])
def test_first_order_matches_finite_differences(model, tokens, site):
    s = sl.Site.parse(site)
    dim = s.dim(model)
    vector = torch.randn(dim, dtype=torch.float64)
    result = audit(model, vector, tokens, site=site, scale=1.0)
    eps = 1e-5
    plus, _ = _components(model, tokens, site, eps * vector)
    minus, _ = _components(model, tokens, site, -eps * vector)
    reference = ((plus - minus) / (2 * eps)).norm(dim=-1)
    first = torch.tensor(result.components["first_order_norm"].to_numpy())
    torch.testing.assert_close(first, reference, rtol=1e-6, atol=1e-9)
    actual, _ = _components(model, tokens, site, vector)
    clean, _ = _components(model, tokens, site, 0 * vector)
    torch.testing.assert_close(
        torch.tensor(result.components["change_norm"].to_numpy()), (actual - clean).norm(dim=-1)
    )


@pytest.mark.parametrize("site", ["resid_post.0", "z.1:2", "mlp_out.0"])
def test_shares_decompose_the_pullback_metric(model, tokens, site):
    """Σ shares + skip share = 1, and the total is δᵀGδ of the engine's exact metric."""
    s = sl.Site.parse(site)
    vector = torch.randn(s.dim(model), dtype=torch.float64)
    result = audit(model, vector, tokens, site=site, scale=0.3, concept=CONCEPT)
    row = result.summary.iloc[0]
    assert result.components["metric_share"].sum() + row["skip_share"] == pytest.approx(1, abs=1e-9)
    off = result.components["off_target_share"].sum() + row["skip_off_target_share"]
    assert off == pytest.approx(1, abs=1e-9)
    delta = 0.3 * vector
    full = sl.pullback_metric(model, tokens, site, vocab="full")
    assert row["quad_full"] == pytest.approx(float(full.quad(delta)), rel=1e-9)
    off_metric = sl.pullback_metric(
        model, tokens, site, vocab="full", off_target=CONCEPT.off_target()
    )
    assert row["quad_off_target"] == pytest.approx(float(off_metric.quad(delta)), rel=1e-9)


def test_direct_effects_match_a_finite_difference_dla(model, tokens):
    """Each component's DLA is d/dt c(unembed(ln_final(r + tΔ))) at the clean residual r, and at
    a small edit the direct effects plus the skip path add up to the concept's change."""
    vector = torch.randn(model.cfg.d_model, dtype=torch.float64)
    site = "resid_pre.1"
    result = audit(model, vector, tokens, site=site, scale=1e-6, concept=CONCEPT)
    steered, _ = _components(model, tokens, site, 1e-6 * vector)
    clean, final = _components(model, tokens, site, 0 * vector)
    mine = result.components.set_index("component")["dla_concept"]

    @torch.no_grad()
    def concept_at(resid):
        logits = model.unembed(model.ln_final(resid.view(1, 1, -1)))[0, 0]
        return float(CONCEPT.value(None, logits))

    first = model.cfg.n_heads + 1  # layer 1 starts after layer 0's heads and MLP
    for i, label in [(first, "L1H0"), (first + 2, "L1H2"), (first + model.cfg.n_heads, "L1 MLP")]:
        change = (steered[i] - clean[i]).detach()
        unit, h = change / change.norm(), 1e-5
        slope = (concept_at(final + h * unit) - concept_at(final - h * unit)) / (2 * h)
        reference = slope * float(change.norm())
        assert mine[label] == pytest.approx(reference, rel=1e-5)
    row = result.summary.iloc[0]
    total = result.components["dla_concept"].sum() + row["skip_dla_concept"]
    change = row["concept_steered"] - row["concept_clean"]
    assert total == pytest.approx(change, rel=1e-4)


def test_side_by_side_per_prompt_and_sae_features(gpt2_model):
    model = gpt2_model
    prompts = [torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6, 7])]
    v = torch.randn(16, dtype=torch.float64)
    per_prompt = [
        sl.Intervention("fb", {"resid_post.0": v}),
        sl.Intervention("fb", {"resid_post.0": 2 * v}),
    ]
    sae = StandardSAE(StandardSAEConfig(d_in=16, d_sae=24, dtype="float64"))
    torch.nn.init.normal_(sae.W_enc)
    before = weights_snapshot(model)
    result = audit(
        model,
        {"one": sl.Intervention("caa", {"resid_post.0@all": v}), "each": per_prompt},
        prompts,
        concept=CONCEPT,
        saes={"resid_post.1": sae},
        top_features=5,
    )
    assert_untouched(model, before)
    assert result.methods == ["one", "each"]
    per_method = (model.cfg.n_layers - 1) * (model.cfg.n_heads + 1)
    assert len(result.components) == 2 * per_method
    assert len(result.per_prompt) == 2 * 2 * per_method
    assert result.grid(method="each").shape == (1, model.cfg.n_heads + 1)
    assert list(result.compare().columns) == ["one", "each"]
    # the per-prompt rows average to the component table
    each = result.per_prompt[result.per_prompt["method"] == "each"]
    mean = each.groupby("component", sort=False)["change_norm"].mean()
    table = result.components[result.components["method"] == "each"].set_index("component")
    torch.testing.assert_close(
        torch.tensor(mean.to_numpy()), torch.tensor(table["change_norm"].to_numpy())
    )
    # SAE features: the mean over prompts of encode(steered) - encode(clean), largest first
    feats = result.sae_features[result.sae_features["method"] == "each"]
    changes = []
    for toks, iv in zip(prompts, per_prompt, strict=True):
        with sl.record(model, ["resid_post.1"]) as acts:
            model(toks.unsqueeze(0))
        clean = sae.encode(acts["blocks.1.hook_resid_post"][0, -1])
        with iv.apply(model), sl.record(model, ["resid_post.1"]) as acts:
            model(toks.unsqueeze(0))
        changes.append(sae.encode(acts["blocks.1.hook_resid_post"][0, -1]) - clean)
    expected = torch.stack(changes).mean(0).detach()
    top = expected.abs().argsort(descending=True)[:5]
    assert feats["feature"].tolist() == top.tolist()
    torch.testing.assert_close(torch.tensor(feats["change"].to_numpy()), expected[top])
    assert "each" in result._repr_html_()


def test_figures(gpt2_model):
    v = torch.randn(16, dtype=torch.float64)
    result = audit(
        gpt2_model,
        {"fishback": v, "caa": 2 * v},
        torch.tensor([1, 2, 3]),
        site="resid_pre.0",
        concept=CONCEPT,
    )
    for measure in ("change_norm", "dla_concept", "off_target_share"):
        fig = plot.audit_heatmap(result, measure)
        assert len(fig.axes) == 3  # two panels and the colour bar
        assert fig.axes[0].get_title() == "fishback"
    fig = plot.audit_agreement(result)
    assert "cosine" in fig.axes[0].get_legend().get_texts()[0].get_text()


def test_one_call_heatmap_is_the_plot_modules(gpt2_model):
    v = torch.randn(16, dtype=torch.float64)
    result = sl.audit(
        gpt2_model,
        {"fishback": v, "caa": -v},
        torch.tensor([1, 2, 3]),
        site="resid_pre.0",
        concept=CONCEPT,
    )
    for measure, methods in [("change_norm", None), ("dla_concept", ["caa"])]:
        fig = result.plot(measure, methods)
        same = plot.audit_heatmap(result, measure, methods)
        panels, bar = fig.axes[:-1], fig.axes[-1]
        assert [ax.get_title() for ax in panels] == (methods or ["fishback", "caa"])
        for ax, ref in zip(panels, same.axes[:-1], strict=True):
            # the image is the audit's own grid (the blank column between heads and MLP aside)
            shown = ax.get_images()[0].get_array()
            grid = result.grid(measure, ax.get_title()).to_numpy()
            assert shown[:, :-2].tolist() == grid[:, :-1].tolist()
            assert shown[:, -1].tolist() == grid[:, -1].tolist()
            assert shown.tolist() == ref.get_images()[0].get_array().tolist()
        assert bar.get_ylabel() == plot.AUDIT_LABELS[measure]
    with pytest.raises(InputError, match="unknown audit measure"):
        result.plot("no_such_measure")


def test_bad_inputs_leave_the_model_untouched(gpt2_model):
    model = gpt2_model
    toks = torch.tensor([1, 2, 3])
    v = torch.randn(16, dtype=torch.float64)
    iv = sl.Intervention("x", {"resid_post.0": v})
    before = weights_snapshot(model)
    with pytest.raises(InputError, match="needs site="):
        audit(model, v, toks)
    with pytest.raises(InputError, match="only for a bare vector"):
        audit(model, iv, toks, site="resid_post.0")
    with pytest.raises(InputError, match="one per prompt"):
        audit(model, [iv, iv, iv], [toks, toks])
    with pytest.raises(InputError, match="is zero"):
        audit(model, iv, toks, scale=0.0)
    with pytest.raises(InputError, match="shape"):
        audit(model, torch.ones(7, dtype=torch.float64), toks, site="resid_post.0")
    with pytest.raises(ConceptError, match="output concepts"):
        audit(model, iv, toks, concept="past tense")
    narrow = StandardSAE(StandardSAEConfig(d_in=8, d_sae=4, dtype="float64"))
    with pytest.raises(InputError, match="width 8"):
        audit(model, iv, toks, saes={"resid_post.1": narrow})
    with pytest.raises(InputError, match="top_features"):
        audit(model, iv, toks, top_features=0)
    result = audit(model, iv, toks)
    with pytest.raises(InputError, match="unknown audit measure"):
        result.grid("loudness")
    with pytest.raises(InputError, match="no method"):
        result.grid(method="caa")

    class Broken:
        cfg = StandardSAEConfig(d_in=16, d_sae=4)
        dtype = torch.float64

        def encode(self, x):
            raise RuntimeError("encoder failed")

    with pytest.raises(RuntimeError, match="encoder failed"):
        audit(model, iv, toks, saes={"resid_post.1": Broken()})
    assert_untouched(model, before)
