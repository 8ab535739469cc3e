"""Multi-site steering against a plain re-implementation on tiny float64 models: the per-layer
deltas, the applied vectors, the tuned objective, and the registry."""

from __future__ import annotations

import pytest
import torch

import steerlens as sl
from steerlens.concepts import ContrastPairs, PairConcept
from steerlens.errors import InputError
from steerlens.methods.multisite import (
    build,
    contiguous_segments,
    layer_deltas,
    multisite_intervention,
    objective,
)
from tests.conftest import assert_untouched, weights_snapshot

PAIRS = ContrastPairs(
    name="toy",
    pairs=(("a1", "b1"), ("a2", "b2"), ("a3", "b3")),
    token_pairs=(((1, 2, 3), (1, 2, 4)), ((5, 6), (5, 7)), ((8, 9, 10), (8, 9, 11))),
)
PROMPTS = [torch.tensor([3, 1, 4]), torch.tensor([1, 5, 9, 2])]
CONCEPTS = [PairConcept(base=6, target=7), PairConcept(base=2, target=3)]


def test_deltas_are_per_layer_mean_differences(model):
    deltas = layer_deltas(model, PAIRS, [0, 1])
    for layer in (0, 1):
        diffs = []
        bos = getattr(model.tokenizer, "bos_token_id", None)
        prefix = (bos,) if model.cfg.default_prepend_bos and bos is not None else ()
        for plus, minus in PAIRS.token_pairs:
            with torch.no_grad():
                _, a = model.run_with_cache(torch.tensor([prefix + plus]))
                _, b = model.run_with_cache(torch.tensor([prefix + minus]))
            name = f"blocks.{layer}.hook_resid_post"
            diffs.append(a[name][0, -1] - b[name][0, -1])
        torch.testing.assert_close(deltas[layer], torch.stack(diffs).mean(0))


def test_tuned_intervention_matches_its_definition(model):
    before = weights_snapshot(model)
    iv = multisite_intervention(model, PAIRS, PROMPTS, CONCEPTS, segments=2, trials=12)
    assert_untouched(model, before)
    segs, weights = iv.info["segments"], iv.info["weights"]
    assert segs == [[0], [1]] and len(iv.info["trials"]) == 12
    deltas = layer_deltas(model, PAIRS, [0, 1])

    # adding w_k Δ_l at every position of layer l, by hand
    def hook(act, hook):
        layer = int(hook.name.split(".")[1])
        return act + weights[layer] * deltas[layer]

    hooks = [(f"blocks.{layer}.hook_resid_post", hook) for layer in (0, 1)]
    for tokens in PROMPTS:
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            expected = model(tokens[None])
        with torch.no_grad(), iv.apply(model):
            torch.testing.assert_close(model(tokens[None]), expected)
    # the reported objective is the best trial's, and no trial beat it
    value, prob, kl = objective(model, iv, PROMPTS, CONCEPTS, 1.0)
    assert value == pytest.approx(iv.info["objective"], rel=1e-9)
    assert (prob, kl) == (
        pytest.approx(iv.info["probability"]),
        pytest.approx(iv.info["off_target_kl"]),
    )
    assert value >= max(t["objective"] for t in iv.info["trials"]) - 1e-12
    plain = objective(model, build(deltas, segs, [1.0, 1.0], {}), PROMPTS, CONCEPTS, 1.0)[0]
    assert value >= plain and iv.info["trials"][0]["objective"] == pytest.approx(plain)


def test_segments_registry_and_bad_inputs(gpt2_model):
    assert contiguous_segments([4, 5, 6, 7, 8], 2) == [[4, 5, 6], [7, 8]]
    with pytest.raises(InputError, match="segments must be between 1 and 2"):
        contiguous_segments([0, 1], 3)
    iv = sl.fit(gpt2_model, "multisite", pairs=PAIRS, prompt=PROMPTS, concepts=CONCEPTS, trials=3)
    assert "multisite" in set(sl.list_methods()["name"])
    assert iv.info["segments"] == [[0, 1]]
    with pytest.raises(InputError, match="one each"):
        multisite_intervention(gpt2_model, PAIRS, PROMPTS, CONCEPTS[:1])
    with pytest.raises(InputError, match="trials >= 1"):
        multisite_intervention(gpt2_model, PAIRS, PROMPTS, CONCEPTS, trials=0)
    with pytest.raises(InputError, match="distinct"):
        multisite_intervention(gpt2_model, PAIRS, PROMPTS, CONCEPTS, layers=[0, 0])
    with pytest.raises(InputError, match="multisite needs"):
        sl.fit(gpt2_model, "multisite", pairs=PAIRS, prompt=PROMPTS)
