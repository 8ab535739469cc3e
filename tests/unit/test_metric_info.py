"""MetricInfo: what each way of computing a metric records, read by attribute; bad records
refused; the old mapping reads still give the same values for one release, with a warning that
names the attribute; the reprs read the record; the record survives JSON."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
import torch

import steerlens as sl
from steerlens import errors
from steerlens.metric import Metric, MetricInfo, MetricOptions, OffTarget, pullback_metric
from steerlens.metric.dataset import expected_metric
from steerlens.metric.local import LocalPath
from steerlens.metric.outcomes import DEFAULT_DROPPED_MASS
from steerlens.metric.pullback import lens_rows, pullback_sweep
from steerlens.metric.state import prompt_state

PROMPTS = [torch.tensor([3, 1, 4, 1]), torch.tensor([5, 9, 2, 6, 5])]
SITE = "blocks.0.hook_resid_post"


def test_exported_where_metric_is():
    assert sl.MetricInfo is MetricInfo
    assert "MetricInfo" in sl.__all__


def test_pullback_metric_records_how_it_was_computed(model):
    off = OffTarget.complement([3, 9])
    info = pullback_metric(model, PROMPTS, "resid_post.0", depth=1, off_target=off).info
    assert isinstance(info, MetricInfo)
    assert info.vocab == "auto" and 0 <= info.dropped_mass <= DEFAULT_DROPPED_MASS
    assert info.mean_dropped_mass is not None and info.mean_dropped_mass <= info.dropped_mass
    assert info.top_k is not None and info.top_k > 0
    assert (info.n_prompts, info.depth, info.off_target) == (2, 1, off.name)
    assert (info.samples, info.seed, info.world_size, info.rank) == (None, None, None, None)
    full = pullback_metric(model, PROMPTS[0], "resid_post.0", vocab="full").info
    assert full is not None and (full.vocab, full.dropped_mass, full.n_prompts) == ("full", 0.0, 1)


def test_sweep_info_is_its_metrics_info(model):
    sweep = pullback_sweep(model, PROMPTS, ["resid_pre.0", "z.1:0"], decompose=False)
    assert isinstance(sweep.info, MetricInfo)
    assert sweep.info.n_prompts == 2 and sweep.info.depth is None
    assert all(m.info == sweep.info for m in sweep.values())


def test_expected_metric_records_the_dataset(model):
    exact = expected_metric(model, PROMPTS, "resid_post.0", depth=0, progress=False)[SITE].info
    assert exact == MetricInfo("auto", exact.dropped_mass, n_prompts=2, depth=0, world_size=1), (
        "a dataset mean records no top K"
    )
    sampled = expected_metric(model, PROMPTS, "resid_post.0", samples=4, seed=3, progress=False)
    info = sampled[SITE].info
    assert info is not None and (info.vocab, info.samples, info.seed) == ("sampled", 4, 3)


def test_local_path_records_depth_and_off_target(model, tokens):
    off = OffTarget.pair_merge({5: 6})
    with LocalPath(model, tokens, "resid_post.0") as path:
        info = path.metric(path.x0, MetricOptions(off_target=off), depth=1).info
    assert info is not None and (info.depth, info.off_target, info.n_prompts) == (1, off.name, 1)


def test_sampled_lens_rows_record_samples_and_seed(model, tokens):
    state = prompt_state(model, tokens)
    _, info = lens_rows(model, state.resid[-1], MetricOptions(samples=6, seed=11))
    assert (info.vocab, info.samples, info.seed, info.dropped_mass) == ("sampled", 6, 11, 0.0)
    assert info.top_k is not None and 1 <= info.top_k <= 6


def test_truncation_records_its_rank_and_keeps_the_rest(model, tokens):
    metric = pullback_metric(model, tokens, "resid_post.0")
    cut = metric.truncated(rank=3)
    assert cut.info == dataclasses.replace(metric.info, rank=3)  # type: ignore[type-var]
    assert Metric(torch.eye(4, dtype=torch.float64), "given").truncated(rank=2).info is None


def test_info_is_frozen():
    info = MetricInfo("full", 0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.vocab = "auto"  # type: ignore[misc]


@pytest.mark.parametrize("vocab", ["top-k", "", "Full"])
def test_unknown_vocab_names_the_valid_ones(vocab):
    with pytest.raises(
        errors.InputError, match=rf"unknown vocab mode {vocab!r}.*auto, full, sampled"
    ):
        MetricInfo(vocab, 0.0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"dropped_mass": -1e-3}, "dropped_mass"),
        ({"dropped_mass": math.nan}, "dropped_mass"),
        ({"dropped_mass": 1.5}, "dropped_mass"),
        ({"dropped_mass": 0.0, "mean_dropped_mass": -0.5}, "mean_dropped_mass"),
    ],
)
def test_bad_dropped_mass_is_refused(kwargs, field):
    with pytest.raises(errors.InputError, match=rf"{field} is a probability mass in \[0, 1\]"):
        MetricInfo("auto", **kwargs)


def test_no_prompts_is_refused():
    with pytest.raises(errors.InputError, match="n_prompts must be >= 1, got 0"):
        MetricInfo("auto", 0.0, n_prompts=0)


# ------------------------------------------------------------------ the deprecated mapping view
INFO = MetricInfo("auto", 2e-5, top_k=40, mean_dropped_mass=1e-5, n_prompts=3, off_target="x")


@pytest.mark.parametrize("key", [f.name for f in dataclasses.fields(MetricInfo)])
def test_item_reads_warn_naming_the_attribute_and_give_its_value(key):
    with pytest.warns(DeprecationWarning, match=rf"info\[{key!r}\].*use the attribute info\.{key}"):
        value = INFO[key]
    assert value == getattr(INFO, key)


def test_mapping_reads_warn_and_see_the_fields_that_apply():
    recorded = {
        "vocab": "auto",
        "dropped_mass": 2e-5,
        "top_k": 40,
        "mean_dropped_mass": 1e-5,
        "n_prompts": 3,
        "off_target": "x",
    }
    assert INFO.recorded() == recorded
    with pytest.warns(DeprecationWarning, match=r"info\.get\('top_k'\).*info\.top_k"):
        assert INFO.get("top_k") == 40
    with pytest.warns(DeprecationWarning, match=r"info\.get\('seed'\).*info\.seed"):
        assert INFO.get("seed", 7) == 7  # not recorded, as the old dicts left it out
    with pytest.warns(DeprecationWarning, match=r"'seed' in info.*info\.seed is not None"):
        assert "seed" not in INFO
    with pytest.warns(DeprecationWarning, match=r"'vocab' in info"):
        assert "vocab" in INFO
    with pytest.warns(DeprecationWarning, match=r"info\.keys\(\).*dataclasses\.fields"):
        assert list(INFO.keys()) == list(recorded)
    with pytest.warns(DeprecationWarning, match=r"info\.items\(\)"):
        assert dict(INFO.items()) == recorded
    with pytest.warns(DeprecationWarning, match=r"info\.values\(\)"):
        assert list(INFO.values()) == list(recorded.values())
    with pytest.warns(DeprecationWarning, match=r"iter\(info\)"):
        assert list(INFO) == list(recorded)
    with pytest.warns(DeprecationWarning):
        assert {**INFO} == recorded  # type: ignore[dict-item]


def test_unknown_key_fails_naming_the_fields():
    with pytest.warns(DeprecationWarning), pytest.raises(KeyError, match="fields: vocab, "):
        _ = INFO["top-k"]


def test_old_read_on_a_computed_metric_still_works(model, tokens):
    metric = expected_metric(model, [tokens], "resid_post.0", samples=5, progress=False)[SITE]
    with pytest.warns(DeprecationWarning, match=r"use the attribute info\.samples"):
        assert metric.info["samples"] == 5  # type: ignore[index]


# ------------------------------------------------------------------ reprs and JSON
def test_reprs_read_the_record(model, tokens):
    off = OffTarget.complement([3])
    metric = pullback_metric(model, tokens, "resid_post.0", off_target=off)
    assert metric.info is not None
    text = repr(metric)
    assert f"vocab='auto', dropped_mass={metric.info.dropped_mass!r}, n_prompts=1" in text
    assert f"depth=None, off_target={off.name!r})" in text
    assert repr(metric.truncated(rank=2)).endswith("rank=2)")
    html = metric._repr_html_()
    assert re.search(rf"<th>top_k</th>\s*<td>{metric.info.top_k}</td>", html)
    assert "<th>seed</th>" not in html and "<th>depth</th>" not in html
    assert (
        repr(Metric(torch.eye(2, dtype=torch.float64), "given")) == "Metric('given', d=2, 2 rows)"
    )
    sweep = pullback_sweep(model, tokens, ["resid_pre.1"])
    assert repr(sweep) == (
        "Sweep(1 sites, 2 layers, "
        + ", ".join(f"{k}={v!r}" for k, v in sweep.info.recorded().items())
        + ")"
    )
    assert "None" not in repr(sweep) and f"top_k={sweep.info.top_k}" in sweep._repr_html_()


def test_record_round_trips_through_json(model):
    sampled = expected_metric(model, PROMPTS, "resid_post.0", samples=3, seed=1, progress=False)
    computed = [
        pullback_metric(model, PROMPTS, "resid_post.0", depth=1).truncated(rank=2).info,
        sampled[SITE].info,
        INFO,
    ]
    for info in computed:
        assert info is not None
        text = json.dumps(dataclasses.asdict(info))
        assert MetricInfo(**json.loads(text)) == info
