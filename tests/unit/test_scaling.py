"""Activation scaling against a plain re-implementation of its definition on tiny float64 models:
the applied multipliers, the three loss terms, the L1's exact zeros, artifacts and hygiene."""

from __future__ import annotations

import pytest
import torch

import steerlens as sl
from steerlens.errors import InputError, MethodError
from steerlens.methods import bias_edit
from steerlens.methods.scaling import component_sites, scaling_intervention
from tests.conftest import assert_untouched, weights_snapshot

PROMPTS = [torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6, 7, 8]), torch.tensor([9, 3, 2])]


def _task(model):
    """Each prompt's answer (source) and runner-up (target): flip them."""
    with torch.no_grad():
        logits = [model(t[None])[0, -1] for t in PROMPTS]
    sources = [int(x.argmax()) for x in logits]
    targets = [int(x.argsort(descending=True)[1]) for x in logits]
    return targets, sources


def _by_hand(model, tokens, multipliers):
    """Logits with each head's z and each MLP output at the last position times 1 + m."""

    def hook(act, hook):
        act = act.clone()
        layer = int(hook.name.split(".")[1])
        if hook.name.endswith("hook_z"):
            for h in range(model.cfg.n_heads):
                m = multipliers.get(f"blocks.{layer}.attn.hook_z:{h}", 0.0)
                act[:, -1, h] = act[:, -1, h] * (1 + m)
        else:
            act[:, -1] = act[:, -1] * (1 + multipliers.get(f"blocks.{layer}.hook_mlp_out", 0.0))
        return act

    names = [f"blocks.{i}.attn.hook_z" for i in range(model.cfg.n_layers)]
    names += [f"blocks.{i}.hook_mlp_out" for i in range(model.cfg.n_layers)]
    with torch.no_grad(), model.hooks(fwd_hooks=[(n, hook) for n in names]):
        return model(tokens[None])[0, -1]


def test_scaling_flips_with_few_components_and_matches_its_definition(model):
    before = weights_snapshot(model)
    targets, sources = _task(model)
    iv = scaling_intervention(model, PROMPTS, targets, sources, steps=60, l1=0.1, faithfulness=0.1)
    assert_untouched(model, before)
    start, end = iv.info["start"], iv.info["end"]
    assert start["flip_rate"] == 0 and end["flip_rate"] == 1
    assert end["effectiveness"] < start["effectiveness"]
    # the multipliers act as defined: activation × (1 + m), at the last position only
    multipliers = dict(iv.multipliers)
    for tokens in PROMPTS:
        with torch.no_grad(), iv.apply(model):
            mine = model(tokens[None])[0, -1]
        torch.testing.assert_close(mine, _by_hand(model, tokens, multipliers))
    # the reported loss terms, recomputed from the steered logits
    eff, kl = [], []
    for tokens, t, s in zip(PROMPTS, targets, sources, strict=True):
        clean = _by_hand(model, tokens, {})
        steered = _by_hand(model, tokens, multipliers)
        eff.append(torch.nn.functional.softplus(1.0 - (steered[t] - steered[s])))
        keep = torch.ones_like(clean, dtype=torch.bool)
        keep[[t, s]] = False
        p, q = torch.log_softmax(clean[keep], -1), torch.log_softmax(steered[keep], -1)
        kl.append((p.exp() * (p - q)).sum())
    assert end["effectiveness"] == pytest.approx(float(torch.stack(eff).mean()), rel=1e-9)
    assert end["faithfulness"] == pytest.approx(float(torch.stack(kl).mean()), rel=1e-9)
    # minimality: the L1's proximal step leaves exact zeros, the rest are listed largest first
    n_all = len(component_sites(model))
    assert 0 < len(multipliers) < n_all == iv.info["components"]
    kept = [abs(v) for _, v in iv.info["kept"]]
    assert kept == sorted(kept, reverse=True) and all(v > 0 for v in kept)
    assert end["l1"] == pytest.approx(0.1 * sum(kept))


def test_stronger_l1_keeps_fewer_components(gpt2_model):
    targets, sources = _task(gpt2_model)
    counts = [
        len(
            scaling_intervention(gpt2_model, PROMPTS, targets, sources, steps=40, l1=l1).multipliers
        )
        for l1 in (0.01, 0.3)
    ]
    assert counts[1] < counts[0]


def test_save_load_audit_and_registry(tmp_path, gpt2_model):
    model = gpt2_model
    targets, sources = _task(model)
    iv = sl.fit(
        model, "scaling", prompt=PROMPTS, targets=targets, sources=sources, steps=20, lr=0.1
    )
    assert "scaling" in set(sl.list_methods()["name"])
    loaded = sl.load_intervention(iv.save(tmp_path / "scaling"))
    assert loaded.multipliers == iv.multipliers and loaded.info["kept"] == iv.info["kept"]
    with torch.no_grad(), loaded.apply(model):
        a = model(PROMPTS[0][None])
    with torch.no_grad(), iv.apply(model):
        b = model(PROMPTS[0][None])
    torch.testing.assert_close(a, b)
    with pytest.raises(InputError, match="no vector"):
        iv.vector()
    with pytest.raises(MethodError, match="scales activations"):
        bias_edit(model, iv)
    # the audit's forward-mode pass handles multiplicative edits too: at a small scale the
    # first-order component changes are the actual ones
    audit = sl.audit(model, iv.scaled(1e-5), PROMPTS[0])
    assert audit.summary["agreement"].iloc[0] == pytest.approx(1.0, abs=1e-6)
    assert audit.summary["norm_correlation"].iloc[0] == pytest.approx(1.0, abs=1e-6)


def test_bad_inputs(gpt2_model):
    model = gpt2_model
    before = weights_snapshot(model)
    targets, sources = _task(model)
    with pytest.raises(InputError, match="one target and one source"):
        scaling_intervention(model, PROMPTS, targets[:2], sources)
    with pytest.raises(InputError, match="two different token ids"):
        scaling_intervention(model, PROMPTS, sources, sources)
    with pytest.raises(InputError, match="steps must be > 0"):
        scaling_intervention(model, PROMPTS, targets, sources, steps=0)
    with pytest.raises(InputError, match="acts on one head"):
        scaling_intervention(model, PROMPTS, targets, sources, components=["resid_post.0"])
    with pytest.raises(InputError, match="listed twice"):
        scaling_intervention(model, PROMPTS, targets, sources, components=["z.0:1", "z.0:1"])
    with pytest.raises(MethodError, match="kept no component"):
        scaling_intervention(model, PROMPTS, targets, sources, steps=2, l1=1e6)
    with pytest.raises(InputError, match=r"scaling has no options \[.bogus.\]"):
        sl.fit(model, "scaling", prompt=PROMPTS, targets=targets, sources=sources, bogus=1)
    assert_untouched(model, before)


def test_capital_facts_need_single_token_countries(gpt2_model):
    from steerlens.datasets.countries import capital_facts
    from steerlens.errors import ConceptError

    with pytest.raises(ConceptError, match="no tokenizer"):
        capital_facts(gpt2_model)
