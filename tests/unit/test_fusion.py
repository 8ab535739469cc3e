"""Fusion steering per prompt against a hand-written version of the paper's procedure on tiny
float64 models (no key-value cache, no steerlens hooks): the reference completion, the deltas,
the fused injection, the objective and the tuning; the QA measures; save and load; bad input."""

from __future__ import annotations

import math
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

import steerlens as sl
from steerlens.errors import InputError, NonFiniteError, SiteError
from steerlens.evaluation.qa import qa_outcome, token_f1, until_eos
from steerlens.methods import fusion
from steerlens.methods.fusion import (
    fusion_deltas,
    fusion_intervention,
    fusion_objective,
    qa_prompts,
    reference_completion,
)
from tests.conftest import (
    Case,
    assert_untouched,
    raises_and_leaves_untouched,
    unchecked,
    weights_snapshot,
)

PROMPT = torch.tensor([3, 1, 4, 1])
REF_PROMPT = torch.tensor([3, 1, 4, 1, 5])
ANSWER = [9]
N_EXPL, N_COMP = 5, 6


def greedy(model, seq, n, hooks=()):
    """``seq`` and ``n`` greedy tokens, each from a full forward pass of the whole sequence."""
    for _ in range(n):
        with torch.no_grad(), model.hooks(fwd_hooks=list(hooks)):
            nxt = model(seq[None])[0, -1].argmax()
        seq = torch.cat([seq, nxt[None]])
    return seq


def mean_resid(model, seq, start):
    with torch.no_grad():
        _, cache = model.run_with_cache(seq[None])
    return {
        layer: cache[f"blocks.{layer}.hook_resid_post"][0, start:].mean(0)
        for layer in range(model.cfg.n_layers)
    }


def paper(model, alphas, gammas, segments, baseline="completion"):
    """The paper's steps by hand: (the reference completion, the fused hooks)."""
    start = torch.cat([REF_PROMPT, torch.tensor(ANSWER)])
    reference = greedy(model, start, N_EXPL)[len(REF_PROMPT) :]
    h = mean_resid(model, torch.cat([REF_PROMPT, reference]), len(REF_PROMPT))
    own = greedy(model, PROMPT, N_COMP) if baseline == "completion" else PROMPT
    mu = mean_resid(model, own, 0)
    segment_of = {layer: k for k, seg in enumerate(segments) for layer in seg}

    def hook(act, hook):
        layer = int(hook.name.split(".")[1])
        k = segment_of[layer]
        steered = act + gammas[k] * (h[layer] - mu[layer])
        return alphas[k] * steered + (1 - alphas[k]) * act

    hooks = [(f"blocks.{layer}.hook_resid_post", hook) for layer in segment_of]
    return reference, hooks


def f1_by_hand(a, b):
    common = sum((Counter(a) & Counter(b)).values())
    if common == 0:
        return 0.0
    p, r = common / len(a), common / len(b)
    return 2 * p * r / (p + r)


def objective_by_hand(model, hooks, reference, weight):
    got = greedy(model, PROMPT, N_COMP, hooks)
    with torch.no_grad():
        logp = torch.log_softmax(model(got[None])[0].double(), -1)
    gen = got[len(PROMPT) :]
    nll = -logp[len(PROMPT) - 1 : -1].gather(1, gen[:, None]).mean()
    overlap = f1_by_hand(gen.tolist(), reference.tolist())
    return overlap - weight * float(nll), overlap, math.exp(float(nll))


def tuned(model, **options):
    """Fusion steering of PROMPT with ANSWER after REF_PROMPT, with ``options`` over these."""
    args = dict(reference_prompt=REF_PROMPT, explanation_tokens=N_EXPL, completion_tokens=N_COMP)
    prompt, answer = options.pop("prompt", PROMPT), options.pop("answer", ANSWER)
    return fusion_intervention(model, prompt, answer, **{**args, **options})


def test_segmented_fusion_is_the_papers_procedure(model):
    before = weights_snapshot(model)
    iv = tuned(model, segments=2, trials=6, perplexity_weight=0.2)
    assert_untouched(model, before)
    info = iv.info
    assert iv.method == "fusion" and info["segments"] == [[0], [1]]
    assert len(info["trials"]) == 6
    assert all(0 <= a <= 1 for a in info["alpha"]) and all(0.01 <= g <= 1 for g in info["gamma"])
    reference, hooks = paper(model, info["alpha"], info["gamma"], info["segments"])
    assert info["answer"] + info["explanation"] == reference.tolist()
    # the injection is the paper's fusion of the steered and original activations
    longer = torch.tensor([3, 1, 4, 1, 7, 2, 8])
    for seq in (PROMPT, longer):
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            expected = model(seq[None])
        with torch.no_grad(), iv.apply(model):
            torch.testing.assert_close(model(seq[None]), expected)
    # the reported objective is the paper's, of the best trial, and no trial beat it
    value, overlap, ppl = objective_by_hand(model, hooks, reference, 0.2)
    assert info["objective"] == pytest.approx(value, rel=1e-9, abs=1e-12)
    assert (info["overlap"], info["perplexity"]) == (pytest.approx(overlap), pytest.approx(ppl))
    assert info["objective"] == max(t["objective"] for t in info["trials"])
    trial = info["trials"][3]
    alphas = [trial["alpha0"], trial["alpha1"]]
    gammas = [trial["gamma0"], trial["gamma1"]]
    _, trial_hooks = paper(model, alphas, gammas, info["segments"])
    assert trial["objective"] == pytest.approx(
        objective_by_hand(model, trial_hooks, reference, 0.2)[0], rel=1e-9, abs=1e-12
    )


def test_the_search_starts_from_no_injection_and_the_smallest_strength(gpt2_model):
    model = gpt2_model
    iv = tuned(model, segments=2, trials=3)
    first, second, third = iv.info["trials"]
    assert [first[k] for k in ("alpha0", "alpha1")] == [0.0, 0.0]
    assert [second[k] for k in ("alpha0", "alpha1", "gamma0", "gamma1")] == [1.0, 1.0, 0.01, 0.01]
    assert third["alpha0"] not in (0.0, 1.0)  # then TPE's own draws
    reference, _ = paper(model, [0.0, 0.0], [0.01, 0.01], iv.info["segments"])
    unsteered = objective_by_hand(model, [], reference, 0.1)[0]
    assert first["objective"] == pytest.approx(unsteered, rel=1e-9, abs=1e-12)
    assert iv.info["objective"] >= first["objective"] and iv.info["warm_start"]
    plain = tuned(model, segments=2, trials=2, warm_start=False)
    assert plain.info["trials"][0]["alpha0"] not in (0.0, 1.0)


def test_deltas_over_the_prompt_alone_and_a_given_explanation(gpt2_model):
    model = gpt2_model
    ref = reference_completion(model, REF_PROMPT, ANSWER, explanation=[7, 7, 2])
    assert ref.completion.tolist() == [9, 7, 7, 2]
    deltas = fusion_deltas(model, PROMPT, ref, [0, 1], baseline="prompt")
    h = mean_resid(model, torch.tensor([3, 1, 4, 1, 5, 9, 7, 7, 2]), 5)
    mu = mean_resid(model, PROMPT, 0)
    for layer in (0, 1):
        torch.testing.assert_close(deltas[layer], h[layer] - mu[layer])


def test_full_fusion_through_the_registry_saves_and_loads(llama_model, tmp_path):
    model = llama_model
    iv = sl.fit(
        model,
        "fusion",
        prompt=PROMPT,
        answer=ANSWER,
        reference_prompt=REF_PROMPT.tolist(),
        explanation_tokens=N_EXPL,
        completion_tokens=N_COMP,
        trials=4,
    )
    assert iv.info["segments"] == [[0, 1]] and len(iv.info["alpha"]) == 1
    (a,), (g,) = iv.info["alpha"], iv.info["gamma"]
    _, hooks = paper(model, [a], [g], [[0, 1]])
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        expected = model(PROMPT[None])
    loaded = sl.load_intervention(iv.save(tmp_path / "fusion"))
    assert loaded.method == "fusion" and loaded.info == iv.info
    with torch.no_grad(), loaded.apply(model):
        torch.testing.assert_close(model(PROMPT[None]), expected)
    again = fusion_objective(
        model,
        loaded,
        PROMPT,
        reference_completion(model, REF_PROMPT, ANSWER, explanation_tokens=N_EXPL),
        completion_tokens=N_COMP,
    )
    assert again[0] == pytest.approx(iv.info["objective"], rel=1e-9, abs=1e-12)


def test_qa_outcome_by_hand(gpt2_model):
    model = gpt2_model
    iv = tuned(model, trials=2)
    reference, hooks = paper(model, iv.info["alpha"], iv.info["gamma"], iv.info["segments"])
    got = qa_outcome(model, PROMPT, ANSWER, iv, reference=reference, n_tokens=N_COMP)
    with torch.no_grad():
        clean = model(PROMPT[None])[0, -1]
        with model.hooks(fwd_hooks=hooks):
            steered = model(PROMPT[None])[0, -1]
    gen = greedy(model, PROMPT, N_COMP, hooks)[len(PROMPT) :].tolist()
    keep = torch.arange(model.cfg.d_vocab) != ANSWER[0]
    p, q = torch.softmax(clean[keep], -1), torch.softmax(steered[keep], -1)
    assert got.answer_first == float(gen[0] == ANSWER[0])
    assert got.answer_in_completion == float(ANSWER[0] in gen)
    assert got.answer_logprob == pytest.approx(float(torch.log_softmax(steered, -1)[ANSWER[0]]))
    assert got.reference_f1 == pytest.approx(f1_by_hand(gen, reference.tolist()))
    _, _, ppl = objective_by_hand(model, hooks, reference, 0.0)
    assert got.perplexity == pytest.approx(ppl)
    assert got.off_target_kl == pytest.approx(float((p * (p / q).log()).sum()))
    plain = qa_outcome(model, PROMPT, ANSWER, None, n_tokens=N_COMP)
    assert plain.off_target_kl == 0.0 and math.isnan(plain.reference_f1)


def test_token_overlap_and_eos():
    assert token_f1([1, 1, 2], [1, 2, 2, 3]) == pytest.approx(f1_by_hand([1, 1, 2], [1, 2, 2, 3]))
    assert token_f1([], [1]) == 0.0 and token_f1([4], [4]) == 1.0
    fake = SimpleNamespace(tokenizer=SimpleNamespace(eos_token_id=5))
    with unchecked():
        assert until_eos(fake, torch.tensor([1, 5, 2, 5])).tolist() == [1, 5]
        assert until_eos(fake, torch.tensor([1, 2])).tolist() == [1, 2]
    assert qa_prompts("Why?") == (
        "Question: Why?\nAnswer:",
        "Question: Why?\nAnswer and Explanation:",
    )


def _fit(**options):
    quick = dict(explanation_tokens=2, completion_tokens=2, trials=2)
    return lambda model, tmp_path: tuned(model, **{**quick, **options})


BAD = [
    Case(
        "several-token answer where one is required",
        lambda m, _: qa_outcome(m, PROMPT, [9, 10]),
        InputError,
        "the answer must be one token",
    ),
    Case("empty answer", _fit(answer=[]), InputError, "the answer is empty"),
    Case(
        "empty reference completion",
        _fit(answer=[], explanation=[]),
        InputError,
        "the reference completion (the answer, then its explanation) has nothing",
    ),
    Case("text without a tokenizer", _fit(answer=" Rome"), InputError, "has no tokenizer"),
    Case("two prompts", _fit(prompt=[PROMPT, PROMPT]), InputError, "tuned per prompt"),
    Case("no trials", _fit(trials=0, warm_start=False), InputError, "trials >= 1"),
    Case("fewer trials than the warm start", _fit(trials=1), InputError, "trials must be >= 2"),
    Case("unknown baseline", _fit(baseline="mean"), InputError, "valid: ('completion', 'prompt')"),
    Case("too many segments", _fit(segments=3), InputError, "segments must be between 1 and 2"),
    Case("layer out of range", _fit(layers=[0, 7]), SiteError, "7"),
    Case(
        "empty reference for the outcome",
        lambda m, _: qa_outcome(m, PROMPT, ANSWER, reference=[]),
        InputError,
        "the reference completion is empty",
    ),
]


@pytest.mark.parametrize("case", BAD, ids=lambda c: c.id)
def test_bad_input_is_a_clear_error(case, gpt2_model, tmp_path):
    raises_and_leaves_untouched(case, gpt2_model, tmp_path)


@pytest.mark.parametrize("failure", [KeyboardInterrupt, float("nan")])
def test_an_unfinished_tuning_returns_nothing(gpt2_model, monkeypatch, failure):
    calls = []
    real = fusion.fusion_objective

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            if isinstance(failure, float):
                return failure, 0.0, 1.0
            raise failure()
        return real(*args, **kwargs)

    monkeypatch.setattr(fusion, "fusion_objective", flaky)
    before = weights_snapshot(gpt2_model)
    expected = KeyboardInterrupt if failure is KeyboardInterrupt else NonFiniteError
    with pytest.raises(expected):
        _fit(trials=4)(gpt2_model, None)
    assert len(calls) == 2
    assert_untouched(gpt2_model, before)
