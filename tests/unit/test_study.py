"""The study's parts on tiny models: the context rule, the strength search, the generation
measures, the baselines' set-up, and the runner's append / kill / resume / two-rank behaviour."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from steerlens import errors
from steerlens.concepts import PairMapping
from steerlens.datasets import VerbContext
from steerlens.evaluation import (
    continuation_perplexity,
    generation_measures,
    next_logprobs,
    strength_search,
)
from steerlens.experiments.baselines import actadd_candidates, fit_fixed, inverted
from steerlens.experiments.runner import read_done, run_units
from steerlens.experiments.study import (
    CleanStats,
    StudyConfig,
    clean_stats,
    rule_rejects,
    select_contexts,
    stratum,
)
from steerlens.experiments.study_report import study_report
from steerlens.methods import Intervention

WORKER = Path(__file__).with_name("study_worker.py")


def _ctx(i: int, verb: str, model=None, text: str | None = None) -> VerbContext:
    """A synthetic context; with ``model``, its base is the model's likeliest next token and its
    target the runner-up (share below 0.5, a pair mass of the top two)."""
    ids = tuple(5 + (i * 7 + k) % 40 for k in range(6))
    base, target = 3, 4
    if model is not None:
        top = next_logprobs(model, torch.tensor(ids)).topk(2).indices.tolist()
        base, target = top
    return VerbContext(text or f"context {i}", ids, base, target, verb, verb + "ed", i)


def test_rule_rejects_each_reason():
    assert rule_rejects(CleanStats(0.1, 0.01), below=0.5) is None
    assert rule_rejects(CleanStats(0.01, 0.1), below=0.5) == "already at the lowest target"
    assert "pair mass" in str(rule_rejects(CleanStats(0.004, 0.0001), below=0.5))
    assert "target probability" in str(rule_rejects(CleanStats(0.5, 1e-5), below=0.5))
    assert stratum(5e-4) == "p_t < 1e-3" and stratum(0.5) == "p_t ≥ 1e-2"


def test_select_contexts_applies_the_rule_in_order(model):
    """Every candidate passes on its probabilities (base and target the model's top two), so the
    per-verb cap and repeated texts do the rejecting."""
    cands = [_ctx(i, f"v{i % 4}", model) for i in range(12)]
    cands.append(_ctx(99, "v9", model, text="context 0"))
    kept, rejected = select_contexts(model, cands, 8, below=0.99, max_per_verb=2, min_verbs=4)
    assert [c.text for c, _ in kept] == [f"context {i}" for i in range(8)]
    assert rejected == {}
    stats = kept[0][1]
    direct = clean_stats(model, cands[0])
    assert stats == direct and 0 < stats.share < 1
    kept, rejected = select_contexts(model, cands, 8, below=0.99, max_per_verb=2, min_verbs=1)
    assert len(kept) == 8 and max(pd.Series([c.verb for c, _ in kept]).value_counts()) <= 2
    with pytest.raises(errors.ConceptError, match="kept 8 of 13 candidates over 4 verbs"):
        select_contexts(model, cands, 9, below=0.99, max_per_verb=2, min_verbs=4)
    with pytest.raises(errors.ConceptError, match="already at the lowest target"):
        select_contexts(model, cands, 2, below=1e-9)


def test_strength_search_grid_and_reasons():
    calls: list[float] = []

    def bump(s: float) -> float:  # rises to 0.8 at scale 3, falls back: not monotone
        calls.append(s)
        return 0.8 * math.exp(-((math.log(s + 1e-9) - math.log(3)) ** 2))

    found = strength_search(bump, [0.5, 0.9])
    distinct = len(set(calls))
    assert found[0.5].reached and found[0.5].reason == "crossed on the grid"
    assert bump(found[0.5].scale) >= 0.5 and bump(found[0.5].scale) - 0.5 <= 1e-4
    assert found[0.5].scale < 3  # the first crossing, on the rising side
    assert not found[0.9].reached and found[0.9].reason == "never reached"
    assert found[0.9].peak_share == pytest.approx(0.8, abs=1e-3)
    assert found[0.9].scale == pytest.approx(3, rel=1e-2)
    assert found[0.5].evaluations == found[0.9].evaluations == distinct
    # a window between grid points 2.38 and 2.83 is found by refining the peak next to it
    # (a doubling search from 1 sees only 1, 2 and 4, all below)
    window = strength_search(lambda s: 0.7 * math.exp(-(((s - 2.6) / 0.15) ** 2)) + 0.1, [0.5])
    assert window[0.5].reached and window[0.5].reason == "crossed between grid points"
    assert 2.45 < window[0.5].scale < 2.52  # the first crossing, 2.488
    # a window with flat sides gives no hint where it is: reported as never reached
    flat = strength_search(lambda s: 0.7 if 2.45 < s < 2.55 else 0.001, [0.5])
    assert not flat[0.5].reached and flat[0.5].peak_share == 0.001
    with pytest.raises(errors.InputError, match="target probabilities"):
        strength_search(lambda s: s, [1.2])


def test_generation_measures_by_hand(model):
    tokens = torch.tensor([3, 9, 14, 2])
    target = 7
    push = Intervention("push", {"blocks.1.hook_resid_post": 40 * model.W_U[:, target]})
    out = generation_measures(model, tokens, push, target, n_tokens=6, samples=5, seed=1)
    assert out.target_first_greedy == 1.0 and out.target_first_sampled == 1.0
    assert out.perplexity_greedy == pytest.approx(continuation_perplexity(model, tokens, push, 6))
    plain = generation_measures(model, tokens, None, target, n_tokens=6, samples=5, seed=1)
    assert plain.perplexity_greedy == pytest.approx(continuation_perplexity(model, tokens, None, 6))
    assert plain == generation_measures(model, tokens, None, target, n_tokens=6, samples=5, seed=1)
    with pytest.raises(errors.InputError, match="samples"):
        generation_measures(model, tokens, None, target, samples=0)


def test_baseline_setups(model):
    train = [_ctx(0, "▁walk"), _ctx(1, "▁walk"), _ctx(2, "▁go")]
    assert actadd_candidates(train, [("Yesterday", "Tomorrow")]) == [
        ("Yesterday", "Tomorrow"),
        ("walked", "walk"),
        ("goed", "go"),
    ]
    mapping = PairMapping("m", (1, 2, 3), (4, 5, 4), (("a", "x"), ("b", "y"), ("c", "x")))
    back = inverted(mapping)
    assert back.bases == (4, 5) and back.targets == (1, 2) and back.pairs_words[0] == ("x", "a")
    from steerlens.concepts.pairs import ContrastPairs

    pairs = ContrastPairs("p", (("a", "b"),), token_pairs=(((1, 2, 3), (1, 2, 4)),))
    fixed = fit_fixed(model, ("caa", "caa_last"), pairs, 1)
    assert set(fixed) == {"caa", "caa_last"}
    assert fixed["caa"].sites == ("blocks.1.hook_resid_post@all",)
    assert fixed["caa_last"].sites == ("blocks.1.hook_resid_post",)
    assert torch.equal(fixed["caa"].vector(), fixed["caa_last"].vector())


def test_study_config_refuses_bad_values():
    with pytest.raises(errors.InputError, match="concepts"):
        StudyConfig(concepts=("future",))
    with pytest.raises(errors.InputError, match="fishback"):
        StudyConfig(methods=("euclidean",))
    with pytest.raises(errors.InputError, match="contexts"):
        StudyConfig(contexts=0)


def test_study_report_states_losses():
    rows = []
    for ctx, ratio in (("a", 0.5), ("b", 0.25)):
        for method, kl in (("fishback", 1.0), ("euclidean", ratio)):
            rows.append(dict(concept="past", layer=6, context=ctx, verb="v" + ctx,
                             target_probability=0.5, method=method, reached=True,
                             off_target_kl=kl, stratum="p_t < 1e-3", reason="reached"))  # fmt: skip
    report = study_report(pd.DataFrame(rows), {"model": "tiny", "study": {}}, partial=True)
    assert report.startswith("# The study (partial")
    assert (
        "- **euclidean** beats FishBack on the complement KL at layer(s) 6 (0.35×; pooled over "
        "all layers 0.354×, its interval pooled over all layers lies below 1)." in report
    )
    assert "No generation measures were recorded" in report
    merged = pd.DataFrame(rows).assign(off_target_kl_merged=[0.1, 0.2, 0.1, 0.2])
    merged = pd.concat(
        [merged, merged[merged.method == "fishback"].assign(method="fishback_merge")]
    )
    from steerlens.experiments.study_report import optimize_evaluate

    grid = optimize_evaluate(merged).set_index(["variant", "measure"])
    assert grid.loc[("fishback_merge", "pair-merge KL"), "home"] == "yes"
    assert grid.loc[("fishback", "complement KL"), "euclidean / variant"] == pytest.approx(
        math.sqrt(0.5 * 0.25)
    )
    assert grid.loc[("fishback", "pair-merge KL"), "variant lower"] == "2 of 2"


def _run(folder: Path, pause: float, *prefix: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = (
        [*prefix, str(WORKER), str(folder), str(pause)]
        if prefix
        else [sys.executable, str(WORKER), str(folder), str(pause)]
    )
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out.decode()[-3000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> pd.DataFrame:
    folder = tmp_path_factory.mktemp("uninterrupted")
    _finish(_run(folder, 0.0))
    return pd.read_csv(folder / "records.csv")


def test_killed_run_resumes_to_the_same_records(tmp_path, reference):
    folder = tmp_path / "run"
    proc = _run(folder, 0.4)
    rank_file = folder / "records.rank0.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if rank_file.exists() and rank_file.read_text().count("\n") >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    done = read_done(rank_file)
    assert 3 <= len(done) < 10 and not (folder / "records.csv").exists()
    with rank_file.open("a") as f:  # a kill in the middle of an append
        f.write('{"unit": "4/1", "records": [{"method": "fish')
    _finish(_run(folder, 0.0))
    lines = [json.loads(line)["unit"] for line in rank_file.read_text().splitlines()]
    assert sorted(lines) == sorted(f"{i}/{layer}" for i in range(5) for layer in (0, 1))
    pd.testing.assert_frame_equal(pd.read_csv(folder / "records.csv"), reference)


def test_shards_give_the_records_of_one(tmp_path):
    """The runner's sharding and merge in one process (ranks passed explicitly, one after the
    other): the fast check of what the two-rank torchrun test below checks end to end."""
    units = [f"{i}/{layer}" for i in range(5) for layer in (0, 1)]
    work = lambda key: [{"unit": key, "value": sum(map(ord, key))}]  # noqa: E731
    single = run_units(tmp_path / "one", {"job": 1}, units, work)
    assert run_units(tmp_path / "two", {"job": 1}, units, work, rank=1, world=2) is None
    done = read_done(tmp_path / "two" / "records.rank1.jsonl")
    assert sorted(done) == sorted(units[1::2])
    merged = run_units(tmp_path / "two", {"job": 1}, units, work, rank=0, world=2)
    assert single is not None and merged is not None
    pd.testing.assert_frame_equal(merged, single)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "two" / "records.csv"), single)


def test_a_run_resumes_under_another_world_size(tmp_path):
    """Units finished by two ranks are not redone by one process resuming the folder (nor the
    other way round), and the merge holds every unit once, in unit order."""
    units = [f"{i}/{layer}" for i in range(5) for layer in (0, 1)]
    calls: list[str] = []

    def work(key):
        calls.append(key)
        return [{"unit": key, "value": sum(map(ord, key))}]

    single = run_units(tmp_path / "one", {"job": 1}, units, work)
    calls.clear()
    folder = tmp_path / "grow"
    assert run_units(folder, {"job": 1}, units, work, rank=1, world=2) is None  # half, then stop
    with (folder / "records.rank1.jsonl").open("a") as f:
        f.write('{"unit": "0/0", "rec')  # a kill mid-append: ignored, not repaired, by rank 0
    calls.clear()
    resumed = run_units(folder, {"job": 1}, units, work, rank=0, world=1)
    assert sorted(calls) == sorted(units[0::2])  # only what no rank file holds
    assert resumed is not None and single is not None
    pd.testing.assert_frame_equal(resumed, single)
    calls.clear()
    again = run_units(tmp_path / "grow", {"job": 1}, units, work, rank=1, world=3)
    assert calls == [] and again is None
    (folder / "records.rank2.jsonl").write_text(json.dumps({"unit": "1/0", "records": []}) + "\n")
    with pytest.raises(errors.InputError, match="unit '1/0' is in both"):
        run_units(folder, {"job": 1}, units, work, rank=0, world=1)
    (folder / "records.rank2.jsonl").write_text(json.dumps({"unit": "9/9", "records": []}) + "\n")
    with pytest.raises(errors.InputError, match="not a unit of this run"):
        run_units(folder, {"job": 1}, units, work, rank=0, world=1)


def test_runner_runs_under_a_process_group(tmp_path):
    """The torchrun path in process: rank and world from an initialized (one-rank gloo) group,
    and both barriers."""
    import torch.distributed as dist

    from steerlens.experiments.runner import distributed_rank

    assert distributed_rank() == (0, 1)
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        assert distributed_rank() == (0, 1)
        out = run_units(tmp_path, {"job": 1}, ["a", "b"], lambda key: [{"unit": key}])
        assert out is not None and list(out.unit) == ["a", "b"]
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_give_the_records_of_one(tmp_path, reference):
    folder = tmp_path / "ranks"
    proc = _run(folder, 0.0, sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                "2", "--master-port", "29617")  # fmt: skip
    _finish(proc)
    assert (folder / "records.rank1.jsonl").exists()
    pd.testing.assert_frame_equal(pd.read_csv(folder / "records.csv"), reference)


def test_runner_refuses_bad_folders_and_shards(tmp_path):
    work = lambda key: [{"unit": key}]  # noqa: E731
    run_units(tmp_path / "a", {"config": 1}, ["x", "y"], work)
    with pytest.raises(errors.InputError, match="'config': 1 there, 2 here"):
        run_units(tmp_path / "a", {"config": 2}, ["x", "y"], work)
    with pytest.raises(errors.InputError, match="3 shards for 2 units"):
        run_units(tmp_path / "b", {"config": 1}, ["x", "y"], work, rank=0, world=3)
    with pytest.raises(errors.InputError, match="distinct"):
        run_units(tmp_path / "c", {"config": 1}, ["x", "x"], work)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "records.rank0.jsonl").write_text("")
    with pytest.raises(errors.InputError, match="no manifest.json"):
        run_units(tmp_path / "d", {"config": 1}, ["x"], work)
    bad = tmp_path / "a" / "records.rank0.jsonl"
    bad.write_text('not json\n{"unit": "x", "records": []}\n')
    with pytest.raises(errors.InputError, match="line 1 is not a finished unit"):
        read_done(bad)


def test_fishback_descends_a_given_off_target_geometry(model):
    """FishBackConfig(off_target=OffTarget) steps along (G_T + λI)⁻¹g with G_T the metric of
    that transform; the study's merge and plain variants run and reach the target."""
    from steerlens.experiments.matched import MatchedSettings, context_records
    from steerlens.methods import FishBackConfig, steer_iteratively
    from steerlens.metric.local import LocalPath
    from steerlens.metric.outcomes import OffTarget
    from steerlens.metric.pullback import MetricOptions
    from steerlens.sites import Site

    ctx = _ctx(0, "v", model)
    tokens = torch.tensor(ctx.token_ids)
    merge = OffTarget.pair_merge({ctx.base_id: ctx.target_id, 11: 12})
    site = Site("resid_post", 0)
    cfg = FishBackConfig(site.name, 0.9, off_target=merge, vocab="full", max_steps=1)
    iv = steer_iteratively(model, cfg, _concept(ctx), tokens).intervention
    with LocalPath(model, tokens, site) as path, torch.enable_grad():
        x = path.x0.clone().requires_grad_(True)
        g = torch.autograd.grad(_concept(ctx).value(x, path.logits(x)), x)[0]
        options = MetricOptions(vocab="full", off_target=merge, precision="float32")
        u = path.metric(path.x0, options).solve(g, cfg.damping)
    got = iv.vector()
    assert float(got @ u / (got.norm() * u.norm())) > 1 - 1e-9
    plain = steer_iteratively(
        model,
        FishBackConfig(site.name, 0.9, vocab="full", max_steps=1, off_target=False),
        _concept(ctx),
        tokens,
    ).intervention
    assert float(plain.vector() @ got / (plain.vector().norm() * got.norm())) < 1 - 1e-6
    settings = MatchedSettings(
        targets=(0.6,), methods=("fishback", "fishback_merge", "fishback_plain"), step=0.5
    )
    records = context_records(model, ctx, 1, settings, {}, {ctx.base_id: ctx.target_id})
    assert [r["method"] for r in records] == ["fishback", "fishback_merge", "fishback_plain"]
    assert all(r["reached"] and abs(r["probability"] - 0.6) < 1e-3 for r in records)


def test_records_carry_the_trivial_predictors(model):
    """Each record has ‖g‖ at the clean point, `steerlens where`'s site cost there, the
    Euclidean size of its edit and, where the implicit metric is known, the Kantorovich bound,
    which bounds the clean-point ρ."""
    from steerlens.experiments.matched import (
        MatchedSettings,
        clean_point,
        context_records,
        edit_norm,
    )
    from steerlens.experiments.verb_context import context_tokens
    from steerlens.methods import Intervention
    from steerlens.sites import Site

    ctx = _ctx(0, "v", model)
    settings = MatchedSettings(targets=(0.6,), methods=("fishback", "euclidean", "depth0"))
    records = context_records(model, ctx, 1, settings, {}, {ctx.base_id: ctx.target_id})
    point = clean_point(model, Site("resid_post", 1), context_tokens(model, ctx), ctx)
    by = {r["method"]: r for r in records}
    assert all(r["grad_norm"] == pytest.approx(float(point.g.norm()), rel=1e-12) for r in records)
    assert all(r["edit_norm"] > 0 for r in records)
    from steerlens.diagnostics import site_costs

    tokens = context_tokens(model, ctx)
    where = site_costs(model, [(tokens, _concept(ctx))], ["resid_post.1"])
    want = float(where["kl_per_unit"].iloc[0])
    assert all(r["kl_per_unit"] == pytest.approx(want, rel=1e-6) for r in records)
    assert math.isnan(by["fishback"]["kantorovich"])
    for name in ("euclidean", "depth0"):
        assert 1 <= by[name]["rho"] <= by[name]["kantorovich"] * (1 + 1e-9), name
    d = model.cfg.d_model
    v = torch.ones(d, dtype=torch.float64)
    iv = Intervention("two", {"resid_post.0": v, "resid_post.1@all": 2 * v}, scale=2.0)
    assert edit_norm(iv) == pytest.approx(2.0 * math.sqrt(5 * d), rel=1e-12)


def _concept(ctx: VerbContext):
    from steerlens.experiments.matched import pair_concept

    return pair_concept(ctx)


def test_transfer_vector_is_the_expected_natural_gradient(model):
    from steerlens.experiments.baselines import fit_transfer
    from steerlens.experiments.matched import clean_point
    from steerlens.experiments.verb_context import context_tokens
    from steerlens.sites import Site

    train = [_ctx(i, f"v{i}", model) for i in range(3)]
    iv = fit_transfer(model, 1, train, damping=1e-2)
    assert iv.sites == ("blocks.1.hook_resid_post",) and iv.info["contexts"] == 3
    points = [clean_point(model, Site("resid_post", 1), context_tokens(model, c), c) for c in train]
    mean_g = sum(p.g for p in points) / 3
    mean_G = sum(p.off_target.matrix() for p in points) / 3
    lam = 1e-2 * torch.trace(mean_G) / mean_G.shape[0]
    u = torch.linalg.solve(mean_G + lam * torch.eye(mean_G.shape[0], dtype=mean_G.dtype), mean_g)
    v = iv.vector()
    assert float(v @ u / (v.norm() * u.norm())) > 1 - 1e-3  # float32 Gram against float64
    assert float(v.norm()) == pytest.approx(1.0)
    single = fit_transfer(model, 1, train[:1])
    assert float(single.vector() @ v) < 1 - 1e-6  # the average, not one context's
    with pytest.raises(errors.InputError, match="training contexts"):
        fit_transfer(model, 1, [])


@pytest.mark.parametrize("position", ["last", "all"])
def test_shares_of_a_last_position_vector_run_through_the_blocks_after_it(model, position):
    """One ``@last`` residual vector: the shares at many scales in one batched call through the
    blocks after the site equal full forwards of the prompt; ``@all`` keeps full forwards."""
    from steerlens.experiments.matched import share_at, shares_of

    ctx = _ctx(0, "walk", model)
    tokens = torch.tensor(ctx.token_ids)
    v = (model.W_U[:, ctx.target_id] - model.W_U[:, ctx.base_id]).detach()
    iv = Intervention("v", {f"resid_post.0@{position}": v / v.norm()}, scale=0.5)
    full = share_at(model, tokens, ctx, iv)
    scales = [0.0, 0.7, 2.0, 9.0]
    with shares_of(model, tokens, ctx, iv) as (one, many):
        assert (many is None) == (position == "all")
        for s in scales:
            assert one(s) == pytest.approx(full(s), rel=1e-10, abs=1e-14)
        if many is not None:
            assert many(scales) == pytest.approx([full(s) for s in scales], rel=1e-10, abs=1e-14)
            batched = strength_search(one, [0.5, 0.9], many=many)
            plain = strength_search(one, [0.5, 0.9])
            for target in (0.5, 0.9):
                assert batched[target].reached and plain[target].reached
                assert batched[target].scale == pytest.approx(plain[target].scale, rel=1e-9)
