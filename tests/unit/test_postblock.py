"""Post-block steering and the bias-edit export on tiny float64 models: a reference training
loop, the edited copy's logits against the steered model's, the user's model untouched."""

from __future__ import annotations

import pytest
import torch

import steerlens as sl
from steerlens import errors
from steerlens.concepts import PairConcept
from steerlens.methods import Intervention, bias_edit, postblock_intervention
from tests.conftest import assert_untouched, hook_count, weights_snapshot

PROMPTS = [torch.tensor([3, 1, 4, 1, 5]), torch.tensor([2, 7, 1, 8])]


def test_postblock_matches_a_reference_adam_loop(model):
    concept = PairConcept(5, 9)
    before = weights_snapshot(model)
    iv = postblock_intervention(model, concept, PROMPTS, 0, steps=20, lr=0.05, l2=1e-2)
    assert_untouched(model, before)
    assert all(p.requires_grad for p in model.parameters())  # restored as found

    gen = torch.Generator().manual_seed(0)
    delta = 1e-3 * torch.randn(model.cfg.d_model, generator=gen, dtype=torch.float64)
    delta.requires_grad_(True)
    opt = torch.optim.Adam([delta], lr=0.05)

    def hook(act, hook):
        return act + delta

    for _ in range(20):
        opt.zero_grad()
        values = [
            concept.value(
                None,
                model.run_with_hooks(t[None], fwd_hooks=[("blocks.0.hook_resid_post", hook)])[
                    0, -1
                ],
            )
            for t in PROMPTS
        ]
        loss = -torch.stack(values).mean() + 1e-2 * delta.pow(2).sum()
        loss.backward()
        opt.step()
    torch.testing.assert_close(iv.vector(), delta.detach(), rtol=1e-7, atol=1e-10)
    assert iv.info["end"]["value"] > iv.info["start"]["value"]
    assert iv.sites == ("blocks.0.hook_resid_post@all",)


def test_fit_registry_and_save_load(gpt2_model, tmp_path):
    iv = sl.fit(
        gpt2_model,
        "postblock",
        concept=PairConcept(5, 9),
        prompt=PROMPTS,
        layer=1,
        steps=5,
        position="last",
    )
    assert iv.method == "postblock" and iv.sites == ("blocks.1.hook_resid_post",)
    loaded = sl.load_intervention(iv.save(tmp_path / "pb"))
    torch.testing.assert_close(loaded.vector(), iv.vector())
    assert "postblock" in set(sl.list_methods().name)


@pytest.mark.parametrize("kind", ["resid_post", "mlp_out"])
def test_bias_edit_reproduces_the_steered_logits(model, kind):
    gen = torch.Generator().manual_seed(3)
    iv = Intervention(
        "v",
        {
            f"{kind}.0@all": torch.randn(model.cfg.d_model, generator=gen, dtype=torch.float64),
            f"{kind}.1@all": torch.randn(model.cfg.d_model, generator=gen, dtype=torch.float64),
        },
        scale=0.7,
    )
    before = weights_snapshot(model)
    edited = bias_edit(model, iv)
    assert_untouched(model, before)
    tokens = torch.tensor([[4, 8, 15, 16, 23, 42 % model.cfg.d_vocab]])
    with iv.apply(model):
        steered = model(tokens)
    torch.testing.assert_close(edited(tokens), steered, rtol=1e-10, atol=1e-10)
    assert hook_count(edited) == 0 and hook_count(model) == 0
    assert not torch.allclose(edited(tokens), model(tokens))


@pytest.mark.parametrize(
    ("site", "message"),
    [
        ("resid_post.0", "every position"),
        ("resid_mid.0@all", "bias edit"),
        ("attn_out.0@all", "bias edit"),
    ],
)
def test_bias_edit_refuses_what_is_not_a_bias(gpt2_model, site, message):
    iv = Intervention("v", {site: torch.ones(gpt2_model.cfg.d_model, dtype=torch.float64)})
    with pytest.raises(errors.MethodError, match=message):
        bias_edit(gpt2_model, iv)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"position": "first"}, "position must be"),
        ({"steps": 0}, "steps >= 1"),
        ({"lr": float("nan")}, "lr > 0"),
    ],
)
def test_postblock_bad_options(gpt2_model, kwargs, message):
    with pytest.raises(errors.InputError, match=message):
        postblock_intervention(gpt2_model, PairConcept(5, 9), PROMPTS, 0, **kwargs)
    assert hook_count(gpt2_model) == 0
