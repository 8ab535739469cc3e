"""Padded batches: an intervention applied with the batch's attention mask steers each row as it
steers that prompt alone (right and left padding, float64 tiny models, to 1e-10)."""

from __future__ import annotations

import pytest
import torch

from steerlens import errors
from steerlens.methods import Intervention
from steerlens.testing import tiny_model
from tests.conftest import hook_count

ROWS = [[3, 1, 4], [1, 5, 9, 2, 6], [5, 3, 5, 8]]


def padded(side: str) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(r) for r in ROWS)
    tokens = torch.zeros(len(ROWS), n, dtype=torch.long)
    mask = torch.zeros(len(ROWS), n, dtype=torch.long)
    for i, row in enumerate(ROWS):
        at = slice(0, len(row)) if side == "right" else slice(n - len(row), n)
        tokens[i, at], mask[i, at] = torch.tensor(row), 1
    return tokens, mask


def interventions(model) -> list[Intervention]:
    g = torch.Generator().manual_seed(0)
    d = model.cfg.d_model
    v = torch.randn(d, generator=g, dtype=torch.float64)
    return [
        Intervention("last", {"resid_post.0@last": v}, 3.0),
        Intervention("all", {"resid_pre.1@all": v}),
        Intervention("second", {"resid_mid.0@1": v}, 2.0),
        Intervention("head", {}, 1.0, multipliers={"z.0:1@all": -0.5, "mlp_out.1@last": 0.7}),
    ]


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_a_padded_batch_is_steered_row_by_row_as_alone(flavour, side):
    model = tiny_model(flavour)
    tokens, mask = padded(side)
    for iv in interventions(model):
        with torch.no_grad(), iv.apply(model, attention_mask=mask):
            batch = model(tokens, attention_mask=mask, padding_side=side)
        for i, row in enumerate(ROWS):
            with torch.no_grad(), iv.apply(model):
                alone = model(torch.tensor([row]))[0]
            got = batch[i][mask[i].bool()]
            assert torch.allclose(got, alone, atol=1e-10, rtol=0), (iv.method, i)
        with torch.no_grad():
            clean = model(tokens, attention_mask=mask, padding_side=side)
        assert not torch.allclose(clean, batch)  # it did steer
    assert hook_count(model) == 0


def test_a_generation_step_steers_each_new_token():
    """With the cache, a step runs one new token a row: ``@last`` steers it; ``@1`` does not."""
    model = tiny_model("gpt2")
    tokens, mask = padded("right")
    v = torch.ones(model.cfg.d_model, dtype=torch.float64)
    step = torch.tensor([[2], [7], [4]])
    for spec, steered in (("resid_post.0@last", True), ("resid_post.0@1", False)):
        calls = []

        def probe(act, hook, calls=calls):
            calls.append(act.clone())

        iv = Intervention("v", {spec: v})
        with iv.apply(model, attention_mask=mask), torch.no_grad():
            with model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", probe)]):
                model(step[:, :1].expand(3, 1).contiguous())
        with torch.no_grad(), model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", probe)]):
            model(step)
        assert torch.allclose(calls[0] - calls[1], v.expand_as(calls[0])) == steered


@pytest.mark.parametrize(
    ("mask", "match"),
    [
        (torch.ones(2, 5, dtype=torch.long), "mask has 2 rows but the forward pass"),
        (torch.ones(3, 4, dtype=torch.long), "covers 4 positions but the forward pass"),
        (torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 0]]), r"rows \[1\]"),
        (torch.full((3, 5), 2), "only 0"),
        (torch.ones(5), r"\[batch, pos\]"),
    ],
)
def test_bad_masks_are_named_and_the_model_is_left_clean(mask, match):
    model = tiny_model("gpt2")
    tokens, _ = padded("right")
    iv = Intervention(
        "v", {"resid_post.0@last": torch.ones(model.cfg.d_model, dtype=torch.float64)}
    )
    with pytest.raises(errors.InputError, match=match):
        with iv.apply(model, attention_mask=mask), torch.no_grad():
            model(tokens)
    assert hook_count(model) == 0


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_the_metric_of_a_padded_batch_is_that_of_its_rows(flavour, side):
    import steerlens as sl

    model = tiny_model(flavour)
    tokens, mask = padded(side)
    rows = [torch.tensor(r) for r in ROWS]
    got = sl.pullback_metric(model, tokens, "resid_post.0", vocab="full", attention_mask=mask)
    want = sl.pullback_metric(model, rows, "resid_post.0", vocab="full")
    assert torch.allclose(got.matrix(), want.matrix(), atol=1e-10, rtol=0)
    sites = ["resid_pre.1", "z.0:1", "mlp_out.1"]
    sweep = sl.pullback_sweep(model, tokens, sites, vocab="full", attention_mask=mask)
    each = sl.pullback_sweep(model, rows, sites, vocab="full")
    for s in sites:
        assert torch.allclose(sweep[s].matrix(), each[s].matrix(), atol=1e-10, rtol=0)
    mean = sl.expected_metric(model, tokens, sites[:1], attention_mask=mask, progress=False)
    ref = sl.expected_metric(model, rows, sites[:1], progress=False)
    name = next(iter(ref))
    assert torch.allclose(mean[name].matrix(), ref[name].matrix(), atol=1e-10, rtol=0)


def test_a_padded_batch_with_a_bad_mask_is_named():
    import steerlens as sl

    model = tiny_model("gpt2")
    tokens, mask = padded("right")
    holes = mask.clone()
    holes[1, 1] = 0
    with pytest.raises(errors.InputError, match="row 1 of the attention mask has padding between"):
        sl.pullback_metric(model, tokens, "resid_post.0", attention_mask=holes)
    with pytest.raises(errors.InputError, match=r"shape \(3, 4\) but the tokens have shape"):
        sl.pullback_metric(model, tokens, "resid_post.0", attention_mask=mask[:, :4])
    with pytest.raises(errors.InputError, match="goes with a"):
        sl.pullback_metric(model, "a b", "resid_post.0", attention_mask=mask)
    empty = mask.clone()
    empty[2] = 0
    with pytest.raises(errors.InputError, match=r"rows \[2\]"):
        sl.expected_metric(model, tokens, ["resid_post.0"], attention_mask=empty)
