"""Each assumption :mod:`steerlens._tl` makes about TransformerLens, checked against the installed
version on the tiny float64 models: ``test_<name>`` checks the function or constant ``<name>``, so a
TransformerLens upgrade that breaks an assumption fails the test of that name."""

from __future__ import annotations

import copy
import dataclasses
import json
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from transformer_lens.components.layer_norm import LayerNorm
from transformer_lens.components.layer_norm_pre import LayerNormPre
from transformer_lens.components.rms_norm import RMSNorm
from transformer_lens.components.rms_norm_pre import RMSNormPre

from steerlens import _tl
from steerlens.models import convert, offline
from steerlens.models.layout import linear_layout
from steerlens.testing import tiny_config, tiny_model

ATOL = 1e-12


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, atol=atol, rtol=0)


def _run(model, tokens):
    """Every hook activation of one forward of ``tokens`` (attention results included)."""
    with _tl.attn_result_enabled(model):
        _, cache = model.run_with_cache(tokens[None])
    return cache


def _variant(**fields) -> _tl.HookedTransformer:
    """A tiny GPT-2-flavour model with some config fields changed."""
    return _tl.HookedTransformer(_tl.config_from_dict(_tl.config_to_dict(tiny_config()) | fields))


# ----------------------------------------------------------------------------- types and hooks


def test_hooked_transformer_deprecation():
    with pytest.warns(DeprecationWarning, match=_tl.HOOKED_TRANSFORMER_DEPRECATION):
        _tl.HookedTransformer(tiny_config())


def test_attn_result_enabled(model, tokens):
    seen: list[torch.Tensor] = []
    hooks = [("blocks.0.attn.hook_result", lambda act, hook: seen.append(act))]
    with _tl.forward_hooks(model, hooks):
        model(tokens[None])
        assert seen == []  # off by default: hook_result does not fire
        with _tl.attn_result_enabled(model, enabled=False):
            model(tokens[None])
        assert seen == [] and not model.cfg.use_attn_result
        with pytest.raises(RuntimeError), _tl.attn_result_enabled(model):
            assert model.cfg.use_attn_result
            _, cache = model.run_with_cache(tokens[None])
            raise RuntimeError("inside")
    assert not model.cfg.use_attn_result
    result = seen[0]
    assert result.shape == (1, len(tokens), model.cfg.n_heads, model.cfg.d_model)
    attn_out = result.sum(2) + model.blocks[0].attn.b_O
    assert _close(attn_out, cache["blocks.0.hook_attn_out"])


def test_forward_hooks(model, tokens):
    name = "blocks.0.hook_resid_post"
    calls: list[str] = []

    def tag(label):
        def hook(act, hook):
            calls.append(label)

        return hook

    level = model.context_level
    clean = model(tokens[None])
    model.add_hook(name, tag("user"))
    try:
        with model.hooks(fwd_hooks=[(name, tag("tl"))]):
            with _tl.forward_hooks(model, [(name, tag("outer"))]):
                with _tl.forward_hooks(model, [(name, tag("inner"))]):
                    model(tokens[None])
                assert sorted(calls) == ["inner", "outer", "tl", "user"]
                calls.clear()
                with pytest.raises(RuntimeError), _tl.forward_hooks(model, [(name, tag("gone"))]):
                    raise RuntimeError("inside")
                model(tokens[None])
                assert sorted(calls) == ["outer", "tl", "user"]
            calls.clear()
            model(tokens[None])
            assert sorted(calls) == ["tl", "user"]
        with (
            pytest.raises(KeyError),
            _tl.forward_hooks(model, [(name, tag("a")), ("no.hook", None)]),
        ):
            pass
        calls.clear()
        model(tokens[None])
        assert calls == ["user"] and model.context_level == level
        # a hook that returns a tensor replaces the activation
        with _tl.forward_hooks(model, [(name, lambda act, hook: act * 0.0)]):
            zeroed = model(tokens[None])
        with _tl.forward_hooks(model, [(name, lambda act, hook: act * 0.0)]):
            with _tl.forward_hooks(model, [("blocks.1.hook_resid_pre", lambda act, hook: act)]):
                assert torch.equal(model(tokens[None]), zeroed)
        assert not torch.equal(zeroed, clean)
    finally:
        model.reset_hooks(including_permanent=True)
    assert torch.equal(model(tokens[None]), clean)


# ----------------------------------------------------------------------------- key-value cache


def _kv_shape(model, n_pos: int) -> tuple[int, ...]:
    return (1, n_pos, model.cfg.n_key_value_heads or model.cfg.n_heads, model.cfg.d_head)


def test_new_kv_cache(model):
    cache = _tl.new_kv_cache(model)
    assert isinstance(cache, _tl.KeyValueCache) and not cache.frozen
    assert len(cache.entries) == model.cfg.n_layers
    for layer in range(model.cfg.n_layers):
        keys, values = _tl.cached_keys_values(cache, layer)
        assert keys.shape == values.shape == _kv_shape(model, 0)
    assert cache.previous_attention_mask.shape == (1, 0)


def test_forward_filling_cache(model, tokens):
    cache = _tl.new_kv_cache(model)
    logits = _tl.forward_filling_cache(model, tokens[None], cache)
    assert _close(logits, model(tokens[None]))
    acts = _run(model, tokens)
    for layer in range(model.cfg.n_layers):
        keys, values = _tl.cached_keys_values(cache, layer)
        assert keys.shape == _kv_shape(model, len(tokens))
        assert _close(keys, acts[f"blocks.{layer}.attn.hook_k"])
        assert _close(values, acts[f"blocks.{layer}.attn.hook_v"])
    assert cache.previous_attention_mask.shape == (1, len(tokens))


def _frozen_cache(model, tokens) -> _tl.KeyValueCache:
    cache = _tl.new_kv_cache(model)
    _tl.forward_filling_cache(model, tokens[None], cache)
    _tl.freeze_before_last(cache)
    return cache


def test_freeze_before_last(model, tokens):
    cache = _frozen_cache(model, tokens)
    assert cache.frozen and all(entry.frozen for entry in cache.entries)
    assert cache.previous_attention_mask.shape == (1, len(tokens) - 1)
    for layer in range(model.cfg.n_layers):
        keys, values = _tl.cached_keys_values(cache, layer)
        assert keys.shape == values.shape == _kv_shape(model, len(tokens) - 1)
    # the last position alone, attending to the frozen earlier ones, gives the full forward's
    # last logits, and appends nothing
    for _ in range(2):
        last = _tl.forward_filling_cache(model, tokens[None, -1:], cache)
        assert _close(last[0, -1], model(tokens[None])[0, -1])
        assert _tl.cached_keys_values(cache, 0)[0].shape[1] == len(tokens) - 1


def test_cached_keys_values(model, tokens):
    cache = _frozen_cache(model, tokens)
    acts = _run(model, tokens)
    rotary = _tl.positional_embedding(model) == "rotary"
    for layer in range(model.cfg.n_layers):
        keys, values = _tl.cached_keys_values(cache, layer)
        assert _close(values, acts[f"blocks.{layer}.attn.hook_v"][:, :-1])
        assert _close(keys, acts[f"blocks.{layer}.attn.hook_k"][:, :-1])  # unrotated
        if rotary:
            rotated = _tl.rotate(model, layer, keys, 0)
            assert _close(rotated, acts[f"blocks.{layer}.attn.hook_rot_k"][:, :-1])


def test_block_forward_cached(model, tokens):
    cache = _frozen_cache(model, tokens)
    acts = _run(model, tokens)
    seen: list[torch.Tensor] = []
    for layer in range(model.cfg.n_layers):
        seen.clear()
        x = acts[f"blocks.{layer}.hook_resid_pre"][:, -1:]
        hooks = [(f"blocks.{layer}.hook_resid_mid", lambda act, hook: seen.append(act))]
        with _tl.forward_hooks(model, hooks):
            out = _tl.block_forward_cached(model, layer, x, cache)
        assert _close(out, acts[f"blocks.{layer}.hook_resid_post"][:, -1:])
        assert _close(seen[0], acts[f"blocks.{layer}.hook_resid_mid"][:, -1:])
        assert _tl.cached_keys_values(cache, layer)[0].shape[1] == len(tokens) - 1


# ----------------------------------------------------------------------------- architecture


def test_positional_embedding(gpt2_model, llama_model):
    assert _tl.positional_embedding(gpt2_model) == "standard"
    assert _tl.positional_embedding(llama_model) == "rotary"
    assert "hook_pos_embed" in gpt2_model.hook_dict  # learned positions, added to the embedding
    assert "hook_pos_embed" not in llama_model.hook_dict
    for name in ("shortformer", "alibi", "relative_positional_bias"):  # the other values
        assert _tl.positional_embedding(_variant(positional_embedding_type=name)) == name


def test_is_causal(model, tokens):
    assert _tl.is_causal(model)
    changed = tokens.clone()
    changed[-1] = (changed[-1] + 1) % model.cfg.d_vocab
    assert torch.equal(model(tokens[None])[0, :-1], model(changed[None])[0, :-1])
    assert not _tl.is_causal(_variant(attention_dir="bidirectional"))


def test_fast_block_off_flags():
    fields = {f.name for f in dataclasses.fields(_tl.HookedTransformerConfig)}
    read = ("attn_scores_soft_cap", "clip_qkv", "window_size", "original_architecture")
    read += ("use_qk_norm", "use_normalization_before_and_after")
    assert set(_tl.FAST_BLOCK_OFF_FLAGS) | set(read) <= fields  # a renamed flag reads as off


def test_is_fast_block(model, gemma_model, tokens):
    acts = _run(model, tokens)
    for layer in range(model.cfg.n_layers):
        assert _tl.is_fast_block(model, layer, len(tokens))
        pre, mid, post = (acts[f"blocks.{layer}.hook_resid_{k}"] for k in ("pre", "mid", "post"))
        assert _close(mid, pre + acts[f"blocks.{layer}.hook_attn_out"])  # the two residual adds;
        assert _close(
            post, mid + acts[f"blocks.{layer}.hook_mlp_out"]
        )  # ln1, ln2: test_block_norms
    off = dict(
        attn_only=True,
        parallel_attn_mlp=True,
        attn_scores_soft_cap=50.0,
        clip_qkv=8.0,
        act_fn="solu_ln",
        positional_embedding_type="shortformer",
        original_architecture="Olmo2ForCausalLM",
    )
    for field, value in off.items():
        assert not _tl.is_fast_block(_variant(**{field: value}), 0, 8), field
    local = _variant(use_local_attn=True, attn_types=["local", "global"], window_size=4)
    assert [_tl.is_fast_block(local, layer, 8) for layer in (0, 1)] == [False, True]
    assert _tl.is_fast_block(local, 0, 4)  # the window covers the prompt
    # Gemma 3's block (QK-norm, post-norms, local layers within their window) is written out
    assert all(_tl.is_fast_block(gemma_model, layer, len(tokens)) for layer in range(2))
    fields = _tl.config_to_dict(gemma_model.cfg) | dict(window_size=4)
    short = _tl.HookedTransformer(_tl.config_from_dict(fields))
    assert [_tl.is_fast_block(short, layer, 8) for layer in (0, 1)] == [False, True]  # local
    assert _tl.is_fast_block(_variant(use_qk_norm=True), 0, 8)
    assert not _tl.is_fast_block(_variant(use_qk_norm=True, attn_scores_soft_cap=50.0), 0, 8)


def test_norm_form():
    """Each TransformerLens norm computes w ⊙ n / s (+ b) in the form norm_form names."""
    cfg = tiny_config()
    x = torch.randn(3, cfg.d_model, dtype=torch.float64)
    for cls in (LayerNorm, LayerNormPre, RMSNorm, RMSNormPre):
        module = cls(cfg)
        if hasattr(module, "w"):
            with torch.no_grad():
                module.w.normal_()
        centred, weighted = _tl.norm_form(module)
        n = x - x.mean(-1, keepdim=True) if centred else x
        want = n / (n.pow(2).mean(-1, keepdim=True) + module.eps).sqrt()
        if weighted:
            want = want * module.w + (module.b if hasattr(module, "b") else 0)
        assert _close(module(x[:, None])[:, 0], want), cls.__name__
    assert _tl.norm_form(torch.nn.Identity()) is None


def test_qk_norms(llama_model, gemma_model, tokens):
    assert _tl.qk_norms(llama_model, 0) == (None, None)
    acts = _run(gemma_model, tokens)
    for layer in range(gemma_model.cfg.n_layers):
        q_norm, k_norm = _tl.qk_norms(gemma_model, layer)
        # each head's projection is normalised, then rotated (the cached keys are not rotated)
        for norm, kind in ((q_norm, "q"), (k_norm, "k")):
            raw = acts[f"blocks.{layer}.attn.hook_{kind}"]
            rotated = _tl.rotate(gemma_model, layer, norm(raw), 0)
            assert _close(rotated, acts[f"blocks.{layer}.attn.hook_rot_{kind}"]), (layer, kind)


def test_block_post_norms(llama_model, gemma_model, tokens):
    assert _tl.block_post_norms(llama_model, 0) == (None, None)
    acts = _run(gemma_model, tokens)
    for layer in range(gemma_model.cfg.n_layers):
        ln1_post, ln2_post = _tl.block_post_norms(gemma_model, layer)
        mlp = _tl.mlp_weights(gemma_model, layer)
        heads = acts[f"blocks.{layer}.attn.hook_result"].sum(2)  # hook_result: before the norm
        attn = ln1_post(heads + gemma_model.blocks[layer].attn.b_O)
        assert _close(attn, acts[f"blocks.{layer}.hook_attn_out"])
        mlp_out = ln2_post(acts[f"blocks.{layer}.mlp.hook_post"] @ mlp.w_out + mlp.b_out)
        assert _close(mlp_out, acts[f"blocks.{layer}.hook_mlp_out"])


def test_normalizes_block_outputs(model, tokens):
    fields = _tl.config_to_dict(tiny_config("llama")) | {"use_normalization_before_and_after": True}
    post = _tl.HookedTransformer(_tl.config_from_dict(fields))
    assert not _tl.normalizes_block_outputs(model)
    assert _tl.normalizes_block_outputs(post)
    assert _tl.normalizes_block_outputs(_variant(original_architecture="Olmo2ForCausalLM"))
    # what it means: the attn / mlp modules' outputs are what hook_attn_out / hook_mlp_out read
    # exactly when the block does not normalise them again
    for m, renormalised in ((model, False), (post, True)):
        outputs: dict[str, torch.Tensor] = {}
        handles = [
            getattr(m.blocks[0], name).register_forward_hook(
                lambda module, args, out, name=name, seen=outputs: seen.__setitem__(name, out)
            )
            for name in ("attn", "mlp")
        ]
        try:
            acts = _run(m, tokens)
        finally:
            for handle in handles:
                handle.remove()
        for name in ("attn", "mlp"):
            same = _close(outputs[name], acts[f"blocks.0.hook_{name}_out"])
            assert same != renormalised, name


def test_attention_weights(model, tokens):
    cfg = model.cfg
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    group = cfg.n_heads // n_kv
    acts = _run(model, tokens)
    for layer in range(cfg.n_layers):
        w = _tl.attention_weights(model, layer)
        assert w.w_q.shape == (cfg.n_heads, cfg.d_model, cfg.d_head)
        assert w.w_k.shape == w.w_v.shape == (n_kv, cfg.d_model, cfg.d_head)
        assert w.b_k.shape == w.b_v.shape == (n_kv, cfg.d_head)
        assert w.w_o.shape == (cfg.n_heads, cfg.d_head, cfg.d_model)
        assert w.b_o.shape == (cfg.d_model,)
        h = _tl.block_norms(model, layer)[0](acts[f"blocks.{layer}.hook_resid_pre"])
        q, k, v = (
            torch.einsum("bpd,hde->bphe", h, weight) + bias
            for weight, bias in ((w.w_q, w.b_q), (w.w_k, w.b_k), (w.w_v, w.b_v))
        )
        hook = f"blocks.{layer}.attn.hook_"
        assert _close(q, acts[hook + "q"]) and _close(k, acts[hook + "k"])
        assert _close(v, acts[hook + "v"])
        if _tl.positional_embedding(model) == "rotary":
            q, k = _tl.rotate(model, layer, q, 0), _tl.rotate(model, layer, k, 0)
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
        scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / w.scale
        causal = torch.ones(len(tokens), len(tokens), dtype=torch.bool).tril()
        assert _close(scores[..., causal], acts[hook + "attn_scores"][..., causal])
        z = torch.einsum("bhqk,bkhe->bqhe", acts[hook + "pattern"], v)
        assert _close(z, acts[hook + "z"])
        out = torch.einsum("bphe,hem->bpm", z, w.w_o) + w.b_o
        assert _close(out, acts[f"blocks.{layer}.hook_attn_out"])


def test_rotate(llama_model, tokens):
    acts = _run(llama_model, tokens)
    for layer in range(llama_model.cfg.n_layers):
        for kind in ("q", "k"):
            x, rotated = (acts[f"blocks.{layer}.attn.hook_{p}{kind}"] for p in ("", "rot_"))
            assert _close(_tl.rotate(llama_model, layer, x, 0), rotated)
            tail = _tl.rotate(llama_model, layer, x[:, 3:], 3)  # the offset is absolute
            assert _close(tail, rotated[:, 3:])


def test_block_norms(model, tokens):
    acts = _run(model, tokens)
    for layer in range(model.cfg.n_layers):
        ln1, ln2 = _tl.block_norms(model, layer)
        w = _tl.attention_weights(model, layer)
        mlp = _tl.mlp_weights(model, layer)
        h1 = ln1(acts[f"blocks.{layer}.hook_resid_pre"])  # attention reads ln1(resid_pre)
        q = torch.einsum("bpd,hde->bphe", h1, w.w_q) + w.b_q
        assert _close(q, acts[f"blocks.{layer}.attn.hook_q"])
        h2 = ln2(acts[f"blocks.{layer}.hook_resid_mid"])  # the MLP reads ln2(resid_mid)
        pre = h2 @ mlp.w_gate if mlp.w_gate is not None else h2 @ mlp.w_in + mlp.b_in
        assert _close(pre, acts[f"blocks.{layer}.mlp.hook_pre"])


def test_mlp_weights(gpt2_model, llama_model, tokens):
    for model, gated in ((gpt2_model, False), (llama_model, True)):
        cfg = model.cfg
        acts = _run(model, tokens)
        for layer in range(cfg.n_layers):
            mlp = _tl.mlp_weights(model, layer)
            assert mlp.gated is gated and (mlp.w_gate is not None) is gated
            assert mlp.w_in.shape == (cfg.d_model, cfg.d_mlp) and mlp.b_in.shape == (cfg.d_mlp,)
            assert mlp.w_out.shape == (cfg.d_mlp, cfg.d_model)
            assert mlp.b_out.shape == (cfg.d_model,)
            h = _tl.block_norms(model, layer)[1](acts[f"blocks.{layer}.hook_resid_mid"])
            if mlp.w_gate is not None:
                pre = h @ mlp.w_gate
                post = mlp.act(pre) * (h @ mlp.w_in) + mlp.b_in
            else:
                pre = h @ mlp.w_in + mlp.b_in
                post = mlp.act(pre)
            assert _close(pre, acts[f"blocks.{layer}.mlp.hook_pre"])
            assert _close(post, acts[f"blocks.{layer}.mlp.hook_post"])
            out = post @ mlp.w_out + mlp.b_out
            assert _close(out, acts[f"blocks.{layer}.hook_mlp_out"])


def test_transposed_linear_weights(model, monkeypatch):
    twin = copy.deepcopy(model)
    weights = _tl.transposed_linear_weights(twin)
    per_block = 3 if _tl.mlp_weights(twin, 0).gated else 2
    assert len(weights) == per_block * twin.cfg.n_layers + 1
    own = {id(p) for p in twin.parameters()}
    assert all(id(w) in own and w.dim() == 2 for w in weights)
    passed: list[int] = []
    f_linear = torch.nn.functional.linear

    def spy(x, weight, bias=None):
        passed.append(weight.data_ptr())
        return f_linear(x, weight, bias)

    # the weights F.linear receives as W.T.contiguous(): the gated MLP's and W_U (the plain MLP
    # multiplies its weights as stored, with addmm)
    linear = weights if per_block == 3 else weights[-1:]
    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    twin(torch.tensor([[1, 2, 3]]))
    assert not {w.data_ptr() for w in weights} & set(passed)  # each W.T.contiguous() is a copy
    linear_layout(twin)  # replaces each weight's storage
    passed.clear()
    twin(torch.tensor([[1, 2, 3]]))
    assert {w.data_ptr() for w in linear} <= set(passed)  # now each is W's own storage


# ----------------------------------------------------------------------------- loading


def test_config_to_dict():
    cfg = tiny_config("llama")
    fields = _tl.config_to_dict(cfg)
    assert {f.name for f in dataclasses.fields(cfg)} <= set(fields)
    assert fields["n_layers"] == 2 and fields["dtype"] == torch.float64


def test_config_from_dict():
    cfg = tiny_config("llama")
    fields = _tl.config_to_dict(cfg)
    assert _tl.config_to_dict(_tl.config_from_dict(fields)) == fields
    keep = ("n_layers", "d_model", "n_ctx", "d_head", "act_fn", "d_vocab")
    subset = _tl.config_from_dict({k: fields[k] for k in keep})
    assert (subset.n_layers, subset.d_model, subset.n_heads) == (2, 16, 4)  # the rest derived


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_model_from_state_dict(flavour, tokens):
    model = tiny_model(flavour, dtype=torch.float32)
    twin = _tl.model_from_state_dict(copy.deepcopy(model.cfg), None, model.state_dict())
    state = twin.state_dict()
    assert set(state) == set(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value), key  # raw: nothing folded or centred
    assert torch.equal(twin(tokens[None]), model(tokens[None]))
    wide = tiny_model(flavour)  # float64 weights come back rounded through float32
    twin = _tl.model_from_state_dict(copy.deepcopy(wide.cfg), None, wide.state_dict())
    for key, value in wide.state_dict().items():
        assert torch.allclose(twin.state_dict()[key], value, rtol=1e-6, atol=1e-7), key


@pytest.fixture(scope="module")
def hf_llama():
    """A tiny random Hugging Face Llama (grouped-query) model, float32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=48,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _write_config(hf_model, directory: Path) -> None:
    config = hf_model.config.to_dict() | {"architectures": [type(hf_model).__name__]}
    (directory / "config.json").write_text(json.dumps(config, default=str))


def _pretrained(hf_model, directory: str):
    with offline.hf_offline(), offline.quiet():
        cfg = _tl.pretrained_config(
            directory, hf_cfg=hf_model.config.to_dict(), default_prepend_bos=False
        )
        return cfg, _tl.pretrained_state_dict(directory, cfg, hf_model)


def test_pretrained_config(hf_llama, tmp_path):
    with convert.local_config_dir(hf_llama, tmp_path) as directory:
        cfg = _pretrained(hf_llama, str(directory))[0]
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_key_value_heads) == (2, 16, 4, 2)
    assert (cfg.d_mlp, cfg.d_vocab, cfg.dtype, str(cfg.device)) == (32, 48, torch.float32, "cpu")
    assert cfg.original_architecture == "LlamaForCausalLM"


def test_pretrained_state_dict(hf_llama, tmp_path):
    with convert.local_config_dir(hf_llama, tmp_path) as directory:
        cfg, state_dict = _pretrained(hf_llama, str(directory))
    cfg = _tl.config_from_dict(_tl.config_to_dict(cfg) | {"tokenizer_name": None})
    with offline.quiet():
        model = _tl.model_from_state_dict(cfg, None, state_dict).eval()
    tokens = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        expected = hf_llama(tokens).logits
    assert _close(model(tokens), expected, atol=1e-4)


def test_config_path_words(hf_llama):
    for word in _tl.CONFIG_PATH_WORDS:
        with tempfile.TemporaryDirectory(prefix=f"steerlens-{word}-") as tmp:
            _write_config(hf_llama, Path(tmp))
            try:
                cfg = _pretrained(hf_llama, tmp)[0]
            except Exception:  # the name-based branch found no config to read
                continue
            assert (cfg.n_layers, cfg.d_model) != (2, 16), f"{word!r} no longer misleads"


def test_from_pretrained_raw():
    # TransformerLens 3.x also warns that from_pretrained is deprecated, in words that
    # HOOKED_TRANSFORMER_DEPRECATION does not match
    with offline.hf_offline(), offline.quiet(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*from_pretrained is deprecated.*", DeprecationWarning)
        if (offline.hub_cache_dir() / "models--gpt2").is_dir():
            model = _tl.from_pretrained_raw("gpt2", device="cpu", dtype=torch.float32, n_ctx=16)
            assert model.cfg.n_ctx == 16
        else:
            with pytest.raises((OSError, ValueError)):
                _tl.from_pretrained_raw("gpt2", device="cpu", dtype=torch.float32, n_ctx=16)


def test_official_model_name():
    assert _tl.official_model_name("gpt2") == "gpt2"
    assert _tl.official_model_name("GPT2-Small") == "gpt2"  # an alias, any case
    with pytest.raises(ValueError):
        _tl.official_model_name("no-such-model-xyz")


def test_official_model_names():
    names = _tl.official_model_names()
    assert "gpt2" in names and "EleutherAI/pythia-70m" in names and len(names) > 100
    assert all(_tl.official_model_name(name) == name for name in names[:20])


@torch.no_grad()
def test_last_logits_are_the_full_forwards_last_position(model, tokens):
    """The unembedding at the last position only gives ``model(batch)[:, -1]``, hooks, soft cap
    and key-value cache included."""
    batch = torch.stack([tokens, tokens.flip(0)])
    assert torch.allclose(_tl.last_logits(model, batch), model(batch)[:, -1], rtol=0, atol=1e-12)
    added = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))

    def push(act, hook):
        return act + 3 * added.to(act)

    with _tl.forward_hooks(model, [("blocks.0.hook_resid_post", push)]):
        steered = model(batch)[:, -1]
        assert torch.allclose(_tl.last_logits(model, batch), steered, rtol=0, atol=1e-12)
    assert not torch.allclose(steered, model(batch)[:, -1])
    capped = copy.deepcopy(model)
    capped.cfg.output_logits_soft_cap = 2.0
    assert float(_tl.last_logits(capped, batch).abs().max()) < 2.0
    assert torch.allclose(_tl.last_logits(capped, batch), capped(batch)[:, -1], atol=1e-12)
    full, last = _tl.new_kv_cache(model, 2), _tl.new_kv_cache(model, 2)
    want = _tl.forward_filling_cache(model, batch, full)[:, -1:]
    got = _tl.forward_filling_cache(model, batch, last, last_only=True)
    assert got.shape == want.shape and torch.allclose(got, want, rtol=0, atol=1e-12)
    for a, b in zip(full.entries, last.entries, strict=True):
        assert torch.equal(a.past_keys, b.past_keys) and torch.equal(a.past_values, b.past_values)


def test_stacked_caches_repeat_each_sequence_and_leave_theirs_alone(model, tokens):
    one, two = _tl.new_kv_cache(model, 1), _tl.new_kv_cache(model, 1)
    _tl.forward_filling_cache(model, tokens[None], one)
    _tl.forward_filling_cache(model, tokens.flip(0)[None], two)
    before = one.entries[0].past_keys.clone()
    stacked = _tl.stack_kv_caches(model, [one, two], [2, 3])
    keys = stacked.entries[0].past_keys
    assert keys.shape[0] == 5 and torch.equal(keys[1], before[0])
    assert torch.equal(keys[4], two.entries[0].past_keys[0])
    assert stacked.previous_attention_mask.shape == (5, len(tokens))
    nxt = torch.tensor([[1], [2], [3], [4], [5]])
    _tl.forward_filling_cache(model, nxt, stacked)
    assert torch.equal(one.entries[0].past_keys, before)  # the given cache is not extended
    with pytest.raises(ValueError, match="repeat counts"):
        _tl.stack_kv_caches(model, [one], [1, 2])
