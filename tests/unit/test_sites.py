"""Site parsing, validation and enumeration, and every Site error."""

from __future__ import annotations

import pytest

from steerlens.errors import SiteError
from steerlens.sites import KINDS, Site, all_sites, as_site
from tests.conftest import unchecked


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
    with unchecked(), pytest.raises(SiteError, match="must be an int"):
        Site("resid_pre", "1")  # type: ignore[arg-type]
    with unchecked(), pytest.raises(SiteError, match="invalid position"):
        Site("resid_pre", 1, position="middle")  # type: ignore[arg-type]
    with unchecked(), pytest.raises(SiteError, match="string or a Site"):
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
