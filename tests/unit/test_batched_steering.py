"""Iterative steering of a batch of prompts of different lengths (``steer_batch``) against each
prompt steered alone (``steer_iteratively``), on the tiny float64 models; the stacked paths'
logits against each prompt's own path and the whole model."""

from __future__ import annotations

import math

import pytest
import torch

from steerlens import errors
from steerlens.concepts import TokenSet
from steerlens.methods import (
    EuclideanConfig,
    FishBackConfig,
    TruncatedFisherConfig,
    steer_batch,
    steer_iteratively,
)
from steerlens.metric.local import LocalPath
from steerlens.metric.stacked import StackedPaths
from steerlens.testing import tiny_model
from tests.conftest import DEVICE, assert_untouched, fallback_model, unchecked, weights_snapshot

SITE = "resid_post.0"
#: a checkpoint on the way to every target below (the concepts are log-probabilities)
MARK = math.log(0.2)
PROMPTS = [
    torch.tensor([3, 1, 4, 1, 5, 9, 2, 6]),
    torch.tensor([2, 7]),
    torch.tensor([5]),
    torch.tensor([8, 8, 1, 3, 0]),
]


def concepts(model, targets=(7, 11, 7, 2)) -> list[TokenSet]:
    return [TokenSet.from_ids([t], d_vocab=model.cfg.d_vocab) for t in targets]


def assert_same_run(batched, alone) -> None:
    assert batched.reached == alone.reached
    assert batched.steps == alone.steps
    assert torch.allclose(batched.path, alone.path, atol=1e-10, rtol=0)
    for a, b in zip(batched.trajectory, alone.trajectory, strict=True):
        assert a.step == b.step and a.top_k == b.top_k
        assert a.value == pytest.approx(b.value, abs=1e-10)
        assert a.stop_value == pytest.approx(b.stop_value, abs=1e-10)
    assert batched.final_value == pytest.approx(alone.final_value, abs=1e-10)
    assert set(batched.checkpoints) == set(alone.checkpoints)
    for value, mark in alone.checkpoints.items():
        other = batched.checkpoints[value]
        assert other.step == mark.step
        assert torch.allclose(other.delta, mark.delta, atol=1e-10, rtol=0)
        assert other.path_rho.keys() == mark.path_rho.keys()
        for name, rho in mark.path_rho.items():
            assert other.path_rho[name] == pytest.approx(rho, rel=1e-8)
    for name, rho in alone.path_rho.items():
        assert batched.path_rho[name] == pytest.approx(rho, rel=1e-8)


@pytest.fixture(scope="module", params=["gpt2", "llama", "gemma"])
def any_model(request):
    """A tiny float64 model of every flavour, the Gemma-3-like one included (QK-norm,
    post-norms, local and global layers: fast blocks too)."""
    return tiny_model(request.param, device=DEVICE)


@pytest.mark.parametrize("site", ["resid_post.0", "resid_pre.0"])
def test_stacked_logits_equal_each_prompts_own_path(any_model, site):
    model = any_model
    gen = torch.Generator().manual_seed(0)
    with StackedPaths(model, PROMPTS, site) as paths:
        assert paths.stacked
        counts = [3, 0, 2, 1]
        xs = torch.cat(
            [
                p.x0 + 0.3 * torch.randn(n, model.cfg.d_model, generator=gen, dtype=p.x0.dtype)
                for p, n in zip(paths.paths, counts, strict=True)
            ]
        )
        got = paths.logits(xs, counts)
        want = torch.cat(
            [
                torch.stack([p.logits(x) for x in xs[sum(counts[:i]) : sum(counts[: i + 1])]])
                for i, p in enumerate(paths.paths)
                if counts[i]
            ]
        )
        assert torch.allclose(got, want, atol=1e-10, rtol=0)
        clean = paths.logits(torch.stack([p.x0 for p in paths.paths]), [1] * len(PROMPTS))
    for i, tokens in enumerate(PROMPTS):
        with torch.no_grad():
            whole = model(tokens[None])[0, -1]
        assert torch.allclose(clean[i], whole, atol=1e-10, rtol=0)


def test_stacked_logits_loop_where_a_block_is_not_fast():
    net = fallback_model()
    with StackedPaths(net, PROMPTS[:2], SITE) as paths:
        assert not paths.stacked
        xs = torch.stack([p.x0 for p in paths.paths])
        got = paths.logits(xs, [1, 1])
    for i, tokens in enumerate(PROMPTS[:2]):
        with LocalPath(net, tokens, SITE) as path:
            assert torch.allclose(got[i], path.logits(path.x0), atol=1e-12, rtol=0)


CONFIGS = [
    EuclideanConfig(SITE, 0.4),
    FishBackConfig(SITE, 0.4),
    FishBackConfig("resid_pre.1", 0.4, off_target=False, metric_every=2),
    TruncatedFisherConfig("resid_pre.0", 0.4, depth=1),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.name}-{c.site}")
def test_a_batch_gives_each_prompts_run_alone(any_model, cfg):
    model = any_model
    snapshot = weights_snapshot(model)
    cs = concepts(model)
    runs = steer_batch(model, cfg, cs, PROMPTS, checkpoints=[MARK])
    assert len(runs) == len(PROMPTS)
    for run, prompt, concept in zip(runs, PROMPTS, cs, strict=True):
        alone = steer_iteratively(model, cfg, concept, prompt, checkpoints=[MARK])
        assert_same_run(run, alone)
        assert run.intervention.info["batch"] == len(PROMPTS)
    # different prompts take different numbers of steps: each stops on its own
    assert len({r.steps for r in runs}) > 1
    assert_untouched(model, snapshot)


def test_a_padded_batch_gives_the_runs_of_its_rows(model):
    cfg = FishBackConfig(SITE, 0.3)
    width = max(len(p) for p in PROMPTS)
    for side in ("left", "right"):
        tokens = torch.zeros(len(PROMPTS), width, dtype=torch.long)
        mask = torch.zeros_like(tokens)
        for i, p in enumerate(PROMPTS):
            span = slice(width - len(p), width) if side == "left" else slice(0, len(p))
            tokens[i, span], mask[i, span] = p, 1
        padded = steer_batch(model, cfg, concepts(model), tokens, attention_mask=mask)
        listed = steer_batch(model, cfg, concepts(model), PROMPTS)
        for a, b in zip(padded, listed, strict=True):
            assert_same_run(a, b)


def test_a_batch_with_compare_and_a_stop_concept(model):
    cfg = FishBackConfig(SITE, 0.4)
    compare = {"euclidean": lambda path, x, g: g}
    stop = TokenSet.from_ids([7, 11], d_vocab=model.cfg.d_vocab)
    cs = concepts(model)
    runs = steer_batch(model, cfg, cs, PROMPTS, stop_on=stop, compare=compare, checkpoints=[MARK])
    for run, prompt, concept in zip(runs, PROMPTS, cs, strict=True):
        alone = steer_iteratively(
            model, cfg, concept, prompt, stop_on=stop, compare=compare, checkpoints=[MARK]
        )
        assert_same_run(run, alone)
        assert run.path_rho["euclidean"] >= 1 - 1e-9


def test_a_batch_on_blocks_that_are_not_fast():
    net = fallback_model()
    cfg = EuclideanConfig(SITE, 0.3)
    concept = TokenSet.from_ids([7], d_vocab=net.cfg.d_vocab)
    runs = steer_batch(net, cfg, concept, PROMPTS[:3])
    for run, prompt in zip(runs, PROMPTS[:3], strict=True):
        assert_same_run(run, steer_iteratively(net, cfg, concept, prompt))


def test_batch_bad_input(model):
    cfg = EuclideanConfig(SITE, 0.4)
    concept = concepts(model)[0]
    with pytest.raises(errors.InputError, match=r"concept: one for every prompt or one per prompt"):
        steer_batch(model, cfg, concepts(model)[:3], PROMPTS)
    with pytest.raises(errors.InputError, match=r"stop_on: one for every prompt"):
        steer_batch(model, cfg, concept, PROMPTS, stop_on=concepts(model)[:2])
    with pytest.raises(errors.InputError, match="no prompts given"):
        steer_batch(model, cfg, concept, [])
    with pytest.raises(errors.InputError, match=r"prompt 1 has no tokens"):
        steer_batch(model, cfg, concept, [PROMPTS[0], torch.tensor([], dtype=torch.long)])
    too_long = torch.zeros(model.cfg.n_ctx + 1, dtype=torch.long)
    with pytest.raises(errors.InputError, match=r"prompt 1 has .* past the model's context"):
        steer_batch(model, cfg, concept, [PROMPTS[0], too_long])
    tokens = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with pytest.raises(errors.InputError, match=r"rows \[1\] of the attention mask"):
        steer_batch(
            model, cfg, concept, tokens, attention_mask=torch.tensor([[1, 1, 1], [0, 0, 0]])
        )
    with pytest.raises(errors.InputError, match="the attention mask has shape"):
        steer_batch(model, cfg, concept, tokens, attention_mask=torch.ones(2, 2))
    with unchecked(), pytest.raises(errors.InputError, match="a concept must have"):
        steer_batch(model, cfg, [concept, "past"], PROMPTS[:2])
    with (
        StackedPaths(model, PROMPTS[:2], SITE) as paths,
        unchecked(),
        pytest.raises(errors.InputError, match=r"counts gives the number of rows"),
    ):
        paths.logits(torch.stack([p.x0 for p in paths.paths]), [1])


def test_a_failing_prompt_is_named_and_the_model_left_as_found(model):
    class Flat(TokenSet):
        """A concept whose gradient vanishes: the loop refuses the step."""

        def value(self, x, logits):
            return super().value(x, logits) * 0.0 + x.sum() * 0.0

    snapshot = weights_snapshot(model)
    flat = Flat.from_ids([7], d_vocab=model.cfg.d_vocab)
    cs = [*concepts(model)[:2], flat]
    with pytest.raises(errors.MethodError, match=r"prompt 2 of the batch: .*does not raise"):
        steer_batch(
            model, EuclideanConfig(SITE, 0.4, target_value=1.0, max_steps=3), cs, PROMPTS[:3]
        )
    assert_untouched(model, snapshot)
