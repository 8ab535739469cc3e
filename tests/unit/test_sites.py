"""Site parsing, validation and enumeration, and every Site error."""

from __future__ import annotations

import pytest
import torch

from steerlens.errors import InputError, NonFiniteError, SiteError
from steerlens.hooks import add_vector, record
from steerlens.sites import KINDS, Site, all_sites, as_site
from tests.conftest import assert_untouched, hook_count, weights_snapshot


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("blocks.6.hook_resid_post", Site("resid_post", 6)),
        ("resid_post.6", Site("resid_post", 6)),
        ("blocks.6.attn.hook_z:3", Site("z", 6, 3)),
        ("z.6:3", Site("z", 6, 3)),
        ("blocks.0.mlp.hook_pre", Site("mlp_pre", 0)),
        ("mlp_post.2", Site("mlp_post", 2)),
        ("blocks.1.attn.hook_result:0", Site("result", 1, 0)),
        ("attn_out.1@all", Site("attn_out", 1, position="all")),
        ("resid_pre.0@-2", Site("resid_pre", 0, position=-2)),
        ("resid_mid.-1@3", Site("resid_mid", -1, position=3)),
        (" blocks.2.hook_mlp_out ", Site("mlp_out", 2)),
    ],
)
def test_parse(spec, expected):
    assert Site.parse(spec) == expected


def test_name_round_trips():
    for kind in KINDS:
        head = 1 if kind in ("z", "result") else None
        for pos in ("last", "all", 2, -1):
            site = Site(kind, 3, head, pos)
            assert Site.parse(site.name) == site
            assert Site.parse(str(site)) == site


@pytest.mark.parametrize(
    "spec,match",
    [
        ("blocks.6.hook_resid_banana", "unknown hook"),
        ("banana.6", "unknown site kind"),
        ("resid_post", "cannot parse"),
        ("blocks.x.hook_resid_post", "cannot parse"),
        ("z.6:x", "invalid head"),
        ("z.6:-1", "invalid head"),
        ("resid_post.6:2", "has no heads"),
        ("resid_post.6@first", "invalid position"),
        ("", "cannot parse"),
    ],
)
def test_parse_errors(spec, match):
    with pytest.raises(SiteError, match=match):
        Site.parse(spec)


def test_constructor_errors():
    with pytest.raises(SiteError, match="unknown site kind"):
        Site("resid", 0)
    with pytest.raises(SiteError, match="must be an int"):
        Site("resid_pre", "1")  # type: ignore[arg-type]
    with pytest.raises(SiteError, match="invalid position"):
        Site("resid_pre", 1, position="middle")  # type: ignore[arg-type]
    with pytest.raises(SiteError, match="string or a Site"):
        Site.parse(3)  # type: ignore[arg-type]


def test_validate(model):
    assert as_site("resid_post.-1", model) == Site("resid_post", 1)
    with pytest.raises(SiteError, match=r"out of range.*valid: 0\.\.1"):
        as_site("resid_post.2", model)
    with pytest.raises(SiteError, match=r"out of range.*valid: 0\.\.1"):
        as_site("resid_post.-3", model)
    with pytest.raises(SiteError, match=r"head 4 is out of range.*valid: 0\.\.3"):
        as_site("z.0:4", model)


def test_resolve_position():
    site = Site("resid_pre", 0, position=-2)
    assert site.resolve_position(5) == 3
    assert Site("resid_pre", 0).resolve_position(5) == 4
    assert Site("resid_pre", 0, position="all").resolve_position(5) == "all"
    with pytest.raises(SiteError, match="past the prompt"):
        Site("resid_pre", 0, position=5).resolve_position(5)
    with pytest.raises(SiteError, match="past the prompt"):
        site.resolve_position(1)


def test_dims_and_enumeration(model):
    cfg = model.cfg
    assert Site("z", 0, 1).dim(model) == cfg.d_head
    assert Site("z", 0).dim(model) == cfg.d_head * cfg.n_heads
    assert Site("result", 0).dim(model) == cfg.d_model * cfg.n_heads
    assert Site("mlp_pre", 0).dim(model) == cfg.d_mlp
    sites = all_sites(model)
    per_layer = len(KINDS) - 2 + 2 * cfg.n_heads
    assert len(sites) == cfg.n_layers * per_layer
    assert len(all_sites(model, per_head=False)) == cfg.n_layers * len(KINDS)
    with pytest.raises(SiteError, match="unknown site kind"):
        all_sites(model, ["resid"])


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


def test_add_vector_errors_leave_no_hooks(model, tokens):
    snap = weights_snapshot(model)
    with pytest.raises(InputError, match="shape"):
        with add_vector(model, "resid_pre.0", torch.zeros(3, dtype=torch.float64)):
            pass
    with pytest.raises(NonFiniteError):
        with add_vector(model, "resid_pre.0", torch.full((16,), float("nan"), dtype=torch.float64)):
            pass
    with pytest.raises(KeyboardInterrupt):
        with add_vector(model, "result.0:1", torch.ones(16, dtype=torch.float64)):
            raise KeyboardInterrupt
    assert_untouched(model, snap)


def test_hooked_nests_and_leaves_other_hooks(model, tokens):
    """Each context removes only its own hooks: nested contexts unwind in order, an exception
    inside removes them, and a hook the user added outside stays."""
    from steerlens.hooks import hooked

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
