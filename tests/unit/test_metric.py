"""The pullback metric against brute force (jacrev of the full logits) in float64."""

from __future__ import annotations

import pytest
import torch

from steerlens import errors
from steerlens.metric import OffTarget, pullback_metric, pullback_sweep
from steerlens.sites import Site, all_sites
from tests.conftest import assert_untouched, weights_snapshot
from tests.oracle import kl, oracle_metric

SITE_SPECS = [
    "resid_pre.0",
    "resid_mid.0",
    "resid_post.0",
    "attn_out.1",
    "mlp_out.1",
    "z.0:1",
    "z.1",
    "result.1:2",
    "mlp_pre.0",
    "mlp_post.1",
    "resid_pre.1",
]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error; an exactly-zero metric (a site with no path to the output)
    counts as 0 only when both are zero."""
    if b.norm() == 0:
        return float(a.norm())
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("spec", SITE_SPECS)
def test_full_vocab_equals_jacrev(model, tokens, spec):
    site = Site.parse(spec)
    got = pullback_metric(model, tokens, site, vocab="full").matrix()
    want = oracle_metric(model, tokens, site)
    assert rel_err(got, want) < 1e-9


@pytest.mark.parametrize("position", [2, -3, "all", 0])
@pytest.mark.parametrize("spec", ["resid_pre.0", "z.1:0", "mlp_post.0", "resid_post.1"])
def test_other_positions_equal_jacrev(model, tokens, spec, position):
    site = Site.parse(spec, position=position)
    got = pullback_metric(model, tokens, site, vocab="full").matrix()
    want = oracle_metric(model, tokens, site)
    assert rel_err(got, want) < 1e-9


def test_last_position_direct_equals_recursion(model, tokens):
    n = tokens.shape[0]
    recursive = pullback_metric(model, tokens, "resid_pre.0", vocab="full").matrix()
    direct = pullback_metric(model, tokens, Site("resid_pre", 0, position=n - 1), vocab="full")
    assert rel_err(direct.matrix(), recursive) < 1e-10


def test_sweep_equals_per_site_calls(model, tokens):
    sites = all_sites(model) + [Site("result", 1)]
    sweep = pullback_sweep(model, tokens, sites, vocab="full")
    for site in sites:
        single = pullback_metric(model, tokens, site, vocab="full").matrix()
        assert rel_err(sweep[site].matrix(), single) < 1e-10, site


def test_default_sweep_covers_every_site_but_result(model, tokens):
    sweep = pullback_sweep(model, tokens)
    names = set(sweep)
    assert {s.name for s in all_sites(model) if s.kind != "result"} == names
    assert sweep["resid_post.-1"] is sweep["blocks.1.hook_resid_post"]


def test_coarse_grained_is_lower_bound_and_converges(model, tokens):
    full = pullback_metric(model, tokens, "resid_pre.1", vocab="full").matrix()
    errs = []
    for eps in [0.2, 0.05, 1e-2, 1e-3, 1e-6]:
        m = pullback_metric(model, tokens, "resid_pre.1", dropped_mass=eps)
        assert m.info is not None and m.info.dropped_mass <= eps
        gap = torch.linalg.eigvalsh(full - m.matrix())
        assert gap.min() > -1e-10 * full.norm()  # G_coarse ⪯ G
        errs.append(rel_err(m.matrix(), full))
    assert errs == sorted(errs, reverse=True)
    assert errs[-1] < 1e-5


def test_second_order_kl(model, tokens):
    site = Site("resid_mid", 1)
    g = pullback_metric(model, tokens, site, vocab="full").matrix()
    gen = torch.Generator().manual_seed(1)
    direction = torch.randn(site.dim(model), generator=gen, dtype=torch.float64)
    base = _logp(model, tokens, site, torch.zeros_like(direction))
    ratios = []
    for scale in [1e-1, 3e-2, 1e-2, 3e-3]:
        delta = scale * direction / direction.norm()
        actual = kl(base, _logp(model, tokens, site, delta))
        predicted = 0.5 * delta @ g @ delta
        ratios.append(float(actual / predicted))
    # third-order error: |ratio - 1| shrinks linearly with the scale
    assert abs(ratios[-1] - 1) < 5e-3
    assert abs(ratios[-1] - 1) < abs(ratios[0] - 1)


def _logp(model, tokens, site, delta):
    def hook(act, hook):
        act = act.clone()
        act[0, -1] += delta
        return act

    with torch.no_grad(), model.hooks(fwd_hooks=[(site.hook_name, hook)]):
        return torch.log_softmax(model(tokens[None])[0, -1], -1)


@pytest.mark.parametrize("vocab", ["full", "auto"])
def test_off_target_complement_matches_brute_force(model, tokens, vocab):
    exclude = (5, 7, 11)
    site = Site("resid_pre", 1)
    got = pullback_metric(
        model,
        tokens,
        site,
        vocab=vocab,
        dropped_mass=1e-9,
        off_target=OffTarget.complement(exclude),
    )
    want = oracle_metric(model, tokens, site, exclude=exclude)
    assert rel_err(got.matrix(), want) < 1e-8
    assert got.info is not None and got.info.off_target == "complement of 3 tokens"


@pytest.mark.parametrize("vocab", ["full", "auto"])
def test_off_target_pair_merge_matches_brute_force(model, tokens, vocab):
    pairs = {5: 6, 7: 8, 11: 6}
    site = Site("z", 0, 2)
    got = pullback_metric(
        model, tokens, site, vocab=vocab, dropped_mass=1e-9, off_target=OffTarget.pair_merge(pairs)
    )
    want = oracle_metric(model, tokens, site, merge=list(pairs.items()))
    assert rel_err(got.matrix(), want) < 1e-8


@pytest.mark.parametrize(
    "spec,depth,lens",
    [("resid_pre.0", 0, 0), ("resid_pre.0", 1, 1), ("resid_post.0", 0, 1), ("mlp_pre.0", 1, 2)],
)
def test_depth_truncated_matches_logit_lens_oracle(model, tokens, spec, depth, lens):
    site = Site.parse(spec)
    got = pullback_metric(model, tokens, site, vocab="full", depth=depth).matrix()
    want = oracle_metric(model, tokens, site, lens_layer=lens)
    assert rel_err(got, want) < 1e-9


def test_full_depth_equals_default(model, tokens):
    a = pullback_metric(model, tokens, "resid_pre.0", vocab="full", depth=2).matrix()
    b = pullback_metric(model, tokens, "resid_pre.0", vocab="full").matrix()
    assert rel_err(a, b) < 1e-12


def test_batch_is_mean_of_prompts(model):
    batch = torch.tensor([[3, 1, 4, 1], [2, 7, 1, 8]])
    mean = pullback_metric(model, batch, "resid_post.0", vocab="full").matrix()
    each = [pullback_metric(model, t, "resid_post.0", vocab="full").matrix() for t in batch]
    assert rel_err(mean, (each[0] + each[1]) / 2) < 1e-10
    info = pullback_metric(model, batch, "resid_post.0").info
    assert info is not None and info.n_prompts == 2


def test_a_many_prompt_sweep_accumulates_the_gram_and_keeps_the_mean(model):
    """Once a second prompt takes a site's rows past d, the site keeps their Gram (one d × d
    matrix however many prompts): the metrics still equal the mean of each prompt's own, at a
    head site (d_head columns: a Gram from the second prompt), a residual site and an MLP site;
    a site whose rows stay within d keeps a factor, and one prompt's metric is always a
    factor."""
    batch = torch.tensor([[3, 1, 4, 1], [2, 7, 1, 8], [5, 9, 2, 6], [1, 1, 2, 3], [8, 1, 3, 0]])
    sites = ["z.1:0", "resid_post.0", "mlp_post.1"]
    sweep = pullback_sweep(model, batch, sites, vocab="full", decompose=False)
    one = pullback_sweep(model, batch[0], sites, vocab="full", decompose=False)
    for site in sites:
        each = [pullback_metric(model, t, site, vocab="full") for t in batch]
        want = sum(m.matrix() for m in each) / len(each)
        assert rel_err(sweep[site].matrix(), want) < 1e-10
        total = sum(m.factor.shape[0] for m in each)
        assert (sweep[site].gram is not None) == (total > sweep[site].dim), site
        assert one[site].factor is not None
        assert one[site].factor.shape[0] <= one[site].dim
    assert sweep["z.1:0"].gram is not None  # d_head columns: past d at the second prompt
    assert sweep["z.1:0"].gram.dtype == sweep["resid_post.0"].matrix().dtype
    two = pullback_sweep(model, batch[:2], ["z.1:0"], vocab="full", decompose=False)
    assert two["z.1:0"].gram is not None
    first = [pullback_metric(model, t, "z.1:0", vocab="full").matrix() for t in batch[:2]]
    assert rel_err(two["z.1:0"].matrix(), sum(first) / 2) < 1e-10


def test_block_shares_sum_to_one(model, tokens):
    sweep = pullback_sweep(model, tokens)
    totals = sweep.shares.groupby("layer")["share"].sum()
    assert torch.allclose(torch.tensor(totals.values), torch.ones(len(totals), dtype=torch.float64))
    attn = sweep.shares.set_index(["layer", "path"])["share"]
    heads = sweep.head_shares.groupby("layer")["share"].sum()
    for layer in heads.index:
        assert abs(heads[layer] - attn[(layer, "attn")] - attn[(layer, "attn_mlp")]) < 1e-10


def _jacobian_at_last(model, tokens, in_hook, out_hook):
    """d(out_hook at T)/d(in_hook at T) through the whole model, by jacrev."""

    def fn(delta):
        captured = {}

        def add(act, hook):
            mask = torch.zeros_like(act)
            mask[0, -1] = 1.0
            return act + mask * delta

        def grab(act, hook):
            captured["out"] = act[0, -1]

        with model.hooks(fwd_hooks=[(in_hook, add), (out_hook, grab)]):
            model(tokens[None])
        return captured["out"]

    zero = torch.zeros(model.cfg.d_model, dtype=torch.float64)
    return torch.func.jacrev(fn)(zero).detach()


def test_block_shares_match_explicit_paths(model, tokens):
    """The four path shares against B_post, J_A and J_M formed explicitly by jacrev."""
    from steerlens.metric.pullback import MetricOptions, lens_rows
    from steerlens.metric.recursion import pull_block
    from steerlens.metric.state import prompt_state

    layer = 0
    state = prompt_state(model, tokens)
    b = lens_rows(model, state.resid[2], MetricOptions(vocab="full"))[0]
    b_post = pull_block(model, state, 1, b, set()).rows["resid_pre"]
    pulled = pull_block(model, state, layer, b_post, set(), decompose=True)
    j_a = _jacobian_at_last(model, tokens, "blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid")
    j_m = _jacobian_at_last(model, tokens, "blocks.0.hook_resid_mid", "blocks.0.hook_resid_post")
    eye = torch.eye(model.cfg.d_model, dtype=torch.float64)
    j_a, j_m = j_a - eye, j_m - eye
    terms = {
        "skip": b_post,
        "mlp": b_post @ j_m,
        "attn": b_post @ j_a,
        "attn_mlp": b_post @ j_m @ j_a,
    }
    b_pre = sum(terms.values())
    assert rel_err(pulled.rows["resid_pre"], b_pre) < 1e-10
    total = b_pre.pow(2).sum()
    for path, term in terms.items():
        assert abs(pulled.shares[path] - float((term * b_pre).sum() / total)) < 1e-10, path


def test_metric_leaves_model_untouched(model, tokens):
    snap = weights_snapshot(model)
    pullback_sweep(model, tokens, [*all_sites(model), Site("result", 0, position="all")])
    assert_untouched(model, snap)


def test_bad_inputs_raise_steerlens_errors(model, tokens):
    with pytest.raises(errors.SiteError, match="past the prompt"):
        pullback_metric(model, tokens, Site("resid_pre", 0, position=20))
    with pytest.raises(errors.InputError, match="no prompts"):
        pullback_metric(model, [], "resid_pre.0")
    with pytest.raises(errors.InputError, match="vocab"):
        pullback_metric(model, tokens, "resid_pre.0", vocab="some")
    with pytest.raises(errors.InputError, match="depth"):
        pullback_metric(model, tokens, "resid_pre.0", depth=5)
    with pytest.raises(errors.SiteError, match="out of range"):
        pullback_metric(model, tokens, "resid_pre.7")
    with pytest.raises(errors.InputError, match="n_ctx"):
        pullback_metric(model, torch.zeros(40, dtype=torch.long), "resid_pre.0")
    m = pullback_metric(model, tokens[:1], "resid_pre.0", dropped_mass=0.5)
    with pytest.raises(errors.MetricError, match="singular"):
        m.solve(torch.ones(m.dim, dtype=torch.float64), damping=0.0)


def test_fast_block_equals_hooked_block(model, tokens):
    """The written-out block and TransformerLens's own block give the same rows at every kind."""
    from steerlens.metric.blockmap import fast_supported
    from steerlens.metric.pullback import MetricOptions, lens_rows
    from steerlens.metric.recursion import _DELTA_KINDS, pull_block
    from steerlens.metric.state import prompt_state

    state = prompt_state(model, tokens)
    assert fast_supported(model, 0, state.n_pos)
    b = lens_rows(model, state.resid[2], MetricOptions(vocab="full"))[0]
    for layer in (1, 0):
        fast = pull_block(model, state, layer, b, set(_DELTA_KINDS), decompose=True, fast=True)
        slow = pull_block(model, state, layer, b, set(_DELTA_KINDS), decompose=True, fast=False)
        for kind, rows in slow.rows.items():
            assert rel_err(fast.rows[kind], rows) < 1e-12, kind
        for path, share in slow.shares.items():
            assert abs(fast.shares[path] - share) < 1e-12
        assert torch.allclose(torch.tensor(fast.head_shares), torch.tensor(slow.head_shares))
        b = fast.rows["resid_pre"]


@pytest.mark.parametrize(
    "off,low",
    [
        (None, ()),
        (OffTarget.complement([3, 9, 40]), ()),
        (OffTarget.pair_merge({5: 6, 7: 8, 11: 6}), ()),
        # merged outcomes outside the top K: their bases go into the rest row with them
        (OffTarget.pair_merge({5: 6, 7: 8, 11: 6}), (5, 6, 7, 8, 11)),
    ],
    ids=["plain", "complement", "merge", "merge-in-rest"],
)
def test_unembed_factor_precisions_and_layouts_agree(off, low):
    """The top-K factor is the same whether W_U is row-major or a transposed (tied) view, and
    its float32 Gram stays within float32 rounding of the float64 one, rest row included."""
    from steerlens.metric.outcomes import unembed_factor

    gen = torch.Generator().manual_seed(0)
    # a shared offset in W_U (as real unembeddings have) and a small rest mass: where forming
    # the rest row as m_U − Σ m_top in float32 would cancel (a 1.2e-6 Gram error here, 3e-4 on
    # the default model; the direct sum gives 1.9e-7)
    w = torch.randn(24, 3000, dtype=torch.float64, generator=gen, device="cpu") + 4
    logits = 2 * torch.randn(3000, dtype=torch.float64, generator=gen, device="cpu")
    logits[list(low)] = -40.0
    tied = w.T.contiguous().T  # same values, column-major like a tied unembedding
    grams = {}
    for name, weights, precision in [
        ("row64", w, "float64"),
        ("tied64", tied, "float64"),
        ("tied32", tied.float(), "float32"),
        ("row32", w.float(), "float32"),
    ]:
        rows, info = unembed_factor(
            logits, weights, dropped_mass=1e-5, off_target=off, precision=precision
        )
        assert info.top_k is not None and info.top_k + 1 > 24  # the Gram path
        assert info.dropped_mass > 0  # with a rest row
        if low:
            kept = torch.argsort(logits, descending=True)[: info.top_k].tolist()
            assert not set(low) & set(kept)
        grams[name] = rows.T @ rows
    full, _ = unembed_factor(logits, w, vocab="full", off_target=off)
    assert rel_err(grams["row64"], grams["tied64"]) < 1e-12
    assert rel_err(grams["tied32"], grams["row64"]) < 5e-7
    assert rel_err(grams["row32"], grams["row64"]) < 5e-7
    # coarse-graining the last 1e-5 of the mass is a lower bound close to the exact metric
    assert rel_err(grams["row64"], full.T @ full) < 1e-3
    # K + 1 ≤ d: the rows themselves, no Gram
    sharp = 4 * logits
    few = {}
    for precision, weights in [("float64", w), ("float32", tied.float())]:
        rows, info = unembed_factor(
            sharp, weights, dropped_mass=0.05, off_target=off, precision=precision
        )
        assert info.top_k is not None and info.top_k + 1 <= 24
        assert rows.shape[0] == info.top_k + 1
        few[precision] = rows.T @ rows
    assert rel_err(few["float32"], few["float64"]) < 2e-6  # float32 rows, no cancellation
    with pytest.raises(errors.InputError, match="precision"):
        unembed_factor(logits, w, precision="float16")
