"""The one adapter to TransformerLens: every use of its internals, and every architecture branch.

steerlens is written against TransformerLens 3.x's :class:`HookedTransformer`. Beyond the model's
call, its hook names (``blocks.{layer}.hook_resid_pre`` ...), its config's sizes (``n_layers``,
``d_model`` ...) and the public weights ``W_U`` and ``W_O``, everything steerlens needs from
TransformerLens goes through a small function here that says what it assumes.
``tests/unit/test_tl_adapter.py`` checks each assumption against the installed TransformerLens in a
test named after the function, so a port (to TransformerLens 4's ``TransformerBridge``, say)
changes this module and that test file only. The type names (``HookedTransformer`` ...) are
exported here too; the rest of steerlens imports them from this module.

>>> from steerlens.testing import tiny_model
>>> model = tiny_model("llama")
>>> attention_weights(model, 0).w_k.shape   # grouped-query keys unexpanded: [kv, d_model, d_head]
torch.Size([1, 16, 4])
>>> positional_embedding(model), is_fast_block(model, 0, n_pos=8)
('rotary', True)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens import TransformerLensKeyValueCache as KeyValueCache
from transformer_lens import loading_from_pretrained as tl_loading
from transformer_lens.components.layer_norm import LayerNorm
from transformer_lens.components.layer_norm_pre import LayerNormPre
from transformer_lens.components.mlps.gated_mlp import GatedMLP
from transformer_lens.components.mlps.mlp import MLP
from transformer_lens.components.rms_norm import RMSNorm
from transformer_lens.components.rms_norm_pre import RMSNormPre
from transformer_lens.utilities.activation_functions import apply_softcap
from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

__all__ = [
    "CONFIG_PATH_WORDS",
    "HOOKED_TRANSFORMER_DEPRECATION",
    "FAST_BLOCK_OFF_FLAGS",
    "AttentionWeights",
    "HookedTransformer",
    "HookedTransformerConfig",
    "KeyValueCache",
    "MlpWeights",
    "attention_weights",
    "attn_result_enabled",
    "block_forward_cached",
    "block_norms",
    "block_post_norms",
    "cached_keys_values",
    "config_from_dict",
    "config_to_dict",
    "forward_filling_cache",
    "forward_hooks",
    "freeze_before_last",
    "from_pretrained_raw",
    "is_causal",
    "is_fast_block",
    "last_logits",
    "mlp_weights",
    "model_from_state_dict",
    "new_kv_cache",
    "repeat_kv_cache",
    "stack_kv_caches",
    "normalizes_block_outputs",
    "official_model_name",
    "official_model_names",
    "positional_embedding",
    "pretrained_config",
    "pretrained_state_dict",
    "norm_form",
    "qk_norms",
    "rotate",
    "transposed_linear_weights",
]

#: the message of the DeprecationWarning every ``HookedTransformer(...)`` emits in 3.x
HOOKED_TRANSFORMER_DEPRECATION = ".*HookedTransformer is deprecated.*"

# ----------------------------------------------------------------------------- hooks


@contextmanager
def attn_result_enabled(model: HookedTransformer, enabled: bool = True) -> Iterator[None]:
    """Temporarily set ``cfg.use_attn_result`` so that ``attn.hook_result`` fires.

    Assumes attention reads the flag at every forward (no rebuild needed) and that with it on,
    ``hook_result`` carries the per-head outputs ``[batch, pos, head, d_model]`` whose sum over
    heads plus ``b_O`` is ``hook_attn_out``."""
    old = model.cfg.use_attn_result
    model.cfg.use_attn_result = enabled or old
    try:
        yield
    finally:
        model.cfg.use_attn_result = old


@contextmanager
def forward_hooks(
    model: HookedTransformer, fwd_hooks: Sequence[tuple[str, Callable[..., Any]]]
) -> Iterator[None]:
    """Attach forward hooks to the named hook points for the duration of the block.

    The hooks go on at a new context level, as ``model.hooks(...)`` does, and only the touched
    points have that level removed in ``finally`` (``model.hooks`` visits every hook point of the
    model to remove them). Assumes ``model.context_level``, ``model.mod_dict`` (a missing name
    raises KeyError) and ``HookPoint.add_hook`` / ``remove_hooks`` with a ``level``: removing one
    level leaves hooks of other levels and permanent hooks in place."""
    model.context_level += 1
    level = model.context_level
    touched: dict[str, Any] = {}
    try:
        for name, fn in fwd_hooks:
            point = model.mod_dict[name]
            point.add_hook(fn, dir="fwd", level=level)  # type: ignore[operator]
            touched[name] = point
        yield
    finally:
        for point in touched.values():
            point.remove_hooks("fwd", including_permanent=False, level=level)
        model.context_level -= 1


# ----------------------------------------------------------------------------- key-value cache


def new_kv_cache(model: HookedTransformer, batch_size: int = 1) -> KeyValueCache:
    """An empty key-value cache for ``batch_size`` sequences, one entry per layer."""
    return KeyValueCache.init_cache(model.cfg, model.cfg.device, batch_size=batch_size)


def repeat_kv_cache(cache: KeyValueCache, n: int) -> None:
    """Make a cache of one sequence the cache of ``n`` copies of it (in place; the copies share
    memory until the next append concatenates new positions to each)."""
    for entry in cache.entries:
        entry.past_keys = entry.past_keys.expand(n, -1, -1, -1)
        entry.past_values = entry.past_values.expand(n, -1, -1, -1)
    cache.previous_attention_mask = cache.previous_attention_mask.expand(n, -1)


def stack_kv_caches(
    model: HookedTransformer, caches: Sequence[KeyValueCache], repeats: Sequence[int]
) -> KeyValueCache:
    """A new cache stacking ``caches`` (each of one sequence, all of one length) along the
    batch, the i-th repeated ``repeats[i]`` times, in that order; the given caches are left as
    they were."""
    if len(caches) != len(repeats) or not caches:
        raise ValueError(f"{len(caches)} caches for {len(repeats)} repeat counts")
    out = new_kv_cache(model, sum(repeats))

    def stacked(parts: list[Tensor]) -> Tensor:
        return torch.cat(
            [t.expand(n, *t.shape[1:]) for t, n in zip(parts, repeats, strict=True)], 0
        )

    for layer, entry in enumerate(out.entries):
        entry.past_keys = stacked([c.entries[layer].past_keys for c in caches])
        entry.past_values = stacked([c.entries[layer].past_values for c in caches])
    out.previous_attention_mask = stacked([c.previous_attention_mask for c in caches])
    return out


def _unembed_last(model: HookedTransformer, residual: Tensor) -> Tensor:
    """The logits ``[batch, 1, d_vocab]`` of the last position of the final residual stream
    ``[batch, pos, d_model]``: TransformerLens's own final norm, unembedding and soft cap, which
    act position by position, run on that position only."""
    x = residual[:, -1:]
    if model.cfg.normalization_type is not None:
        x = model.ln_final(x)
    return apply_softcap(model.unembed(x), model.cfg.output_logits_soft_cap)


def last_logits(model: HookedTransformer, batch: Tensor) -> Tensor:
    """``model(batch)[:, -1]``, the logits ``[batch, d_vocab]`` at the last position of
    ``batch`` (token ids ``[batch, pos]``), with the unembedding run at that position only
    (on a large vocabulary most of a forward's cost is unembedding every position)."""
    residual = model(batch, stop_at_layer=model.cfg.n_layers)
    return _unembed_last(model, residual)[:, 0]


def forward_filling_cache(
    model: HookedTransformer, batch: Tensor, cache: KeyValueCache, *, last_only: bool = False
) -> Tensor:
    """The logits ``[batch, pos, d_vocab]`` of ``batch`` (token ids ``[batch, pos]``), the forward
    appending every position's keys and values to ``cache``; with ``last_only`` those of the
    last position only, ``[batch, 1, d_vocab]`` (:func:`last_logits`).

    The attention mask is given explicitly, all ones: without one TransformerLens masks every token
    equal to the tokenizer's pad token, which may be a real token of the prompt."""
    mask = torch.ones_like(batch)
    if not last_only:
        return model(batch, past_kv_cache=cache, attention_mask=mask)
    residual = model(
        batch, past_kv_cache=cache, attention_mask=mask, stop_at_layer=model.cfg.n_layers
    )
    return _unembed_last(model, residual)


def freeze_before_last(cache: KeyValueCache) -> None:
    """Cut the last position from every entry (and the attention mask) and freeze the cache, so
    that a forward at that position attends to the positions before it and appends nothing.

    Assumes entries hold ``past_keys`` / ``past_values`` as ``[batch, pos, kv_head, d_head]`` and
    the cache a ``previous_attention_mask`` ``[batch, pos]``, and that a frozen cache and its
    frozen entries are read but never extended."""
    for entry in cache.entries:
        entry.past_keys = entry.past_keys[:, :-1]
        entry.past_values = entry.past_values[:, :-1]
    cache.previous_attention_mask = cache.previous_attention_mask[:, :-1]
    cache.freeze()


def cached_keys_values(cache: KeyValueCache, layer: int) -> tuple[Tensor, Tensor]:
    """Layer ``layer``'s cached keys and values, each ``[batch, pos, kv_head, d_head]``; the keys
    before the rotary embedding (TransformerLens caches them unrotated and rotates on use)."""
    entry = cache[layer]
    return entry.past_keys, entry.past_values


def block_forward_cached(
    model: HookedTransformer, layer: int, x: Tensor, cache: KeyValueCache
) -> Tensor:
    """Block ``layer``'s ``resid_post`` ``[1, 1, d_model]`` for ``resid_pre`` ``x``
    ``[1, 1, d_model]`` at the position after the cached ones, through TransformerLens's own block
    forward; the block's hooks fire as in a full forward."""
    return model.blocks[layer](x, past_kv_cache_entry=cache[layer])


# ----------------------------------------------------------------------------- architecture


def positional_embedding(model: HookedTransformer) -> str:
    """How positions enter: ``"standard"`` (learned, added to the embedding), ``"rotary"``, or one
    of ``"shortformer"``, ``"alibi"``, ``"relative_positional_bias"``."""
    return model.cfg.positional_embedding_type


def is_causal(model: HookedTransformer) -> bool:
    """Whether attention is causal: a position's activations depend on no later token."""
    return model.cfg.attention_dir == "causal"


def normalizes_block_outputs(model: HookedTransformer) -> bool:
    """Whether each block normalises its attention and MLP outputs again before adding them to
    the residual stream (Gemma 2/3's ``use_normalization_before_and_after``, OLMo 2/3's post-norm,
    switched on ``cfg.original_architecture``). Then ``hook_attn_out`` / ``hook_mlp_out`` read
    after that norm, and the ``attn`` / ``mlp`` modules' own outputs are its inputs."""
    if model.cfg.use_normalization_before_and_after:
        return True
    return str(model.cfg.original_architecture) in POST_NORM_ARCHITECTURES


#: config flags any of which makes a block other than the decoder block the fast map writes out
FAST_BLOCK_OFF_FLAGS: tuple[str, ...] = (
    "attn_only",
    "parallel_attn_mlp",
    "use_attn_in",
    "use_split_qkv_input",
    "use_logn_attn",
    "use_attention_sinks",
    "load_in_4bit",
    "use_hook_mlp_in",
)


def is_fast_block(model: HookedTransformer, layer: int, n_pos: int) -> bool:
    """Whether block ``layer`` on a prompt of ``n_pos`` tokens is the decoder block the fast block
    map writes out: ``mid = x + post1(attn(ln1(x)))``, ``out = mid + post2(mlp(ln2(mid)))``, the
    post-norms present only with ``use_normalization_before_and_after`` (Gemma 2/3), with standard
    or rotary positions, per-head QK-norm or none (``use_qk_norm``: Gemma 3, Qwen 3), global
    attention (or a local window that covers the prompt), no soft-cap or clipping, and a plain or
    gated MLP with an elementwise activation.

    OLMo-family models are excluded by name: TransformerLens switches their post-norms, QK-norm
    over all heads and clamps on ``cfg.original_architecture``, not on a config flag."""
    cfg = model.cfg
    block = model.blocks[layer]
    if any(getattr(cfg, flag, False) for flag in FAST_BLOCK_OFF_FLAGS):
        return False
    if (getattr(cfg, "attn_scores_soft_cap", -1.0) or -1.0) > 0 or cfg.clip_qkv is not None:
        return False
    if cfg.positional_embedding_type not in ("standard", "rotary"):
        return False
    if type(block.mlp) not in (MLP, GatedMLP) or cfg.is_layer_norm_activation():
        return False
    if cfg.use_qk_norm and not all(
        norm_form(getattr(block.attn, name, None)) == (False, True) for name in ("q_norm", "k_norm")
    ):
        return False
    window = getattr(block.attn, "attn_type", "global")
    if window != "global" and (cfg.window_size is None or n_pos > cfg.window_size):
        return False
    return "Olmo" not in str(cfg.original_architecture)


def norm_form(module: object) -> tuple[bool, bool] | None:
    """``(centred, weighted)`` for a TransformerLens norm module, each mapping x to
    ``w ⊙ n / s (+ b)`` over its last axis, n the centred (LayerNorm) or plain (RMSNorm) x and s
    its root mean square plus ``eps``: LayerNorm (True, True), LayerNormPre (True, False),
    RMSNorm (False, True), RMSNormPre (False, False); None for anything else."""
    forms = {LayerNorm: (True, True), LayerNormPre: (True, False)}
    forms |= {RMSNorm: (False, True), RMSNormPre: (False, False)}
    return forms.get(type(module))  # type: ignore[arg-type]


def qk_norms(model: HookedTransformer, layer: int) -> tuple[Any, Any]:
    """Block ``layer``'s per-head query and key norms ``(q_norm, k_norm)`` (RMSNorms over d_head,
    applied to the projected queries and keys before the rotary embedding; the keys are cached
    after it), or ``(None, None)`` where ``use_qk_norm`` is off."""
    if not model.cfg.use_qk_norm:
        return None, None
    attn = model.blocks[layer].attn
    return attn.q_norm, attn.k_norm


def block_post_norms(model: HookedTransformer, layer: int) -> tuple[Any, Any]:
    """Block ``layer``'s norms after attention and after the MLP ``(ln1_post, ln2_post)``
    (``use_normalization_before_and_after``: ``hook_attn_out`` and ``hook_mlp_out`` read after
    them, ``hook_result`` before), or ``(None, None)``."""
    if not model.cfg.use_normalization_before_and_after:
        return None, None
    block = model.blocks[layer]
    return block.ln1_post, block.ln2_post


@dataclass(frozen=True)
class AttentionWeights:
    """One block's attention weights as stored (not detached), keys and values per key-value head:
    ``w_q`` [head, d_model, d_head], ``b_q`` [head, d_head], ``w_k`` / ``w_v``
    [kv_head, d_model, d_head], ``b_k`` / ``b_v`` [kv_head, d_head], ``w_o``
    [head, d_head, d_model], ``b_o`` [d_model]; query head h reads key-value head
    ``h // (head / kv_head)``. Scores are ``q·k / scale``."""

    w_q: Tensor
    b_q: Tensor
    w_k: Tensor
    b_k: Tensor
    w_v: Tensor
    b_v: Tensor
    w_o: Tensor
    b_o: Tensor
    scale: float


def attention_weights(model: HookedTransformer, layer: int) -> AttentionWeights:
    """Block ``layer``'s attention weights. Grouped-query attention stores its keys and values
    unexpanded in ``_W_K``, ``_b_K``, ``_W_V``, ``_b_V`` (its public ``W_K`` ... repeat them per
    query head); multi-head attention has only the public ones."""
    attn: Any = model.blocks[layer].attn
    return AttentionWeights(
        w_q=attn.W_Q,
        b_q=attn.b_Q,
        w_k=attn._W_K if hasattr(attn, "_W_K") else attn.W_K,  # W_K would repeat them
        b_k=attn._b_K if hasattr(attn, "_b_K") else attn.b_K,
        w_v=attn._W_V if hasattr(attn, "_W_V") else attn.W_V,
        b_v=attn._b_V if hasattr(attn, "_b_V") else attn.b_V,
        w_o=attn.W_O,
        b_o=attn.b_O,
        scale=float(attn.attn_scale),
    )


def rotate(model: HookedTransformer, layer: int, x: Tensor, offset: int) -> Tensor:
    """Block ``layer``'s rotary embedding of ``x`` ``[batch, pos, head, d_head]`` whose first
    position is absolute position ``offset`` (no padding)."""
    return model.blocks[layer].attn.apply_rotary(x, offset, None)


def block_norms(
    model: HookedTransformer, layer: int
) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """Block ``layer``'s two pre-norms ``(ln1, ln2)``, each mapping ``[batch, pos, d_model]`` to
    the same shape: ln1 in front of attention, ln2 in front of the MLP."""
    block = model.blocks[layer]
    return block.ln1, block.ln2


@dataclass(frozen=True)
class MlpWeights:
    """One block's MLP weights as stored: ``w_in`` / ``w_gate`` [d_model, d_mlp], ``b_in`` [d_mlp],
    ``w_out`` [d_mlp, d_model], ``b_out`` [d_model]. Plain: ``post = act(h @ w_in + b_in)``;
    gated: ``post = act(h @ w_gate) * (h @ w_in) + b_in``; then ``out = post @ w_out + b_out``.
    ``hook_pre`` is the argument of ``act``."""

    gated: bool
    w_in: Tensor
    b_in: Tensor
    w_gate: Tensor | None
    w_out: Tensor
    b_out: Tensor
    act: Callable[[Tensor], Tensor]


def mlp_weights(model: HookedTransformer, layer: int) -> MlpWeights:
    """Block ``layer``'s MLP weights (a plain ``MLP`` or a ``GatedMLP``)."""
    mlp: Any = model.blocks[layer].mlp
    gated = isinstance(mlp, GatedMLP)
    return MlpWeights(
        gated=gated,
        w_in=mlp.W_in,
        b_in=mlp.b_in,
        w_gate=mlp.W_gate if gated else None,
        w_out=mlp.W_out,
        b_out=mlp.b_out,
        act=mlp.act_fn,
    )


def transposed_linear_weights(model: HookedTransformer) -> list[Tensor]:
    """Every MLP's ``W_in``, ``W_gate`` and ``W_out`` (those the block has) and the unembedding's
    ``W_U``: the gated MLP and the unembedding multiply them as ``F.linear(x, W.T.contiguous())``,
    a no-op instead of a copy when ``W.T`` is stored contiguous. The plain MLP multiplies its
    weights as stored (``addmm``); they are listed too."""
    names = ("W_in", "W_gate", "W_out")
    params = [getattr(block.mlp, n, None) for block in model.blocks for n in names]
    params.append(model.unembed.W_U)
    return [p for p in params if p is not None]


# ----------------------------------------------------------------------------- loading

#: words that, anywhere in a local model directory's path, make TransformerLens's config loader
#: take a name-based branch that ignores the directory's ``config.json``
CONFIG_PATH_WORDS: tuple[str, ...] = ("llama", "gemma")

# loading with these keeps the raw weights: hooks then read the model's real activations
_RAW_WEIGHTS = dict(
    fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
)


def pretrained_config(
    name: str, *, hf_cfg: dict[str, Any], default_prepend_bos: bool
) -> HookedTransformerConfig:
    """The float32 CPU config TransformerLens builds for ``name``: an official model name, or a
    local directory holding a ``config.json`` whose ``architectures`` picks the branch (its path
    must contain none of :data:`CONFIG_PATH_WORDS`)."""
    return tl_loading.get_pretrained_model_config(
        name,
        hf_cfg=hf_cfg,
        default_prepend_bos=default_prepend_bos,
        device="cpu",
        dtype=torch.float32,
    )


def pretrained_state_dict(
    name: str, cfg: HookedTransformerConfig, hf_model: Any
) -> dict[str, Tensor]:
    """TransformerLens's state dict converted from the loaded Hugging Face model ``hf_model``
    (``name`` and ``cfg`` as given to and returned by :func:`pretrained_config`)."""
    return tl_loading.get_pretrained_state_dict(name, cfg, hf_model=hf_model)


def config_to_dict(cfg: HookedTransformerConfig) -> dict[str, Any]:
    """Every field of ``cfg``, by name."""
    return cfg.to_dict()


def config_from_dict(fields: dict[str, Any]) -> HookedTransformerConfig:
    """The config with these fields (those of :func:`config_to_dict`, possibly a subset)."""
    return HookedTransformerConfig.from_dict(fields)


def model_from_state_dict(
    cfg: HookedTransformerConfig, tokenizer: Any, state_dict: dict[str, Tensor]
) -> HookedTransformer:
    """A model of ``cfg`` on ``cfg.device`` holding the weights of ``state_dict``: no layer norm
    folded, nothing centred, value biases not folded (``tokenizer`` may be None). float32 tensors
    are kept exactly; TransformerLens's weight processing rounds tensors of other float dtypes
    through float32 (the offline caches hold float32)."""
    model = HookedTransformer(cfg, tokenizer, move_to_device=True)
    model.load_and_process_state_dict(state_dict, **_RAW_WEIGHTS)
    return model


def from_pretrained_raw(
    official: str,
    *,
    device: str | torch.device | None,
    dtype: torch.dtype,
    n_ctx: int | None,
) -> HookedTransformer:
    """The official model ``official`` with raw weights, from the local Hugging Face cache only;
    weights that are not there raise OSError (or ValueError)."""
    return HookedTransformer.from_pretrained_no_processing(
        official, device=device, dtype=dtype, n_ctx=n_ctx, local_files_only=True
    )


def official_model_name(name: str) -> str:
    """The official model name of ``name`` (an official name or alias, any case); ValueError if
    TransformerLens knows no such model."""
    return tl_loading.get_official_model_name(name)


def official_model_names() -> list[str]:
    """Every official model name TransformerLens knows."""
    return list(tl_loading.OFFICIAL_MODEL_NAMES)
