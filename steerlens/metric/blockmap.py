"""Single-position block maps: block l at the prediction position as a plain tensor function.

``block_map(model, layer, state)`` returns a context manager yielding
``fn(x, *deltas) -> (resid_post, *captured)``: x is the residual entering the block at the last
position, each delta is added at one hook (a site kind), and ``captured`` are the values of other
hooks (for the decomposition). Earlier positions are fixed at their clean keys and values.
``captured_only=True`` yields ``fn(x, *deltas) -> captured`` alone, so a transform of the map
carries no tangents or cotangents for the block output.
``attention_pushforward`` pushes many tangents at once through the attention half (the block
decomposition's forward-mode pass); :meth:`FastBlock.pullback` pulls many cotangents back
through the whole block by hand (the recursive sweep's reverse-mode pass).

Two implementations, checked against each other and against brute force in the tests:

- :class:`FastBlock` for the common decoder block (LayerNorm or RMSNorm; learned or rotary
  positions; plain or gated MLP; multi-head or grouped-query attention; per-head QK-norm and the
  norms after attention and after the MLP of Gemma 2/3, where present). It attends from
  the single query to the cached keys (rotated once), with queries viewed as
  ``[kv_heads, group, d_head]`` so grouped keys are never expanded, and splits the scores into
  the fixed past and the new key so no gradient flows into the past. Its captures (``z``,
  ``result``, ``attn_out``) all lie in the attention half: a captures-only call stops there.
- :class:`HookedBlock`, a fallback for every other block TransformerLens builds (soft-caps,
  clipping, OLMo's norms...): TransformerLens's own block forward with a frozen key-value cache
  entry, deltas and captures attached as hooks inside the context.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from steerlens import _tl
from steerlens.hooks import hooked
from steerlens.metric.autodiff import load_forward_ad
from steerlens.metric.reverse import block_pullback
from steerlens.metric.state import PromptState
from steerlens.sites import HOOKS

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer

BlockFn = Callable[..., tuple[Tensor, ...]]


def fast_supported(model: HookedTransformer, layer: int, n_pos: int) -> bool:
    """Whether :class:`FastBlock` computes block ``layer`` exactly: the block is the decoder
    block it writes out (:func:`steerlens._tl.is_fast_block`)."""
    return _tl.is_fast_block(model, layer, n_pos)


#: the models inside a :func:`shared_block_weights` block, by id: (how many blocks are open,
#: the weights laid out so far by (layer, dtype))
_SHARED: dict[int, tuple[int, dict[tuple[int, torch.dtype], LaidOut]]] = {}


@contextmanager
def shared_block_weights(model: HookedTransformer) -> Iterator[None]:
    """Inside the block, every :class:`FastBlock` of ``model`` reads one copy of each (layer,
    dtype)'s laid-out weights (:func:`block_weights`) instead of laying them out for itself: a
    batch of prompts (each prompt's path and the stacked blocks) holds one copy, not one a
    prompt. The copies are dropped when the outermost block ends. The model's weights must not
    change inside the block (nothing in steerlens changes them; an edit made there is not seen
    until the block ends)."""
    key = id(model)
    depth, entries = _SHARED.get(key, (0, {}))
    _SHARED[key] = (depth + 1, entries)
    try:
        yield
    finally:
        depth, entries = _SHARED[key]
        if depth == 1:
            del _SHARED[key]
        else:
            _SHARED[key] = (depth - 1, entries)


class LaidOut(NamedTuple):
    """One block's weights as :class:`FastBlock` reads them: the query, key and value weights
    ``[d_model, heads · d_head]`` and biases flat, ``w_o`` ``[head, d_head, d_model]``, the MLP's
    as stored (``w_gate`` None for a plain MLP)."""

    w_q: Tensor
    b_q: Tensor
    w_k: Tensor
    b_k: Tensor
    w_v: Tensor
    b_v: Tensor
    w_o: Tensor
    b_o: Tensor
    w_in: Tensor
    b_in: Tensor
    w_gate: Tensor | None
    w_out: Tensor
    b_out: Tensor


def block_weights(model: HookedTransformer, layer: int, dtype: torch.dtype) -> LaidOut:
    """Block ``layer``'s weights as :class:`FastBlock` reads them, in ``dtype``
    (:class:`LaidOut`): laid out afresh, or inside :func:`shared_block_weights` once for the
    block's duration."""
    scope = _SHARED.get(id(model))
    if scope is not None and (layer, dtype) in scope[1]:
        return scope[1][(layer, dtype)]
    attn = _tl.attention_weights(model, layer)
    mlp = _tl.mlp_weights(model, layer)
    sources = (attn.w_o, attn.b_o, mlp.w_in, mlp.b_in, mlp.w_gate, mlp.w_out, mlp.b_out)
    d = model.cfg.d_model

    def flat(t: Tensor) -> Tensor:  # [heads, d_model, d_head] -> [d_model, heads · d_head]
        return t.detach().permute(1, 0, 2).reshape(d, -1).to(dtype)

    def same(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.detach().to(dtype)

    laid = LaidOut(
        flat(attn.w_q),
        attn.b_q.detach().reshape(-1).to(dtype),
        flat(attn.w_k),
        attn.b_k.detach().reshape(-1).to(dtype),
        flat(attn.w_v),
        attn.b_v.detach().reshape(-1).to(dtype),
        *(same(t) for t in sources),  # type: ignore[arg-type]
    )
    if scope is not None:
        scope[1][(layer, dtype)] = laid
    return laid


class FastBlock:
    """Block ``layer`` at the last position of a prompt, written out with the block's weights
    (:func:`block_weights`: shared with the model's other fast blocks inside
    :func:`shared_block_weights`)."""

    def __init__(
        self, model: HookedTransformer, layer: int, state: PromptState, dtype: torch.dtype
    ):
        cfg = model.cfg
        self.model, self.layer = model, layer
        self.rotary = _tl.positional_embedding(model) == "rotary"
        self.ln1, self.ln2 = _tl.block_norms(model, layer)
        #: the norms after attention and after the MLP (Gemma 2/3), or None
        self.ln1_post, self.ln2_post = _tl.block_post_norms(model, layer)
        #: the per-head query and key norms before the rotary embedding (Gemma 3), or None
        self.q_norm, self.k_norm = _tl.qk_norms(model, layer)
        self.n_heads, self.d_head = cfg.n_heads, cfg.d_head
        self.n_kv = cfg.n_key_value_heads or cfg.n_heads
        self.pos = state.n_pos - 1
        attn = _tl.attention_weights(model, layer)
        w = block_weights(model, layer, dtype)
        self.w_q, self.b_q, self.w_k, self.b_k, self.w_v, self.b_v = w[:6]
        self.w_o = w.w_o  # [head, d_head, d_model]
        self.w_o_flat = self.w_o.reshape(-1, cfg.d_model)
        self.b_o, self.w_in, self.b_in, self.w_gate = w.b_o, w.w_in, w.b_in, w.w_gate
        self.w_out, self.b_out = w.w_out, w.b_out
        self.scale = attn.scale
        past_keys, past_values = _tl.cached_keys_values(state.cache, layer)
        keys = past_keys.detach()
        if self.rotary and keys.shape[1] > 0:
            keys = _tl.rotate(model, layer, keys, 0)
        self.k_past = keys[0].permute(1, 0, 2).to(dtype).contiguous()  # [kv, pos, d_head]
        self.v_past = past_values.detach()[0].permute(1, 0, 2).to(dtype).contiguous()
        mlp = _tl.mlp_weights(model, layer)
        self.gated = mlp.gated
        self.act = mlp.act

    def _rotate(self, x: Tensor, n: int) -> Tensor:
        rows = x.shape[0]
        if not self.rotary:
            return x.view(rows, n, self.d_head)
        rotated = _tl.rotate(self.model, self.layer, x.view(rows, 1, n, self.d_head), self.pos)
        return rotated.view(rows, n, self.d_head)

    def head_norm(self, norm: Callable[[Tensor], Tensor] | None, y: Tensor) -> Tensor:
        """``y`` ``[rows, n * d_head]`` with ``norm`` (:attr:`q_norm` / :attr:`k_norm`) applied to
        each head's d_head values (unchanged where the block has no QK-norm)."""
        if norm is None:
            return y
        return norm(y.reshape(-1, self.d_head)).view(y.shape)

    def post_attention(self, a: Tensor) -> Tensor:
        """The attention output ``a`` (Σ heads' results + b_O, ``[d_model]`` or ``[rows,
        d_model]``) as ``hook_attn_out`` reads it: through :attr:`ln1_post` where there is one."""
        if self.ln1_post is None:
            return a
        return self.ln1_post(a.reshape(-1, 1, a.shape[-1])).view(a.shape)

    def _heads(self, x: Tensor) -> Tensor:
        """hook_z ``[rows, head, d_head]`` for each row of ``x`` ``[rows, d_model]`` taken on its
        own as the residual at the last position (the rows do not attend to each other)."""
        rows = x.shape[0]
        h = self.ln1(x.view(rows, 1, -1)).view(rows, -1)
        q = self._rotate(self.head_norm(self.q_norm, h @ self.w_q + self.b_q), self.n_heads)
        k = self._rotate(self.head_norm(self.k_norm, h @ self.w_k + self.b_k), self.n_kv)
        v = (h @ self.w_v + self.b_v).view(rows, self.n_kv, self.d_head)
        group = self.n_heads // self.n_kv
        qg = q.view(rows, self.n_kv, group, self.d_head)
        # rows and the group share one matmul against each cached key-value head
        past = torch.einsum("rkgd,ktd->rkgt", qg, self.k_past)
        new = torch.einsum("rkgd,rkd->rkg", qg, k).unsqueeze(-1)
        pattern = torch.softmax(torch.cat([past, new], -1) / self.scale, -1)
        n_past = self.k_past.shape[1]
        z = torch.einsum("rkgt,ktd->rkgd", pattern[..., :n_past], self.v_past)
        z = z + pattern[..., n_past:] * v.unsqueeze(2)
        return z.reshape(rows, self.n_heads, self.d_head)

    def attention_tangents(self, x: Tensor, tangents: Tensor) -> tuple[Tensor, Tensor]:
        """Each row t of ``tangents`` ``[rows, d_model]`` pushed forward through the attention
        half at ``x``: ``(J_A t at hook_attn_out [rows, d_model], (∂z/∂x) t [rows, head,
        d_head])``. The attention is linearised by hand (rotary is linear, the softmax's
        derivative is p ⊙ (ṡ − ⟨p, ṡ⟩)), so the primal runs once and the rows meet each cached
        key-value head in one matmul. The norms (ln1, QK-norm, ln1_post) take one
        ``torch.func.jvp`` over all rows."""
        rows, n_past, group = tangents.shape[0], self.k_past.shape[1], self.n_heads // self.n_kv
        h, t_h = _rows_jvp(lambda y: self.ln1(y.view(rows, 1, -1)).view(rows, -1), x, tangents)
        q_raw, t_q = h @ self.w_q + self.b_q, t_h @ self.w_q
        k_raw, t_k = h @ self.w_k + self.b_k, t_h @ self.w_k
        if self.q_norm is not None:
            q_raw, t_q = _rows_jvp(lambda y: self.head_norm(self.q_norm, y), q_raw[0], t_q)
        if self.k_norm is not None:
            k_raw, t_k = _rows_jvp(lambda y: self.head_norm(self.k_norm, y), k_raw[0], t_k)
        q = self._rotate(q_raw, self.n_heads)[0]
        k = self._rotate(k_raw, self.n_kv)[0]
        v = (h @ self.w_v + self.b_v).view(self.n_kv, self.d_head)
        t_q = self._rotate(t_q, self.n_heads).view(rows, self.n_kv, group, -1)
        t_k = self._rotate(t_k, self.n_kv)
        t_v = (t_h @ self.w_v).view(rows, self.n_kv, self.d_head)
        qg = q.view(self.n_kv, group, self.d_head)
        past = torch.einsum("kgd,ktd->kgt", qg, self.k_past)
        new = torch.einsum("kgd,kd->kg", qg, k).unsqueeze(-1)
        pattern = torch.softmax(torch.cat([past, new], -1) / self.scale, -1)
        t_past = torch.einsum("rkgd,ktd->rkgt", t_q, self.k_past)
        t_new = torch.einsum("rkgd,kd->rkg", t_q, k) + torch.einsum("kgd,rkd->rkg", qg, t_k)
        t_scores = torch.cat([t_past, t_new.unsqueeze(-1)], -1) / self.scale
        t_pattern = pattern * (t_scores - (pattern * t_scores).sum(-1, keepdim=True))
        t_z = torch.einsum("rkgt,ktd->rkgd", t_pattern[..., :n_past], self.v_past)
        t_z = (
            t_z
            + t_pattern[..., n_past:] * v.unsqueeze(1)
            + pattern[..., n_past:] * t_v.unsqueeze(2)
        )
        t_z = t_z.reshape(rows, self.n_heads, self.d_head)
        t_attn = t_z.flatten(1) @ self.w_o_flat
        if self.ln1_post is not None:
            z = torch.einsum("kgt,ktd->kgd", pattern[..., :n_past], self.v_past)
            z = z + pattern[..., n_past:] * v.unsqueeze(1)
            a = z.reshape(-1) @ self.w_o_flat + self.b_o
            t_attn = _rows_jvp(self.post_attention, a, t_attn)[1]
        return t_attn, t_z

    def pullback(
        self, x: Tensor, rows: Tensor, kinds: Sequence[str] = (), *, contract: bool | None = None
    ) -> dict[str, Tensor]:
        """Each row g of ``rows`` ``[rows, d_model]`` (a cotangent at the block output) pulled
        back through the block at ``x`` by the hand-written reverse pass
        (:func:`~steerlens.metric.reverse.block_pullback`): ``{"resid_pre": g ∂out/∂x, kind:
        g ∂out/∂h_kind for each of kinds}``, the rows a vmapped ``torch.func.vjp`` of the block
        gives. ``contract`` chooses whether weight products are formed once (None: by FLOPs)."""
        return block_pullback(self, x, rows, kinds, contract=contract)

    def __call__(
        self,
        x: Tensor,
        deltas: dict[str, Tensor],
        capture: Sequence[str],
        captured_only: bool = False,
    ) -> tuple[Tensor, ...]:
        z = self._heads(x.view(1, -1))[0]
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
        attn_out = self.post_attention(attn_out)
        if "attn_out" in deltas:
            attn_out = attn_out + deltas["attn_out"]
        values["attn_out"] = attn_out
        if captured_only:
            return tuple(values[c] for c in capture)
        mid = x + attn_out
        if "resid_mid" in deltas:
            mid = mid + deltas["resid_mid"]
        return (mid + self.mlp(mid, deltas), *[values[c] for c in capture])

    def mlp(
        self, mid: Tensor, deltas: Mapping[str, Tensor] | None = None, *, post_norm: bool = True
    ) -> Tensor:
        """The MLP half's output ``hook_mlp_out`` at ``mid`` (``hook_resid_mid``: one residual
        ``[d_model]`` or rows of them ``[rows, d_model]``), with ``deltas`` added at
        ``mlp_pre``, ``mlp_post`` and ``mlp_out``. Where the block has :attr:`ln2_post` the output
        goes through it (``post_norm=False``: the output before it)."""
        deltas = deltas or {}
        h2 = self.ln2(mid.reshape(-1, 1, mid.shape[-1])).view(mid.shape)
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
        if self.ln2_post is not None and post_norm:
            mlp_out = self.ln2_post(mlp_out.reshape(-1, 1, mlp_out.shape[-1])).view(mlp_out.shape)
        if "mlp_out" in deltas:
            mlp_out = mlp_out + deltas["mlp_out"]
        return mlp_out


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
    captured_only: bool = False,
) -> Iterator[BlockFn]:
    """Yield ``fn(x, *deltas) -> (resid_post, *captured)`` for block ``layer`` at the last
    position (``captured_only``: ``captured`` alone). ``fast=None`` picks :class:`FastBlock`
    where it is exact."""
    use_fast = fast_supported(model, layer, state.n_pos) if fast is None else fast
    if use_fast:
        impl = FastBlock(model, layer, state, dtype)

        def fast_fn(x: Tensor, *deltas: Tensor) -> tuple[Tensor, ...]:
            return impl(x, dict(zip(delta_kinds, deltas, strict=True)), capture, captured_only)

        yield fast_fn
        return
    yield from _hooked_block(model, layer, state, delta_kinds, capture, captured_only)


def attention_pushforward(
    model: HookedTransformer,
    layer: int,
    state: PromptState,
    tangents: Float[Tensor, "n_rows d_model"],
    *,
    fast: bool | None = None,
) -> tuple[Float[Tensor, "n_rows d_model"], Float[Tensor, "n_rows n_heads d_head"]]:
    """Each row t of ``tangents`` pushed forward through block ``layer``'s attention half at the
    clean residual: ``(J_A t at hook_attn_out, (∂z/∂x) t at hook_z)``, by forward mode.

    The fast map linearises its attention by hand (:meth:`FastBlock.attention_tangents`); the
    hooked map vmaps a ``torch.func.jvp`` of TransformerLens's block (run whole) over the rows."""
    load_forward_ad()
    dtype = tangents.dtype
    x = state.resid[layer].to(dtype)
    use_fast = fast_supported(model, layer, state.n_pos) if fast is None else fast
    if use_fast:
        return FastBlock(model, layer, state, dtype).attention_tangents(x, tangents)
    capture = ("attn_out", "z")
    with block_map(
        model, layer, state, (), capture, dtype=dtype, fast=False, captured_only=True
    ) as fn:

        def push(tangent: Tensor) -> tuple[Tensor, ...]:
            return torch.func.jvp(fn, (x,), (tangent,))[1]

        t_attn, t_z = torch.vmap(push)(tangents)
    return t_attn, t_z


def _rows_jvp(fn: Callable[[Tensor], Tensor], x: Tensor, tangents: Tensor) -> tuple[Tensor, Tensor]:
    """``fn`` (a function of rows, each on its own) at the single point ``x`` ``[m]`` and its
    Jacobian there applied to each row of ``tangents`` ``[rows, m]``: ``(fn(x) [1, m'],
    tangents' images [rows, m'])``, by one ``torch.func.jvp`` over the rows."""
    rows = tangents.shape[0]
    primal = x.reshape(1, -1).expand(rows, -1).contiguous()  # jvp refuses overlapping rows
    value, t_value = torch.func.jvp(fn, (primal,), (tangents,))[:2]
    return value[:1], t_value


def _hooked_block(
    model: HookedTransformer,
    layer: int,
    state: PromptState,
    delta_kinds: Sequence[str],
    capture: Sequence[str],
    captured_only: bool,
) -> Iterator[BlockFn]:
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
        out = _tl.block_forward_cached(model, layer, x.view(1, 1, -1), state.cache).view(-1)
        values = tuple(captured[k] for k in capture)
        return values if captured_only else (out, *values)

    need_result = "result" in delta_kinds or "result" in capture
    with hooked(model, hooks, need_result=need_result):  # type: ignore[arg-type]
        yield fn
