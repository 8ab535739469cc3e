"""Single-position block maps: block l at the prediction position as a plain tensor function.

``block_map(model, layer, state)`` returns a context manager yielding
``fn(x, *deltas) -> (resid_post, *captured)``: x is the residual entering the block at the last
position, each delta is added at one hook (a site kind), and ``captured`` are the values of other
hooks (for the decomposition). Earlier positions are fixed at their clean keys and values.

Two implementations, checked against each other and against brute force in the tests:

- :class:`FastBlock` for the common pre-norm decoder block (LayerNorm or RMSNorm; learned or
  rotary positions; plain or gated MLP; multi-head or grouped-query attention). It attends from
  the single query to the cached keys (rotated once), with queries viewed as
  ``[kv_heads, group, d_head]`` so grouped keys are never expanded, and splits the scores into
  the fixed past and the new key so no gradient flows into the past.
- :class:`HookedBlock`, a fallback for every other block TransformerLens builds (post-norms,
  QK-norm, soft-caps...): TransformerLens's own block forward with a frozen key-value cache entry,
  deltas and captures attached as hooks inside the context.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from transformer_lens.components.mlps.gated_mlp import GatedMLP
from transformer_lens.components.mlps.mlp import MLP

from steerlens.hooks import hooked
from steerlens.metric.state import PromptState
from steerlens.sites import HOOKS

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

BlockFn = Callable[..., tuple[Tensor, ...]]


def fast_supported(model: HookedTransformer, layer: int, n_pos: int) -> bool:
    """Whether :class:`FastBlock` computes block ``layer`` exactly."""
    cfg = model.cfg
    block = model.blocks[layer]
    flags_off = (
        "attn_only",
        "parallel_attn_mlp",
        "use_attn_in",
        "use_split_qkv_input",
        "use_normalization_before_and_after",
        "use_qk_norm",
        "use_logn_attn",
        "use_attention_sinks",
        "load_in_4bit",
        "use_hook_mlp_in",
    )
    if any(getattr(cfg, flag, False) for flag in flags_off):
        return False
    if (getattr(cfg, "attn_scores_soft_cap", -1.0) or -1.0) > 0 or cfg.clip_qkv is not None:
        return False
    if cfg.positional_embedding_type not in ("standard", "rotary"):
        return False
    if type(block.mlp) not in (MLP, GatedMLP) or cfg.is_layer_norm_activation():
        return False
    window = getattr(block.attn, "attn_type", "global")
    if window != "global" and (cfg.window_size is None or n_pos > cfg.window_size):
        return False
    return "Olmo" not in str(cfg.original_architecture)


class FastBlock:
    """Block ``layer`` at the last position of a prompt, written out with the block's weights."""

    def __init__(
        self, model: HookedTransformer, layer: int, state: PromptState, dtype: torch.dtype
    ):
        cfg = model.cfg
        block = model.blocks[layer]
        attn = block.attn
        self.block, self.cfg = block, cfg
        self.n_heads, self.d_head = cfg.n_heads, cfg.d_head
        self.n_kv = cfg.n_key_value_heads or cfg.n_heads
        self.pos = state.n_pos - 1
        k_w = getattr(attn, "_W_K", attn.W_K)
        v_w = getattr(attn, "_W_V", attn.W_V)
        k_b = getattr(attn, "_b_K", attn.b_K)
        v_b = getattr(attn, "_b_V", attn.b_V)
        d = cfg.d_model
        self.w_q = attn.W_Q.detach().permute(1, 0, 2).reshape(d, -1).to(dtype)
        self.b_q = attn.b_Q.detach().reshape(-1).to(dtype)
        self.w_k = k_w.detach().permute(1, 0, 2).reshape(d, -1).to(dtype)
        self.b_k = k_b.detach().reshape(-1).to(dtype)
        self.w_v = v_w.detach().permute(1, 0, 2).reshape(d, -1).to(dtype)
        self.b_v = v_b.detach().reshape(-1).to(dtype)
        self.w_o = attn.W_O.detach().to(dtype)  # [head, d_head, d_model]
        self.w_o_flat = self.w_o.reshape(-1, d)
        self.b_o = attn.b_O.detach().to(dtype)
        self.scale = float(attn.attn_scale)
        entry = state.cache[layer]
        keys = entry.past_keys.detach()
        if cfg.positional_embedding_type == "rotary" and keys.shape[1] > 0:
            keys = attn.apply_rotary(keys, 0, None)
        self.k_past = keys[0].permute(1, 0, 2).to(dtype).contiguous()  # [kv, pos, d_head]
        self.v_past = entry.past_values.detach()[0].permute(1, 0, 2).to(dtype).contiguous()
        mlp: Any = block.mlp
        self.gated = isinstance(mlp, GatedMLP)
        self.w_in = mlp.W_in.detach().to(dtype)
        self.b_in = mlp.b_in.detach().to(dtype)
        self.w_gate = mlp.W_gate.detach().to(dtype) if self.gated else None
        self.w_out = mlp.W_out.detach().to(dtype)
        self.b_out = mlp.b_out.detach().to(dtype)
        self.act: Callable[[Tensor], Tensor] = mlp.act_fn  # type: ignore[assignment]

    def _rotate(self, x: Tensor, n: int) -> Tensor:
        if self.cfg.positional_embedding_type != "rotary":
            return x.view(n, self.d_head)
        rotated = self.block.attn.apply_rotary(x.view(1, 1, n, self.d_head), self.pos, None)
        return rotated.view(n, self.d_head)

    def __call__(
        self, x: Tensor, deltas: dict[str, Tensor], capture: Sequence[str]
    ) -> tuple[Tensor, ...]:
        h = self.block.ln1(x.view(1, 1, -1)).view(-1)
        q = self._rotate(h @ self.w_q + self.b_q, self.n_heads)
        k = self._rotate(h @ self.w_k + self.b_k, self.n_kv)
        v = (h @ self.w_v + self.b_v).view(self.n_kv, self.d_head)
        group = self.n_heads // self.n_kv
        qg = q.view(self.n_kv, group, self.d_head)
        past = torch.einsum("kgd,ktd->kgt", qg, self.k_past)
        new = torch.einsum("kgd,kd->kg", qg, k).unsqueeze(-1)
        pattern = torch.softmax(torch.cat([past, new], -1) / self.scale, -1)
        n_past = self.k_past.shape[1]
        z = torch.einsum("kgt,ktd->kgd", pattern[..., :n_past], self.v_past)
        z = (z + pattern[..., n_past:] * v.unsqueeze(1)).reshape(self.n_heads, self.d_head)
        if "z" in deltas:
            z = z + deltas["z"]
        values: dict[str, Tensor] = {"z": z}
        if "result" in deltas or "result" in capture:
            result = torch.einsum("hd,hdm->hm", z, self.w_o)
            if "result" in deltas:
                result = result + deltas["result"]
            values["result"] = result
            attn_out = result.sum(0) + self.b_o
        else:
            attn_out = z.reshape(-1) @ self.w_o_flat + self.b_o
        if "attn_out" in deltas:
            attn_out = attn_out + deltas["attn_out"]
        values["attn_out"] = attn_out
        mid = x + attn_out
        if "resid_mid" in deltas:
            mid = mid + deltas["resid_mid"]
        h2 = self.block.ln2(mid.view(1, 1, -1)).view(-1)
        if self.gated:
            assert self.w_gate is not None
            pre = h2 @ self.w_gate
            if "mlp_pre" in deltas:
                pre = pre + deltas["mlp_pre"]
            post = self.act(pre) * (h2 @ self.w_in) + self.b_in
        else:
            pre = h2 @ self.w_in + self.b_in
            if "mlp_pre" in deltas:
                pre = pre + deltas["mlp_pre"]
            post = self.act(pre)
        if "mlp_post" in deltas:
            post = post + deltas["mlp_post"]
        mlp_out = post @ self.w_out + self.b_out
        if "mlp_out" in deltas:
            mlp_out = mlp_out + deltas["mlp_out"]
        return (mid + mlp_out, *[values[c] for c in capture])


@contextmanager
def block_map(
    model: HookedTransformer,
    layer: int,
    state: PromptState,
    delta_kinds: Sequence[str],
    capture: Sequence[str] = (),
    *,
    dtype: torch.dtype,
    fast: bool | None = None,
) -> Iterator[BlockFn]:
    """Yield ``fn(x, *deltas) -> (resid_post, *captured)`` for block ``layer`` at the last
    position. ``fast=None`` picks :class:`FastBlock` where it is exact."""
    use_fast = fast_supported(model, layer, state.n_pos) if fast is None else fast
    if use_fast:
        impl = FastBlock(model, layer, state, dtype)

        def fast_fn(x: Tensor, *deltas: Tensor) -> tuple[Tensor, ...]:
            return impl(x, dict(zip(delta_kinds, deltas, strict=True)), capture)

        yield fast_fn
        return
    yield from _hooked_block(model, layer, state, delta_kinds, capture)


def _hooked_block(
    model: HookedTransformer,
    layer: int,
    state: PromptState,
    delta_kinds: Sequence[str],
    capture: Sequence[str],
) -> Iterator[BlockFn]:
    block = model.blocks[layer]
    entry = state.cache[layer]
    holder: dict[str, Tensor] = {}
    captured: dict[str, Tensor] = {}

    def add(kind: str) -> Callable:
        def hook(act: Tensor, hook: object) -> Tensor:
            return act + holder[kind].view(act.shape)

        return hook

    def grab(kind: str) -> Callable:
        def hook(act: Tensor, hook: object) -> None:
            captured[kind] = act[0, 0]

        return hook

    hooks = [(f"blocks.{layer}.{HOOKS[k]}", add(k)) for k in delta_kinds]
    hooks += [(f"blocks.{layer}.{HOOKS[k]}", grab(k)) for k in capture]

    def fn(x: Tensor, *deltas: Tensor) -> tuple[Tensor, ...]:
        holder.update(zip(delta_kinds, deltas, strict=True))
        out = block(x.view(1, 1, -1), past_kv_cache_entry=entry).view(-1)
        return (out, *[captured[k] for k in capture])

    need_result = "result" in delta_kinds or "result" in capture
    with hooked(model, hooks, need_result=need_result):  # type: ignore[arg-type]
        yield fn
