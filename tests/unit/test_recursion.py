"""The block decomposition by one forward-mode pass against the reverse-mode reference.

The shares come from pushing the rows of B_pre forward through the attention half of each block
(:func:`steerlens.metric.recursion._decompose`); :func:`tests.oracle.vjp_block_shares` computes
the same numbers with one VJP per (row, path), head by head. Both block maps (the written-out
fast block and TransformerLens's own through hooks), both flavours, three layers, with and
without an off-target transform.
"""

from __future__ import annotations

import copy

import pytest
import torch

from steerlens import _tl
from steerlens.metric import OffTarget, pullback_sweep
from steerlens.metric.blockmap import attention_pushforward, block_map, fast_supported
from steerlens.metric.pullback import MetricOptions, lens_rows
from steerlens.metric.recursion import _DELTA_KINDS, pull_block
from steerlens.metric.state import prompt_state
from steerlens.testing import FLAVOURS, tiny_config, tiny_model
from tests.conftest import fallback_model
from tests.oracle import vjp_block_shares

OPTIONS = {
    "full": MetricOptions(vocab="full"),
    "auto": MetricOptions(),
    "complement": MetricOptions(off_target=OffTarget.complement([3, 9, 40])),
    "pair_merge": MetricOptions(vocab="full", off_target=OffTarget.pair_merge({5: 6, 7: 8})),
}
TOKENS = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])


@pytest.fixture(scope="module", params=FLAVOURS)
def deep_model(request):
    """A three-block tiny float64 model of each flavour."""
    return tiny_model(request.param, n_layers=3)


@pytest.fixture(scope="module")
def non_plain_model():
    """A llama-flavour model with QK-norm and an attention soft-cap: only the hooked map fits."""
    return fallback_model()


def _walk(model, tokens, options, fast):
    """(layer, BlockPullback) from the last block down, each decomposed."""
    state = prompt_state(model, tokens)
    n = model.cfg.n_layers
    b = lens_rows(model, state.resid[n], options)[0]
    for layer in range(n - 1, -1, -1):
        pulled = pull_block(model, state, layer, b, set(), decompose=True, fast=fast)
        yield state, layer, pulled
        b = pulled.rows["resid_pre"]


def _max_diff(pulled, shares, heads) -> float:
    paths = max(abs(pulled.shares[k] - v) for k, v in shares.items())
    return max(paths, max(abs(a - b) for a, b in zip(pulled.head_shares, heads, strict=True)))


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "hooked"])
@pytest.mark.parametrize("opt", list(OPTIONS))
def test_shares_equal_reverse_mode_reference(deep_model, fast, opt):
    for state, layer, pulled in _walk(deep_model, TOKENS, OPTIONS[opt], fast):
        shares, heads = vjp_block_shares(deep_model, state, layer, pulled.rows, fast)
        assert set(pulled.shares) == set(shares)
        assert len(pulled.head_shares) == deep_model.cfg.n_heads
        assert _max_diff(pulled, shares, heads) < 1e-10, layer


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "hooked"])
def test_shares_sum_to_one(deep_model, fast):
    """Paths sum to 1, and the heads to the two attention paths, at every layer."""
    for _, layer, pulled in _walk(deep_model, TOKENS, OPTIONS["auto"], fast):
        assert abs(sum(pulled.shares.values()) - 1) < 1e-12, layer
        attn = pulled.shares["attn"] + pulled.shares["attn_mlp"]
        assert abs(sum(pulled.head_shares) - attn) < 1e-12, layer


def test_non_plain_block_uses_hooked_map(non_plain_model):
    """A block the fast map cannot write out: the automatic choice is the hooked map, and its
    shares equal the reference and still sum to 1."""
    tokens = TOKENS[:7]
    assert not fast_supported(non_plain_model, 0, len(tokens))
    for state, layer, pulled in _walk(non_plain_model, tokens, OPTIONS["full"], None):
        shares, heads = vjp_block_shares(non_plain_model, state, layer, pulled.rows, None)
        assert _max_diff(pulled, shares, heads) < 1e-10, layer
        assert abs(sum(pulled.shares.values()) - 1) < 1e-12


def test_sweep_shares_are_the_decomposition(deep_model):
    """``pullback_sweep``'s share tables hold each layer's decomposition of the one prompt."""
    sweep = pullback_sweep(deep_model, TOKENS, decompose=True)
    paths = sweep.shares.set_index(["layer", "path"])["share"]
    heads = sweep.head_shares.set_index(["layer", "head"])["share"]
    for state, layer, pulled in _walk(deep_model, TOKENS, MetricOptions(), None):
        shares, head_ref = vjp_block_shares(deep_model, state, layer, pulled.rows)
        for path, value in shares.items():
            assert abs(paths[(layer, path)] - value) < 1e-10, (layer, path)
        for head, value in enumerate(head_ref):
            assert abs(heads[(layer, head)] - value) < 1e-10, (layer, head)


def test_decompose_leaves_rows_unchanged(deep_model):
    """Asking for the decomposition changes no factor rows."""
    state = prompt_state(deep_model, TOKENS)
    b = lens_rows(deep_model, state.resid[3], MetricOptions())[0]
    kinds = set(_DELTA_KINDS)
    plain = pull_block(deep_model, state, 2, b, kinds)
    with_shares = pull_block(deep_model, state, 2, b, kinds, decompose=True)
    for kind, rows in plain.rows.items():
        assert torch.equal(with_shares.rows[kind], rows), kind


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "hooked"])
def test_captured_only_map(deep_model, fast):
    """``captured_only`` yields the captures alone, equal to those of the full map."""
    state = prompt_state(deep_model, TOKENS)
    x = state.resid[1]
    kw = dict(dtype=x.dtype, fast=fast)
    with block_map(deep_model, 1, state, (), ("attn_out", "z"), **kw) as fn:
        full = fn(x)
    with block_map(deep_model, 1, state, (), ("attn_out", "z"), captured_only=True, **kw) as fn:
        only = fn(x)
    assert len(only) == 2
    for a, b in zip(only, full[1:], strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_attention_pushforward_equals_jacobian(deep_model):
    """Both maps' pushforwards of random tangents against the attention half's Jacobian."""
    state = prompt_state(deep_model, TOKENS)
    layer, cfg = 1, deep_model.cfg
    x = state.resid[layer]
    tangents = torch.randn(5, cfg.d_model, dtype=torch.float64)
    with block_map(deep_model, layer, state, (), ("attn_out", "z"), dtype=x.dtype) as fn:
        j_attn, j_z = torch.func.jacrev(lambda y: fn(y)[1:])(x)
    want_attn = tangents @ j_attn.T
    want_z = torch.einsum("hdm,rm->rhd", j_z, tangents)
    for fast in (True, False):
        t_attn, t_z = attention_pushforward(deep_model, layer, state, tangents, fast=fast)
        assert t_attn.shape == (5, cfg.d_model) and t_z.shape == (5, cfg.n_heads, cfg.d_head)
        assert torch.allclose(t_attn, want_attn, rtol=0, atol=1e-12), fast
        assert torch.allclose(t_z, want_z, rtol=0, atol=1e-12), fast


@pytest.fixture(scope="module", params=["gpt2", "llama", "llama-gqa2", "gemma", "gemma-wide"])
def reverse_model(request):
    """Three-block tiny float64 models: GPT-2-like (LayerNorm, learned positions, GELU,
    multi-head), Llama-like (RMSNorm, rotary, gated SiLU, one key-value head for four query
    heads), Llama-like with two key-value heads for eight query heads, and Gemma-3-like
    (QK-norm, post-norms, local and global layers), also with heads · d_head ≠ d_model as in
    gemma-3-270m (its norm weights drawn around one)."""
    if request.param == "gemma-wide":
        fields = _tl.config_to_dict(tiny_config("gemma", n_layers=3)) | dict(d_head=8)
        model = _tl.HookedTransformer(_tl.config_from_dict(fields | dict(rotary_dim=8))).eval()
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(".w"):
                    param.normal_(1.0, 0.3, generator=gen)
        return model
    if request.param != "llama-gqa2":
        return tiny_model(request.param, n_layers=3)
    fields = _tl.config_to_dict(tiny_config("llama", n_layers=3, n_heads=8, d_model=32))
    fields |= dict(n_key_value_heads=2, rotary_dim=4, d_head=4)
    model = _tl.HookedTransformer(_tl.config_from_dict(fields))
    model.eval()
    return model


def _vjp_rows(model, state, layer, rows, kinds) -> dict:
    """The reference: one ``torch.func.vjp`` of the fast block map, vmapped over the rows."""
    from steerlens.metric.autodiff import pullback_rows
    from steerlens.metric.recursion import _zeros_for

    x = state.resid[layer]
    zeros = [_zeros_for(model, k, x) for k in kinds]
    with torch.no_grad(), block_map(model, layer, state, kinds, dtype=x.dtype, fast=True) as fn:
        grads = pullback_rows(lambda x, *d: fn(x, *d)[0], (x, *zeros), rows)
    return dict(zip(("resid_pre", *kinds), grads, strict=True))


#: every kind (no contraction possible); resid_pre alone; kinds that allow both contractions
KIND_SETS = {"all": list(_DELTA_KINDS), "none": [], "mid": ["resid_mid", "result", "mlp_out"]}


@pytest.mark.parametrize("contract", [None, True, False], ids=["auto", "contract", "plain"])
@pytest.mark.parametrize("kind_set", list(KIND_SETS))
@pytest.mark.parametrize("n_pos", [1, 2, 10])
def test_hand_pullback_equals_vmapped_vjp(reverse_model, n_pos, kind_set, contract):
    """FastBlock.pullback against the vmapped vjp of the same block at the kinds asked for,
    every layer, for the lens factor's rows and for random rows, by either route."""
    from steerlens.metric.blockmap import FastBlock

    model, kinds = reverse_model, KIND_SETS[kind_set]
    state = prompt_state(model, TOKENS[:n_pos])
    gen = torch.Generator().manual_seed(1)
    for layer in range(model.cfg.n_layers):
        assert fast_supported(model, layer, n_pos)
        lens = lens_rows(model, state.resid[layer + 1], MetricOptions(vocab="full"))[0]
        noise = torch.randn(5, model.cfg.d_model, dtype=torch.float64, generator=gen)
        for rows in (lens, noise):
            got = FastBlock(model, layer, state, torch.float64).pullback(
                state.resid[layer], rows, kinds, contract=contract
            )
            want = _vjp_rows(model, state, layer, rows, kinds)
            assert list(got) == list(want)
            for kind, ref in want.items():
                assert got[kind].shape == ref.shape, kind
                err = float((got[kind] - ref).abs().max() / ref.abs().max())
                assert err < 1e-10, (layer, kind, err)


def test_pull_block_default_is_the_hand_pass(deep_model, monkeypatch):
    """On a plain block, pull_block takes the hand-written pass (the vmapped vjp is never
    called) and its rows and shares equal the ``vmap=True`` reference; the hooked map still
    takes the vjp."""
    from steerlens.metric import recursion

    state = prompt_state(deep_model, TOKENS)
    b = lens_rows(deep_model, state.resid[3], MetricOptions())[0]
    kinds = set(_DELTA_KINDS)
    ref = [pull_block(deep_model, state, 2, b, kinds, decompose=True, vmap=True)]
    ref.append(pull_block(deep_model, state, 1, ref[0].rows["resid_pre"], set(), vmap=True))
    real = recursion.pullback_rows
    calls = []
    monkeypatch.setattr(recursion, "pullback_rows", lambda *a, **k: calls.append(1) or real(*a))
    got = [pull_block(deep_model, state, 2, b, kinds, decompose=True)]
    got.append(pull_block(deep_model, state, 1, got[0].rows["resid_pre"], set()))
    assert not calls
    for g, r in zip(got, ref, strict=True):
        assert set(g.rows) == set(r.rows)
        for kind, rows in r.rows.items():
            assert float((g.rows[kind] - rows).abs().max()) < 1e-12, kind
        for path, share in r.shares.items():
            assert abs(g.shares[path] - share) < 1e-12, path
        assert g.head_shares == pytest.approx(r.head_shares, abs=1e-12)
    pull_block(deep_model, state, 2, b, set(), fast=False)
    assert calls


def test_local_metric_and_fishback_unchanged_by_the_hand_pass(deep_model, monkeypatch):
    """LocalPath.metric at a moved point and a whole FishBack run give the same numbers whether
    the blocks pull back by hand or by the vmapped vjp."""
    import functools

    from steerlens.concepts import TokenSet
    from steerlens.methods import FishBackConfig, steer_iteratively
    from steerlens.metric import local

    concept = TokenSet.from_ids([7], d_vocab=deep_model.cfg.d_vocab)
    cfg = FishBackConfig("resid_post.0", 0.6, step=0.3, vocab="full")
    moved = torch.randn(deep_model.cfg.d_model, dtype=torch.float64)

    def both():
        with local.LocalPath(deep_model, TOKENS, "resid_post.0") as path:
            metric = path.metric(path.x0 + moved, MetricOptions(vocab="full"))
        return metric.matrix(), steer_iteratively(deep_model, cfg, concept, TOKENS)

    hand_matrix, hand_run = both()
    monkeypatch.setattr(local, "pull_block", functools.partial(pull_block, vmap=True))
    vjp_matrix, vjp_run = both()
    assert float((hand_matrix - vjp_matrix).abs().max() / vjp_matrix.abs().max()) < 1e-10
    assert hand_run.reached and vjp_run.reached and hand_run.steps == vjp_run.steps > 1
    assert float((hand_run.path - vjp_run.path).abs().max()) < 1e-10
    assert hand_run.final_value == pytest.approx(vjp_run.final_value, abs=1e-10)


@pytest.mark.parametrize(
    "flavour,norm", [("gpt2", "LNPre"), ("llama", "RMSPre"), ("gpt2", None)], ids=str
)
def test_hand_pullback_other_norms(flavour, norm):
    """The weightless norms (folded LayerNorm / RMSNorm), transposed by hand, and no norm at
    all (the vjp fallback), against the vmapped vjp."""
    from steerlens.metric.blockmap import FastBlock

    fields = _tl.config_to_dict(tiny_config(flavour, n_layers=2))
    fields |= dict(normalization_type=norm)
    model = _tl.HookedTransformer(_tl.config_from_dict(fields))
    model.eval()
    state = prompt_state(model, TOKENS[:6])
    rows = torch.randn(4, model.cfg.d_model, dtype=torch.float64)
    for layer in range(2):
        assert fast_supported(model, layer, 6)
        got = FastBlock(model, layer, state, torch.float64).pullback(state.resid[layer], rows)
        want = _vjp_rows(model, state, layer, rows, [])
        err = (got["resid_pre"] - want["resid_pre"]).abs().max() / want["resid_pre"].abs().max()
        assert float(err) < 1e-10, (layer, float(err))


def test_fast_blocks_share_laid_out_weights_inside_the_block_only(llama_model):
    """Inside shared_block_weights, fast blocks of one model, layer and dtype read one copy of
    the laid-out weights (a batch of prompts does not copy them per prompt); outside it each
    lays them out afresh, so a weight edited in any way (here through ``.data``, which moves no
    version counter) is read after the block ends: the output follows the edit and equals the
    hooked map's."""
    from steerlens.metric.blockmap import _SHARED, FastBlock, shared_block_weights

    model = copy.deepcopy(llama_model)
    state = prompt_state(model, TOKENS[:5])
    other = prompt_state(model, TOKENS[2:9])
    with shared_block_weights(model):
        a = FastBlock(model, 1, state, torch.float64)
        with shared_block_weights(model):  # nested: the same copies
            b = FastBlock(model, 1, other, torch.float64)
        assert a.w_q.data_ptr() == b.w_q.data_ptr()
        assert FastBlock(model, 0, state, torch.float64).w_q.data_ptr() != a.w_q.data_ptr()
        assert FastBlock(model, 1, other, torch.float64).w_k.data_ptr() == a.w_k.data_ptr()
    assert id(model) not in _SHARED  # dropped with the outermost block
    c = FastBlock(model, 1, state, torch.float64)
    assert c.w_q.data_ptr() != a.w_q.data_ptr()
    x = state.resid[1]

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        with block_map(model, 1, state, (), dtype=x.dtype, fast=True) as fn:
            fast = fn(x)[0]
        with block_map(model, 1, state, (), dtype=x.dtype, fast=False) as fn:
            hooked = fn(x)[0]
        return fast, hooked

    before = both()[0]
    model.blocks[1].attn.W_Q.data.mul_(1.5)
    fast, hooked = both()
    assert not torch.allclose(fast, before) and torch.allclose(fast, hooked, atol=1e-12, rtol=0)
