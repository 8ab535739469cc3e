"""The study's wide-grid stage on a tiny model: the extended strength grid, which records the
rule redoes, the records it writes in their place, and the runner leaving units for later."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from steerlens import errors
from steerlens.cli import main
from steerlens.datasets import VerbContext
from steerlens.evaluation import next_logprobs, strength_search
from steerlens.experiments.matched import MatchedSettings, context_records, pair_concept
from steerlens.experiments.runner import read_done, run_units
from steerlens.experiments.study import UnitInputs
from steerlens.experiments.wide import (
    GRID_END,
    WIDE_FACTOR,
    apply_wide,
    stopped_at_grid_end,
    widened_records,
)
from steerlens.methods import Intervention
from steerlens.metric.local import LocalPath
from steerlens.sites import Site

SETTINGS = MatchedSettings(targets=(0.5, 0.9), methods=("fishback",), step=0.5)
LAYER = 1


def test_the_grid_extends_only_while_the_share_still_rises_at_its_end():
    rising = strength_search(lambda s: s / 1000, [0.5], extend_to=4096.0)
    assert rising[0.5].reached and 500 <= rising[0.5].scale < 500.2
    assert rising[0.5].grid_end == 512.0  # one octave past 256 was enough
    plain = strength_search(lambda s: s / 1000, [0.5])
    assert not plain[0.5].reached and plain[0.5].grid_end == GRID_END

    # a share that peaks at 400 and falls again: the grid goes one octave past the peak, no more
    def bump(s: float) -> float:
        return 0.3 * math.exp(-((math.log(s + 1e-9) - math.log(400)) ** 2))

    peaked = strength_search(bump, [0.5], extend_to=1e5)
    assert not peaked[0.5].reached and peaked[0.5].reason == "never reached"
    assert peaked[0.5].peak_scale == pytest.approx(400, rel=0.02)
    assert 400 < peaked[0.5].grid_end <= 1024

    # a share that saturates below the target: the grid stops at extend_to, its last point
    saturating = strength_search(lambda s: 0.3 * (1 - math.exp(-s / 100)), [0.5], extend_to=3000.0)
    assert not saturating[0.5].reached and saturating[0.5].grid_end == 3000.0
    with pytest.raises(errors.InputError, match="extend_to"):
        strength_search(lambda s: s / 1000, [0.5], extend_to=-1.0)


def _context(model) -> VerbContext:
    ids = tuple(5 + (k * 7) % 40 for k in range(6))
    top = next_logprobs(model, torch.tensor(ids)).topk(2).indices.tolist()
    return VerbContext("context", ids, top[0], top[1], "v", "ved", 0)


def _small_gradient_direction(model, ctx: VerbContext, size: float) -> Intervention:
    """The concept gradient at the site, scaled to ``size``: a fixed direction that rises but,
    this short, cannot reach the targets within the main grid."""
    site = Site("resid_post", LAYER)
    with LocalPath(model, torch.tensor(ctx.token_ids), site) as path, torch.enable_grad():
        x = path.x0.clone().requires_grad_(True)
        g = torch.autograd.grad(pair_concept(ctx).value(x, path.logits(x)), x)[0].detach()
    return Intervention("probe", {site.name: size * g / g.norm()})


@pytest.fixture(scope="module")
def unit(gpt2_model):
    ctx = _context(gpt2_model)
    fixed = {"probe": _small_gradient_direction(gpt2_model, ctx, 1e-4)}
    merge = {ctx.base_id: ctx.target_id}
    common = {"concept": "synthetic", "context_index": 0}
    inputs = UnitInputs(ctx, LAYER, SETTINGS, fixed, merge, common)
    main_rows = context_records(gpt2_model, ctx, LAYER, SETTINGS, fixed, merge, common)
    return inputs, main_rows


def test_the_rule_redoes_the_fixed_rows_stopped_at_the_grid_end(gpt2_model, unit):
    inputs, main_rows = unit
    probe = [r for r in main_rows if r["method"] == "probe"]
    assert [r["reached"] for r in probe] == [False, False]
    assert all(r["strength"] == GRID_END for r in probe)  # still rising where the grid ends
    assert stopped_at_grid_end(main_rows) == {"probe": [0.5, 0.9]}

    wide = widened_records(gpt2_model, inputs, main_rows, "synthetic/000/1")
    assert [(r["method"], r["target_probability"]) for r in wide] == [
        ("probe", 0.5),
        ("probe", 0.9),
    ]
    residual = gpt2_model.run_with_cache(torch.tensor(inputs.ctx.token_ids))[1]
    norm = float(residual[f"blocks.{LAYER}.hook_resid_post"][0, -1].double().norm())
    for row, old in zip(wide, probe, strict=True):
        assert row["grid_end"] > GRID_END
        assert row["grid_end"] <= WIDE_FACTOR * norm / 1e-4 * (1 + 1e-9)
        assert row["edit_norm"] <= WIDE_FACTOR * norm * (1 + 1e-9)
        assert row["rho_path"] == old["rho_path"] or math.isnan(old["rho_path"])
        assert row["rho"] == pytest.approx(old["rho"], rel=1e-9)  # scale-free
    low = wide[0]
    assert low["reached"] and low["strength"] > GRID_END
    assert abs(low["probability"] - 0.5) < 2e-3  # the steered share, matched

    # a row reached on the main grid, or one that peaked before its end, is not redone
    reached = [dict(r, reached=True) if r["method"] == "probe" else r for r in main_rows]
    assert widened_records(gpt2_model, inputs, reached) == []
    early = [dict(r, strength=40.0) if r["method"] == "probe" else r for r in main_rows]
    assert stopped_at_grid_end(early) == {}


def test_the_wide_stage_refuses_a_direction_the_main_stage_did_not_fit(gpt2_model, unit):
    inputs, main_rows = unit
    other = [dict(r, peak_share=0.4) if r["method"] == "probe" else r for r in main_rows]
    with pytest.raises(errors.InputError, match="refitted direction"):
        widened_records(gpt2_model, inputs, other, "synthetic/000/1")


def test_apply_wide_replaces_exactly_the_redone_records():
    keys = {"concept": "past", "layer": 6}
    main = pd.DataFrame(
        [
            {**keys, "context_index": i, "method": m, "target_probability": t, "reached": False}
            for i in range(2)
            for m in ("fishback", "probe")
            for t in (0.5, 0.9)
        ]
    )
    redone = pd.DataFrame(
        [
            {**keys, "context_index": 1, "method": "probe", "target_probability": 0.5},
        ]
    ).assign(reached=True, grid_end=512.0)
    out = apply_wide(main, redone)
    assert len(out) == len(main)
    cols = ["context_index", "method", "target_probability"]
    assert out[cols].values.tolist() == main[cols].values.tolist()  # the main order
    changed = out[out["stage"] == "wide grid"]
    assert changed[cols].values.tolist() == [[1, "probe", 0.5]] and bool(changed["reached"].iloc[0])
    assert int(out["reached"].sum()) == 1
    assert apply_wide(main, pd.DataFrame())["stage"].eq("main").all()
    stray = redone.assign(context_index=7)
    with pytest.raises(errors.InputError, match="match no main record"):
        apply_wide(main, stray)


def test_the_runner_leaves_units_that_are_not_ready_for_a_later_run(tmp_path):
    ran: list[str] = []

    def work(key: str) -> list[dict]:
        ran.append(key)
        return [{"unit": key}]

    units = ["a", "b", "c"]
    assert run_units(tmp_path, {"job": 1}, units, work, ready=lambda k: k != "b") is None
    assert ran == ["a", "c"] and set(read_done(tmp_path / "records.rank0.jsonl")) == {"a", "c"}
    assert not (tmp_path / "records.csv").exists()
    out = run_units(tmp_path, {"job": 1}, units, work, ready=lambda k: True)
    assert ran == ["a", "c", "b"] and out["unit"].tolist() == units


def test_wide_cli_refuses_a_configuration_of_its_own(capsys, tmp_path):
    assert main(["study", "--out", str(tmp_path), "--wide", "--contexts", "2"]) == 2
    assert "drop --contexts" in capsys.readouterr().err
    assert main(["study", "--out", str(tmp_path), "--wide", "--report"]) == 2
    assert "drop --report" in capsys.readouterr().err
