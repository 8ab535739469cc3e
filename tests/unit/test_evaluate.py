"""The matched-concept measures, path lengths and the figures, on small inputs (the cost
functions themselves: ``test_cost.py``)."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from steerlens import errors, plot
from steerlens.concepts import TokenSet
from steerlens.diagnostics import (
    fisher_length,
    fisher_rao,
    path_length,
    predictor_agreement,
    with_kl_ratio,
)
from steerlens.evaluation import (
    bootstrap_ci,
    continuation_perplexity,
    generation_measures,
    generation_measures_many,
    greedy_continuation,
    match_strength,
    next_logprobs,
    outcome_measures,
    summarize,
)
from steerlens.methods import EuclideanConfig, Intervention, steer_iteratively
from steerlens.methods.lowrank import LowRankUpdate
from steerlens.metric.local import LocalPath
from steerlens.metric.outcomes import OffTarget, outcome_distribution
from tests.conftest import hook_count


def test_outcome_measures():
    clean = torch.log_softmax(torch.tensor([2.0, 1.0, 0.5, 0.0], dtype=torch.float64), -1)
    same = outcome_measures(clean, clean, 1, {0: 1})
    assert same.off_target_kl == 0 and same.rr_diff == 0
    assert same.off_target_kl_merged == pytest.approx(0, abs=1e-15)
    # moving mass only from base 0 to target 1 leaves the merged distribution unchanged
    moved = clean.exp().clone()
    moved[1] += 0.2
    moved[0] -= 0.2
    out = outcome_measures(clean, moved.log(), 1, {0: 1})
    assert out.off_target_kl_merged == pytest.approx(0, abs=1e-12)
    assert out.off_target_kl > 0
    pair = outcome_measures(clean, moved.log(), 1, base=0)
    assert pair.probability == pytest.approx(float(moved[1] / (moved[0] + moved[1])))
    assert pair.off_target_kl == pytest.approx(0, abs=1e-12)


def test_match_strength_and_errors():
    prob = lambda s: 1 - math.exp(-s)  # noqa: E731
    scale, ok = match_strength(prob, 0.5)
    assert ok and 0.5 <= prob(scale) <= 0.5 + 1e-4  # the default tolerance, from above
    scale, ok = match_strength(prob, 0.5, tol=1e-9)
    assert ok and scale == pytest.approx(math.log(2), abs=1e-8)
    scale, ok = match_strength(lambda s: 0.1, 0.5)
    assert not ok
    with pytest.raises(errors.InputError):
        match_strength(lambda s: s, 1.5)


def test_bootstrap_and_summary():
    m, lo, hi = bootstrap_ci([1.0, 2.0, 3.0, float("nan")])
    assert m == 2.0 and lo <= 2.0 <= hi
    base = dict(concept="past", layer=3, target_probability=0.5, rho=1.0)
    rows = []
    # contexts a, b: both reached; c: Euclidean did not reach the target (its KL and path
    # length are still recorded); d: FishBack started at the target (a path of length 0)
    for ctx, fishback_length, reached in (("a", 0.5, True), ("b", 0.5, True), ("c", 0.5, False),
                                          ("d", 0.0, True)):  # fmt: skip
        rows.append(
            dict(base, context=ctx, method="fishback", reached=True, off_target_kl=0.1,
                 path_length=fishback_length)
        )  # fmt: skip
        rows.append(
            dict(base, context=ctx, method="euclidean", reached=reached, off_target_kl=0.3,
                 path_length=1.5)
        )  # fmt: skip
    records = pd.DataFrame(rows)
    ratio = with_kl_ratio(records).set_index(["method", "context"]).loc["euclidean"]
    assert ratio.kl_ratio.tolist() == pytest.approx([3, 3, math.nan, 3], nan_ok=True)
    assert ratio.rho_own.tolist() == pytest.approx([9, 9, math.nan, math.nan], nan_ok=True)
    summary = summarize(records).set_index("method")
    assert summary.loc["euclidean", "kl_ratio_to_fishback"] == pytest.approx(3.0)
    assert summary.loc["euclidean", "rho_own"] == pytest.approx(9.0)
    assert summary.loc["euclidean", "reached"] == 3 and summary.loc["euclidean", "contexts"] == 4
    with pytest.raises(errors.InputError):
        summarize(records.iloc[:0])


def test_figures_render(tmp_path):
    spectra = {0: torch.tensor([3.0, 1.0, 0.1]), 5: torch.tensor([2.0, 2.0, 1.0])}
    geometry = pd.DataFrame(
        dict(
            layer=[0, 1],
            participation_fraction=[0.1, 0.2],
            rank_90_fraction=[0.2, 0.3],
            deviation_from_euclidean=[0.9, 0.95],
        )
    )
    shares = pd.DataFrame(dict(layer=[0, 0, 1, 1], path=["skip", "mlp"] * 2, share=[0.7, 0.3] * 2))
    records = pd.DataFrame(
        dict(
            concept="past",
            layer=[1, 1, 1, 1],
            context="a",
            target_probability=[0.5, 0.9] * 2,
            method=["fishback", "fishback", "euclidean", "euclidean"],
            reached=True,
            off_target_kl=[0.1, 0.2, 0.5, 0.8],
            rho=[1.0, 1.0, 4.0, 4.0],
        )
    )
    records = with_kl_ratio(records)
    figs = [
        plot.spectra(spectra),
        plot.geometry_vs_depth(geometry),
        plot.block_shares(shares),
        plot.kl_vs_probability(records),
        plot.predicted_vs_measured(records),
        plot.rho_by_layer(records),
    ]
    # ρ per method: the median over contexts, one point per (context, method, layer)
    line = figs[-1].axes[0].get_lines()[1]
    assert list(line.get_ydata()) == [4.0] and figs[-1].legends[0].get_texts()[1].get_text() == (
        "euclidean"
    )
    for i, fig in enumerate(figs):
        path = tmp_path / f"{i}.png"
        fig.savefig(path)
        assert path.stat().st_size > 5000
        assert fig.axes[0].get_xlabel()


def test_greedy_continuation_and_its_perplexity_by_hand(gpt2_model, tokens):
    model = gpt2_model
    iv = sl_intervention(model)
    seq = tokens.clone()
    with iv.apply(model):
        for _ in range(4):
            seq = torch.cat([seq, model(seq[None])[0, -1].argmax().view(1)])
    assert torch.equal(greedy_continuation(model, tokens, iv, 4), seq)
    logp = torch.log_softmax(model(seq[None])[0], -1).detach()
    nll = [-float(logp[i - 1, seq[i]]) for i in range(len(tokens), len(seq))]
    assert continuation_perplexity(model, tokens, iv, 4) == pytest.approx(
        math.exp(sum(nll) / len(nll)), rel=1e-9
    )
    assert hook_count(model) == 0


def _generated_by_full_passes(model, tokens, vec, edited, n_tokens, samples, seed):
    """The reference for the cached generation: every step a full forward of the whole
    sequence, ``vec`` added at ``blocks.0.hook_resid_post`` at the positions ``edited(n_pos)``
    picks (row 0 greedy, the others sampled)."""
    gen = torch.Generator().manual_seed(seed)
    seq = tokens.view(1, -1).expand(1 + samples, -1)

    def add(act, hook):
        act = act.clone()
        act[:, edited(act.shape[1])] += vec.to(act.dtype)
        return act

    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", add)]):
        for _ in range(n_tokens):
            logits = model(seq)[:, -1]
            greedy = logits[:1].argmax(-1, keepdim=True)
            drawn = torch.multinomial(torch.softmax(logits[1:].double(), -1), 1, generator=gen)
            seq = torch.cat([seq, torch.cat([greedy, drawn.to(greedy.dtype)], 0)], 1)
    return seq


@pytest.mark.parametrize("position", ["last", "all", "1"])
def test_cached_generation_edits_each_token_once_as_it_is_run(model, tokens, position):
    """Generation runs each token once, with a key-value cache: an ``@last`` edit lands on the
    prompt's last token and on every generated token as it is run (and stays in their cached
    keys and values), ``@all`` on every position, ``@1`` on the prompt's second token only."""
    from steerlens.evaluation.generation import _continue

    start = len(tokens) - 1
    edited = {
        "last": lambda n: slice(start, n),
        "all": lambda n: slice(0, n),
        "1": lambda n: 1,
    }[position]
    vec = 3 * torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(2)).double()
    iv = Intervention("push", {f"blocks.0.hook_resid_post@{position}": vec})
    want = _generated_by_full_passes(model, tokens, vec, edited, 6, 3, seed=4)
    gen = torch.Generator().manual_seed(4)
    got = _continue(model, tokens.view(1, -1), 6, iv, 4, gen)
    assert torch.equal(got, want)
    assert hook_count(model) == 0


def test_perplexity_of_rows_sharing_a_prompt_equals_full_forwards(model, tokens):
    from steerlens.evaluation.generation import _perplexity

    gen = torch.Generator().manual_seed(6)
    tail = torch.randint(0, model.cfg.d_vocab, (3, 5), generator=gen)
    seqs = torch.cat([tokens.view(1, -1).expand(3, -1), tail], 1)
    logp = torch.log_softmax(model(seqs).double(), -1)
    n = len(tokens)
    nll = -logp[:, n - 1 : -1].gather(2, seqs[:, n:, None]).mean((1, 2))
    assert torch.allclose(_perplexity(model, seqs, n), nll.exp(), rtol=1e-10, atol=0)
    assert torch.allclose(
        _perplexity(model, seqs[:, : n + 1], n),
        logp[:, n - 1].gather(1, seqs[:, n, None]).neg().exp().view(-1),
        rtol=1e-10,
        atol=0,
    )
    with pytest.raises(errors.InputError, match="share their prompt"):
        _perplexity(model, torch.cat([seqs[:1], seqs[1:].flip(1)]), n)


def test_continuation_checks_its_length(gpt2_model, tokens):
    with pytest.raises(errors.InputError, match="n_tokens"):
        greedy_continuation(gpt2_model, tokens, None, 0)
    with pytest.raises(errors.InputError, match="context"):
        greedy_continuation(gpt2_model, tokens, None, gpt2_model.cfg.n_ctx)


def sl_intervention(model):
    from steerlens.methods import Intervention

    gen = torch.Generator().manual_seed(1)
    vec = torch.randn(model.cfg.d_model, generator=gen, dtype=torch.float64)
    return Intervention("test", {"blocks.0.hook_resid_post": vec})


def test_path_length_is_the_fisher_length_by_jacrev(gpt2_model, tokens):
    """Reference: ∫₀¹ √(vᵀG(x₀ + sv)v) ds by Simpson's rule, with G's quadratic form from the
    jacrev of the site-to-logits map and the off-target softmax Fisher at each point."""
    model, off = gpt2_model, OffTarget.complement([7, 3])
    gen = torch.Generator().manual_seed(1)
    with LocalPath(model, tokens, "resid_post.0") as path:
        v = torch.randn(path.x0.shape[0], generator=gen, dtype=torch.float64)
        v *= 3 * path.x0.norm() / v.norm()

        def speed(s: float) -> float:
            x = path.x0 + s * v
            u = (torch.func.jacrev(path.logits)(x) @ v).detach()  # d logits / ds
            q = outcome_distribution(path.logits(x).detach(), off)
            mean = (q * u).sum()
            return math.sqrt(float((q * (u - mean) ** 2).sum()))

        n = 40
        weights = [1] + [4 if k % 2 else 2 for k in range(1, n)] + [1]
        want = sum(w * speed(k / n) for k, w in enumerate(weights)) / (3 * n)
        site = path.site.name
        ends = [outcome_distribution(path.logits(path.x0 + s * v).detach(), off) for s in (0, 1)]
    iv = Intervention("ray", {site: v})
    got = path_length(model, tokens, iv, off, points=400)
    assert got == pytest.approx(want, rel=1e-4)
    assert got > 1.05 * fisher_rao(*ends)  # the path is not a geodesic: length is not distance
    assert path_length(model, tokens, iv.scaled(0.5), off, points=200) < got
    # the same edit named by its absolute position walks full forwards instead: same length
    at_last = Intervention("ray", {f"blocks.0.hook_resid_post@{len(tokens) - 1}": v}, scale=0.5)
    full = path_length(model, tokens, at_last, off, points=16)
    assert full == pytest.approx(path_length(model, tokens, iv.scaled(0.5), off, points=16))
    with pytest.raises(errors.InputError, match="points and sub"):
        path_length(model, tokens, iv, off, points=0)


def test_iterative_path_is_recorded_and_walked(gpt2_model, tokens):
    model, off = gpt2_model, OffTarget.complement([7])
    concept = TokenSet.from_ids([7], d_vocab=model.cfg.d_vocab)
    cfg = EuclideanConfig("resid_post.0", 0.99, step=0.4, max_steps=4)
    with LocalPath(model, tokens, "resid_post.0") as path:
        mark = float(concept.value(path.x0, path.logits(path.x0).detach())) + 0.6
    run = steer_iteratively(model, cfg, concept, tokens, checkpoints=[mark])
    iv, points = run.intervention, run.path
    assert points.shape[0] == run.steps + 1 == 5
    assert points[0].abs().max() == 0 and torch.allclose(points[-1], iv.vector(), atol=1e-12)
    with LocalPath(model, tokens, "resid_post.0") as path:
        xs = [path.x0 + points[0]]
        for a, b in zip(points[:-1], points[1:], strict=True):
            xs += [path.x0 + a + (b - a) * k / 3 for k in (1, 2, 3)]
        want = fisher_length(outcome_distribution(path.logits(x).detach(), off) for x in xs)
        end = path.logits(xs[-1]).detach()
        # the path to the checkpoint: the points below it, then the checkpoint's own δ, which
        # lies on the segment from the last of them to the next point
        checkpoint = run.checkpoint(mark)
        assert checkpoint is not None
        marked, prefix = checkpoint.delta, run.path_to(mark)
        below = [float(concept.value(x, path.logits(x).detach())) for x in path.x0 + prefix[:-1]]
    assert 1 < len(prefix) < len(points) and max(below) < mark
    assert torch.equal(prefix[-1], marked)
    a, b = prefix[-2], points[len(prefix) - 1]
    t = float((prefix[-1] - a) @ (b - a) / (b - a).norm() ** 2)
    assert 0 < t <= 1 and torch.allclose(a + t * (b - a), prefix[-1], atol=1e-9)
    assert path_length(model, tokens, iv, off, path=points, sub=3) == pytest.approx(want, rel=1e-9)
    # the walked path ends where the intervention's full forward pass lands
    full = next_logprobs(model, tokens, iv)
    assert torch.allclose(torch.log_softmax(end, -1), full, atol=1e-10)
    two = Intervention("two", {"resid_post.0": iv.vector(), "resid_post.1": iv.vector()})
    with pytest.raises(errors.InputError, match="one vector site"):
        path_length(model, tokens, two, off, path=points)
    d_mlp = model.cfg.d_mlp
    update = LowRankUpdate(torch.ones(d_mlp, 1, dtype=torch.float64), iv.vector()[None] * 0.1)
    with_update = Intervention("u", dict(iv.vectors), weight_updates={"W_out.1": update})
    with pytest.raises(errors.InputError, match="and 1 weight updates"):
        path_length(model, tokens, with_update, off, path=points)
    with pytest.raises(errors.InputError, match="must start at 0 and end at the vector"):
        path_length(model, tokens, iv.scaled(2.0), off, path=points)  # the path is for scale 1
    with pytest.raises(errors.InputError, match="a recorded path is"):
        path_length(model, tokens, iv, off, path=points[:, :3])


def test_outcome_distribution_merges_and_drops():
    logits = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64))
    merged = outcome_distribution(logits, OffTarget(exclude=(3,), merge=((0, 2),)))
    assert merged.tolist() == pytest.approx([0.0, 2 / 6, 4 / 6, 0.0])


def test_predictor_agreement_by_hand():
    """Euclidean measured 10× FishBack on six contexts over two layers; ``rho`` says 10, 30,
    20 at layer 1 and 5, 4, 10 at layer 2 (predicted / measured 1, 3, 2, 0.5, 0.4, 1);
    ``rho_own`` says 10 everywhere."""
    rows = []
    cases = [(1, 10.0), (1, 30.0), (1, 20.0), (2, 5.0), (2, 4.0), (2, 10.0)]
    for i, (layer, rho) in enumerate(cases):
        for method, kl, length in (("fishback", 0.1, 1.0), ("euclidean", 1.0, math.sqrt(10))):
            rows.append(
                dict(concept="c", layer=layer, context=str(i), target_probability=0.5,
                     method=method, reached=True, off_target_kl=kl, path_length=length,
                     rho=1.0 if method == "fishback" else rho)
            )  # fmt: skip
    table = predictor_agreement(pd.DataFrame(rows)).set_index("predictor")
    assert table.loc["rho", "runs"] == 6 and table.loc["rho", "within_2x"] == pytest.approx(4 / 6)
    assert table.loc["rho", "median_predicted_over_measured"] == pytest.approx(1.0)
    assert table.loc["rho_own", "within_2x"] == 1.0
    assert table.loc["rho_own", "median_predicted_over_measured"] == pytest.approx(1.0)
    assert table["spearman"].isna().all()  # the measured ratio is constant: no correlation
    rows += [dict(row, context=c, layer=3) for c in ("6", "7") for row in rows[-2:]]
    by_layer = predictor_agreement(pd.DataFrame(rows), by="layer")
    rho = by_layer[by_layer["predictor"] == "rho"].set_index("layer")
    assert list(rho.index) == [1, 2]  # layer 3 has 2 runs: no row
    assert rho["median_predicted_over_measured"].tolist() == pytest.approx([2.0, 0.5])
    assert rho["within_2x"].tolist() == pytest.approx([2 / 3, 2 / 3])
    with pytest.raises(errors.InputError, match="no column 'site'"):
        predictor_agreement(pd.DataFrame(rows), by="site")


def _mixed_interventions(model):
    """Every kind of edit a generation step meets: none, ``@last``, ``@all``, a prompt
    position, one head's ``z``, every head's ``z``, one head's result, and two vectors at one
    hook."""
    gen = torch.Generator().manual_seed(9)

    def vec(n: int) -> torch.Tensor:
        return 3 * torch.randn(n, generator=gen, dtype=torch.float64)

    d, d_head = model.cfg.d_model, model.cfg.d_head
    return [
        None,
        Intervention("last", {"blocks.0.hook_resid_post@last": vec(d)}),
        Intervention("all", {"blocks.1.hook_resid_pre@all": vec(d)}, scale=0.5),
        Intervention("first", {"blocks.0.hook_resid_post@1": vec(d)}),
        Intervention("head", {"z.0:1@last": vec(d_head)}),
        Intervention("heads", {"z.1@all": vec(model.cfg.n_heads * d_head)}),
        Intervention("result", {"result.0:1@last": vec(d)}),
        Intervention(
            "two", {"blocks.0.hook_resid_post@last": vec(d), "blocks.0.hook_resid_post@all": vec(d)}
        ),
    ]


def test_batched_generation_is_each_intervention_generated_alone(model, tokens):
    """The rows of many interventions generated in one batch are each intervention's own
    continuations, seed and all; the measures are the ones each gets alone."""
    from steerlens.evaluation.generation import _continue, _continue_many, _perplexity

    ivs = _mixed_interventions(model)
    prompt = tokens.view(1, -1)
    alone = [_continue(model, prompt, 5, iv, 4, torch.Generator().manual_seed(3)) for iv in ivs]
    together = _continue_many(model, prompt, 5, ivs, 3, 3)
    assert torch.equal(together, torch.cat(alone))
    assert hook_count(model) == 0
    target = int(alone[1][0, len(tokens)])
    measures = generation_measures_many(model, tokens, ivs, target, n_tokens=5, samples=3, seed=3)
    small = generation_measures_many(
        model, tokens, ivs, target, n_tokens=5, samples=3, seed=3, max_rows=4
    )
    for iv, rows, got, got_small in zip(ivs, alone, measures, small, strict=True):
        ppl = _perplexity(model, rows, len(tokens))
        assert got.target_first_greedy == float(rows[0, len(tokens)] == target)
        assert got.target_first_sampled == float((rows[1:, len(tokens)] == target).double().mean())
        assert got.perplexity_greedy == pytest.approx(float(ppl[0]), rel=1e-12)
        assert got.perplexity_sampled == pytest.approx(float(ppl[1:].mean()), rel=1e-12)
        assert got_small.row() == pytest.approx(got.row(), rel=1e-12)
        one = generation_measures(model, tokens, iv, target, n_tokens=5, samples=3, seed=3)
        assert one.row() == pytest.approx(got.row(), rel=1e-12)
    assert measures[1].target_first_greedy == 1.0


def test_batched_generation_falls_back_for_edits_that_are_not_vectors(model, tokens):
    from steerlens.evaluation.generation import _continue, _continue_many

    scaled = Intervention("scaled", {}, 1.0, multipliers={"mlp_out.1@last": 0.7})
    ivs = [scaled, _mixed_interventions(model)[1]]
    prompt = tokens.view(1, -1)
    alone = [_continue(model, prompt, 4, iv, 3, torch.Generator().manual_seed(1)) for iv in ivs]
    assert torch.equal(_continue_many(model, prompt, 4, ivs, 2, 1), torch.cat(alone))
    assert hook_count(model) == 0
    wrong = Intervention("wrong", {"blocks.0.hook_resid_post@last": torch.zeros(3)})
    with pytest.raises(errors.InputError, match="wrong vector"):
        _continue_many(model, prompt, 4, [ivs[1], wrong], 2, 1)
    with pytest.raises(errors.InputError, match="max_rows"):
        generation_measures_many(model, tokens, ivs, 0, samples=3, max_rows=3)
    assert generation_measures_many(model, tokens, [], 0) == []


def test_many_rows_of_perplexity_run_in_chunks(model, tokens, monkeypatch):
    from steerlens.evaluation import generation

    gen = torch.Generator().manual_seed(6)
    tail = torch.randint(0, model.cfg.d_vocab, (7, 4), generator=gen)
    seqs = torch.cat([tokens.view(1, -1).expand(7, -1), tail], 1)
    whole = generation._perplexity(model, seqs, len(tokens))
    monkeypatch.setattr(generation, "MAX_LOGITS", 2 * 4 * model.cfg.d_vocab)  # 2 rows a chunk
    chunked = generation._perplexity(model, seqs, len(tokens))
    assert torch.allclose(whole, chunked, rtol=1e-12, atol=0)
