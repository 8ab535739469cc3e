"""Hooks at sites (``steerlens.hooks``): recording, editing, adding and scaling activations, each
checked against a hand-written TransformerLens hook, and the model left as found every time."""

from __future__ import annotations

import pytest
import torch

from steerlens.errors import InputError, NonFiniteError
from steerlens.hooks import (
    add_vector,
    check_vector,
    edit_at,
    hooked,
    record,
    scale_activation,
    site_index,
)
from steerlens.sites import Site, all_sites
from tests.conftest import assert_untouched, hook_count, unchecked, weights_snapshot


@torch.no_grad()
def manual_logits(model, tokens, hook_name, edit):
    """The reference: the same edit as a plain TransformerLens hook."""

    def hook(act, hook):
        act = act.clone()
        edit(act)
        return act

    with model.hooks(fwd_hooks=[(hook_name, hook)]):
        return model(tokens[None])


# ----------------------------------------------------------------------------- hooked


def test_hooked_nests_and_leaves_other_hooks(model, tokens):
    """Each context removes only its own hooks: nested contexts unwind in order, an exception
    inside removes them, and a hook the user added outside stays."""
    name = "blocks.0.hook_resid_post"
    calls: list[str] = []

    def tag(label):
        def hook(act, hook):
            calls.append(label)

        return hook

    level = model.context_level
    user = model.hook_dict[name]
    user.add_hook(tag("user"))
    try:
        with hooked(model, [(name, tag("outer"))]):
            with hooked(model, [(name, tag("inner")), ("blocks.1.hook_resid_pre", tag("pre"))]):
                model(tokens[None])
            assert sorted(calls) == ["inner", "outer", "pre", "user"]
            calls.clear()
            with pytest.raises(RuntimeError), hooked(model, [(name, tag("doomed"))]):
                raise RuntimeError("inside")
            model(tokens[None])
            assert sorted(calls) == ["outer", "user"]
        calls.clear()
        model(tokens[None])
        assert calls == ["user"]
        with pytest.raises(KeyError), hooked(model, [(name, tag("a")), ("no.such.hook", tag("b"))]):
            pass
        calls.clear()
        model(tokens[None])
        assert calls == ["user"]
    finally:
        user.remove_hooks("fwd")
    assert hook_count(model) == 0 and model.context_level == level


def test_hooked_need_result_turns_on_the_per_head_result(model, tokens):
    snap = weights_snapshot(model)
    seen: list[torch.Size] = []
    hooks = [("blocks.0.attn.hook_result", lambda act, hook: seen.append(act.shape))]
    with hooked(model, hooks, need_result=True):
        assert model.cfg.use_attn_result
        model(tokens[None])
    assert seen == [torch.Size([1, len(tokens), model.cfg.n_heads, model.cfg.d_model])]
    assert not model.cfg.use_attn_result
    with hooked(model, hooks):  # without it the hook point never fires
        model(tokens[None])
    assert len(seen) == 1
    assert_untouched(model, snap)


# ----------------------------------------------------------------------------- record


def test_record_every_kind(model, tokens):
    snap = weights_snapshot(model)
    sites = all_sites(model, per_head=False) + [Site("z", 1, 2)]
    with record(model, sites) as acts:
        model(tokens[None])
    for site in sites:
        act = acts[site.name]
        assert act.shape[:2] == (1, tokens.shape[0])
        assert act[0, -1].numel() == site.dim(model)
    assert_untouched(model, snap)


def test_record_selects_the_head_and_keeps_the_last_pass(model, tokens):
    head = Site("z", 1, 2)
    with record(model, [head, "z.1"]) as acts:
        model(tokens[None])
        first = acts[head.name]
        model(tokens.flip(0)[None])
    torch.testing.assert_close(acts[head.name], acts["blocks.1.attn.hook_z"][:, :, 2])
    _, cache = model.run_with_cache(tokens.flip(0)[None])
    torch.testing.assert_close(acts[head.name], cache["blocks.1.attn.hook_z"][:, :, 2])
    assert not torch.equal(first, acts[head.name])


def test_record_detaches_unless_asked_not_to(model, tokens):
    with torch.enable_grad():
        with record(model, ["resid_post.0"], detach=False) as kept:
            model(tokens[None])
        with record(model, ["resid_post.0"]) as cut:
            model(tokens[None])
    assert kept["blocks.0.hook_resid_post"].requires_grad
    assert not cut["blocks.0.hook_resid_post"].requires_grad
    torch.testing.assert_close(
        kept["blocks.0.hook_resid_post"].detach(), cut["blocks.0.hook_resid_post"]
    )
    assert hook_count(model) == 0


# ----------------------------------------------------------------------------- check_vector


@pytest.mark.parametrize(
    ("vector", "error", "match"),
    [
        ([0.0] * 16, InputError, "must be a torch.Tensor"),
        (torch.zeros(15, dtype=torch.float64), InputError, r"needs shape \(16,\)"),
        (torch.zeros(16, dtype=torch.int64), InputError, "real floating-point"),
        (torch.zeros(16, dtype=torch.complex128), InputError, "real floating-point"),
        (torch.zeros(16, dtype=torch.float64, device="meta"), InputError, "meta device"),
        (torch.full((16,), float("inf"), dtype=torch.float64), NonFiniteError, "NaN or inf"),
    ],
    ids=["list", "shape", "int", "complex", "meta", "inf"],
)
def test_check_vector_refuses(model, vector, error, match):
    with unchecked(), pytest.raises(error, match=match):  # a list is not a Tensor
        check_vector(vector, Site("resid_post", 0), model)


def test_check_vector_accepts_a_finite_vector_of_the_site_width(model):
    check_vector(torch.zeros(16, dtype=torch.float32), Site("resid_post", 0), model)
    check_vector(torch.ones(model.cfg.d_head, dtype=torch.float64), Site("z", 0, 1), model)


# ----------------------------------------------------------------------------- site_index


def test_site_index():
    everything = slice(None)
    assert site_index(Site("resid_post", 0), 5) == (everything, 4)
    assert site_index(Site("resid_post", 0, position="all"), 5) == (everything, everything)
    assert site_index(Site("resid_post", 0, position=2), 5) == (everything, 2)
    assert site_index(Site("z", 0, 3, position=2), 5) == (everything, 2, 3)
    assert site_index(Site("resid_post", 0, position=5), 5) is None  # not in this pass
    with pytest.raises(InputError, match="resolve it first"):
        site_index(Site("resid_post", 0, position=-1), 5)


# ----------------------------------------------------------------------------- edit_at


def test_edit_at_edits_the_site_slice_only(model, tokens):
    site = Site("z", 0, 1, position=2)
    shapes: list[torch.Size] = []

    def edit(x, shape):
        shapes.append(shape)
        return -x

    with edit_at(model, site, edit), torch.no_grad():
        got = model(tokens[None])

    def flip(act):
        act[:, 2, 1] = -act[:, 2, 1]

    torch.testing.assert_close(got, manual_logits(model, tokens, site.hook_name, flip))
    assert shapes == [torch.Size([model.cfg.d_head])]
    assert hook_count(model) == 0


def test_edit_at_a_position_past_the_pass_changes_nothing(model, tokens):
    calls: list[int] = []
    site = Site("resid_post", 0, position=len(tokens))
    with edit_at(model, site, lambda x, shape: calls.append(1) or x + 1.0), torch.no_grad():
        got = model(tokens[None])
    with torch.no_grad():
        assert torch.equal(got, model(tokens[None]))
    assert calls == []


# ----------------------------------------------------------------------------- add_vector


@pytest.mark.parametrize("position", ["last", "all", 2])
def test_add_vector_matches_manual_edit(model, tokens, position):
    site = Site("z", 0, 1, position)
    vec = torch.linspace(-1, 1, site.dim(model), dtype=torch.float64)
    with add_vector(model, site, vec, scale=0.5):
        steered = model(tokens[None])

    def manual(act, hook):
        act = act.clone()
        idx = slice(None) if position == "all" else (-1 if position == "last" else position)
        act[0, idx, 1] += 0.5 * vec
        return act

    with model.hooks(fwd_hooks=[(site.hook_name, manual)]):
        want = model(tokens[None])
    assert torch.allclose(steered, want)
    assert hook_count(model) == 0


def test_add_vector_at_last_steers_the_last_position_of_every_pass(model, tokens):
    vec = torch.linspace(-1, 1, model.cfg.d_model, dtype=torch.float64)
    name = "blocks.0.hook_resid_post"
    with add_vector(model, "resid_post.0", vec), torch.no_grad():
        short, long = model(tokens[None, :3]), model(tokens[None])

    def at_last(act):
        act[0, -1] += vec

    torch.testing.assert_close(short, manual_logits(model, tokens[:3], name, at_last))
    torch.testing.assert_close(long, manual_logits(model, tokens, name, at_last))


def test_add_vector_errors_leave_no_hooks(model, tokens):
    snap = weights_snapshot(model)
    with pytest.raises(InputError, match="shape"):
        with add_vector(model, "resid_pre.0", torch.zeros(3, dtype=torch.float64)):
            pass
    with pytest.raises(NonFiniteError):
        with add_vector(model, "resid_pre.0", torch.full((16,), float("nan"), dtype=torch.float64)):
            pass
    with pytest.raises(NonFiniteError, match="overflows"):
        with add_vector(model, "resid_pre.0", torch.full((16,), 10.0, dtype=torch.float64), 1e308):
            pass
    with pytest.raises(KeyboardInterrupt):
        with add_vector(model, "result.0:1", torch.ones(16, dtype=torch.float64)):
            raise KeyboardInterrupt
    assert_untouched(model, snap)


# ----------------------------------------------------------------------------- scale_activation


@pytest.mark.parametrize(
    ("spec", "factor"),
    [("mlp_out.0@all", 0.0), ("z.1:2", -1.0), ("resid_mid.0@3", 2.0)],
)
def test_scale_activation_matches_manual_scaling(model, tokens, spec, factor):
    snap = weights_snapshot(model)
    site = Site.parse(spec)
    with scale_activation(model, site, factor), torch.no_grad():
        got = model(tokens[None])
    index = site_index(site, len(tokens))

    def scale(act):
        act[index] = factor * act[index]

    want = manual_logits(model, tokens, site.hook_name, scale)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    with torch.no_grad():
        assert not torch.allclose(got, model(tokens[None]))  # the edit did something
    assert_untouched(model, snap)


def test_scale_activation_by_one_changes_nothing_and_refuses_non_finite(model, tokens):
    with scale_activation(model, "resid_post.0@all", 1.0), torch.no_grad():
        got = model(tokens[None])
    with torch.no_grad():
        assert torch.equal(got, model(tokens[None]))
    for factor in (float("nan"), float("inf")):
        with pytest.raises(NonFiniteError, match="not finite"):
            with scale_activation(model, "resid_post.0", factor):
                pass
    assert hook_count(model) == 0
