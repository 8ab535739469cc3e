"""The fast block map's reverse-mode pass: many factor rows pulled back through one block by hand.

:func:`block_pullback` gives the rows a vmapped ``torch.func.vjp`` of
:class:`~steerlens.metric.blockmap.FastBlock` gives, at ``hook_resid_pre`` and at every kind the
recursive sweep asks for, with the primal run once. Past the primal the pass is linear in the
rows, so a product of weights that does not depend on the rows can be formed once per call and
met by all rows in one matmul. Which products pay is a matter of shapes (n_rows R, d_model d,
d_mlp, prompt length T, heads h, key-value heads kv, d_head):

- MLP: ∂post/∂h2 is one [d_mlp, d] matrix M (gated: diag(act'(pre) ⊙ u) W_gateᵀ + diag(act(pre))
  W_inᵀ), so the rows take one matmul through it instead of two. With no ``mlp_pre`` /
  ``mlp_post`` rows wanted and R > d·d_mlp / (2·d_mlp − d), the rows skip ``hook_post`` and go
  through K = W_outᵀ M [d, d] formed once.
- Attention: the rows meet the softmax's inputs only through the attention pattern (h·(T+1)
  scores) and the new value (kv·d_head), so where that is fewer columns than hook_z's h·d_head
  (a short prompt) and no ``z`` rows are wanted, W_O is contracted once with the values and the
  keys with W_Q; the new key's rows always take h columns through the rotated queries and W_K.

LayerNorm and RMSNorm are transposed by hand (a rank-one or rank-two update of the weighted rows),
and so are the per-head QK-norms (Gemma 3) and the norms after attention and after the MLP
(Gemma 2/3), each at its own primal; another norm, and the rotary embedding, by one
``torch.func.vjp`` over all rows (each row is normalised, and rotated, on its own); the
activation by one vjp of the single pre-activation vector, so every elementwise activation
TransformerLens builds is exact. The softmax's transpose is g_s = p ⊙ (g_p − ⟨p, g_p⟩).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from steerlens import _tl

if TYPE_CHECKING:
    from steerlens.metric.blockmap import FastBlock


@dataclass(frozen=True)
class _Primal:
    """The block's forward values at x that the reverse pass reads: the rotated query
    [kv, group, d_head], the rotated keys and the values of every position [kv, T+1, d_head],
    the attention pattern [kv, group, T+1], the residual mid and ln2's output; where the block
    has them, the query and the new key before their QK-norms ([head, d_head], [kv, d_head]),
    the attention output before ln1_post and the MLP output before ln2_post ([d_model])."""

    q: Tensor
    keys: Tensor
    values: Tensor
    pattern: Tensor
    mid: Tensor
    h2: Tensor
    q_raw: Tensor | None = None
    k_raw: Tensor | None = None
    attn_raw: Tensor | None = None
    mlp_raw: Tensor | None = None


def _primal(b: FastBlock, x: Tensor) -> _Primal:
    group = b.n_heads // b.n_kv
    h = b.ln1(x.view(1, 1, -1)).view(1, -1)
    q_raw, k_raw = h @ b.w_q + b.b_q, h @ b.w_k + b.b_k
    q = b._rotate(b.head_norm(b.q_norm, q_raw), b.n_heads)[0].view(b.n_kv, group, b.d_head)
    k = b._rotate(b.head_norm(b.k_norm, k_raw), b.n_kv)[0]
    v = (h @ b.w_v + b.b_v).view(b.n_kv, b.d_head)
    keys = torch.cat([b.k_past, k.unsqueeze(1)], 1)
    values = torch.cat([b.v_past, v.unsqueeze(1)], 1)
    pattern = torch.softmax(torch.einsum("kgd,ktd->kgt", q, keys) / b.scale, -1)
    z = torch.einsum("kgt,ktd->kgd", pattern, values)
    attn_raw = z.reshape(-1) @ b.w_o_flat + b.b_o
    mid = x + b.post_attention(attn_raw)
    h2 = b.ln2(mid.view(1, 1, -1)).view(-1)
    post = b.ln2_post is not None
    return _Primal(
        q,
        keys,
        values,
        pattern,
        mid,
        h2,
        q_raw.view(b.n_heads, b.d_head) if b.q_norm is not None else None,
        k_raw.view(b.n_kv, b.d_head) if b.k_norm is not None else None,
        attn_raw if b.ln1_post is not None else None,
        b.mlp(mid, post_norm=False) if post else None,  # ln2_post's input: the MLP half without it
    )


@torch.no_grad()  # no graph w.r.t. the weights; the norms' torch.func.vjp still runs
def block_pullback(
    b: FastBlock,
    x: Tensor,
    rows: Tensor,
    kinds: Sequence[str] = (),
    *,
    contract: bool | None = None,
) -> dict[str, Tensor]:
    """Each row g of ``rows`` ``[rows, d_model]`` (a cotangent at the output of block ``b``)
    pulled back through it at ``x``: ``{"resid_pre": g ∂out/∂x, kind: g ∂out/∂h_kind for each
    of kinds}``, per-head kinds with a head axis. ``contract``: form the weight products of
    the module docstring where they are fewer FLOPs (None), wherever the kinds allow (True),
    never (False)."""
    n_rows = rows.shape[0]
    p = _primal(b, x)
    g_mlp = rows if p.mlp_raw is None else _module_vjp(b.ln2_post, p.mlp_raw, rows)
    g_h2, mlp_rows = _mlp_rows(b, p.h2, g_mlp, kinds, contract)
    g_mid = rows + _norm_vjp(b, b.ln2, p.mid, g_h2)
    g_attn = g_mid if p.attn_raw is None else _module_vjp(b.ln1_post, p.attn_raw, g_mid)
    g_h, g_z = _attention_rows(b, p, g_attn, kinds, contract)
    out = {"resid_pre": g_mid + _norm_vjp(b, b.ln1, x, g_h), "resid_mid": g_mid}
    out |= {"attn_out": g_mid, "mlp_out": rows, **mlp_rows}
    if g_z is not None:
        out["z"] = g_z.reshape(n_rows, b.n_heads, b.d_head)
    if "result" in kinds:
        out["result"] = g_attn.unsqueeze(1).expand(-1, b.n_heads, -1).contiguous()
    return {kind: out[kind] for kind in ("resid_pre", *kinds)}


def _mlp_rows(
    b: FastBlock, h2: Tensor, rows: Tensor, kinds: Sequence[str], contract: bool | None
) -> tuple[Tensor, dict[str, Tensor]]:
    """The rows at ln2's output, and at ``mlp_post`` / ``mlp_pre`` where asked for, from
    ``rows`` at the MLP's output (before ln2_post, where there is one)."""
    if b.gated:
        assert b.w_gate is not None
        act, d_act = _act_and_derivative(b.act, h2 @ b.w_gate)
        d_pre = d_act * (h2 @ b.w_in)  # ∂post/∂pre
        m_t = torch.addcmul(b.w_in * act, b.w_gate, d_pre)  # (∂post/∂h2)ᵀ [d_model, d_mlp]
    else:
        d_pre = _act_and_derivative(b.act, h2 @ b.w_in + b.b_in)[1]
        m_t = b.w_in * d_pre
    wanted = {"mlp_pre", "mlp_post"} & set(kinds)
    (n_rows, d), d_mlp = rows.shape, m_t.shape[1]
    cheaper = d * d_mlp * d + n_rows * d * d < 2 * n_rows * d * d_mlp
    if not wanted and (cheaper if contract is None else contract):
        return rows @ (m_t @ b.w_out).T, {}
    g_post = rows @ b.w_out.T
    return g_post @ m_t.T, {"mlp_post": g_post, "mlp_pre": g_post * d_pre}


def _attention_rows(
    b: FastBlock, p: _Primal, g_mid: Tensor, kinds: Sequence[str], contract: bool | None
) -> tuple[Tensor, Tensor | None]:
    """The rows at ln1's output, and at ``hook_z`` [rows, kv, group, d_head] where they were
    formed (None where the contracted route skipped them), from ``g_mid`` at the attention
    output (Σ heads' results + b_O, before ln1_post where there is one)."""
    n_rows, d = g_mid.shape
    n_kv, group, d_head = p.q.shape
    n_pos, n_heads = p.keys.shape[1], b.n_heads
    # multiply-adds of the two routes where they differ (hook_z, the scores, W_Q)
    plain = 2 * n_rows * n_heads * d_head * (d + n_pos)
    contracted = 2 * d * n_heads * n_pos * d_head + n_rows * d * (
        2 * n_heads * n_pos + n_kv * d_head
    )
    cheaper = contracted < plain
    g_z = None
    if "z" not in kinds and (cheaper if contract is None else contract):
        # W_O met with every position's value, and with the new value weighted by its pattern
        per_head = p.values.unsqueeze(1).expand(-1, group, -1, -1).reshape(n_heads, n_pos, -1)
        c = torch.bmm(per_head, b.w_o).view(-1, d)
        new_value = p.pattern[..., -1].unsqueeze(1)
        u = torch.bmm(new_value, b.w_o.view(n_kv, group, -1)).view(-1, d)
        both = g_mid @ torch.cat([c, u]).T
        g_pattern = both[:, : c.shape[0]].view(n_rows, n_kv, group, n_pos)
        g_v = both[:, c.shape[0] :]
    else:
        g_z = (g_mid @ b.w_o_flat.T).view(n_rows, n_kv, group, d_head)
        g_pattern = torch.einsum("rkgd,ktd->rkgt", g_z, p.values)
        g_v = torch.einsum("kg,rkgd->rkd", p.pattern[..., -1], g_z).reshape(n_rows, -1)
    g_s = p.pattern * (g_pattern - (g_pattern * p.pattern).sum(-1, keepdim=True)) / b.scale
    g_new = g_s[..., -1].reshape(n_rows, n_heads)
    q_t = _rotate_transpose(b, p.q.reshape(1, -1), n_heads).view(n_kv, group, d_head)
    if p.k_raw is not None:  # each head's key cotangent back through the k_norm of its kv head
        q_t = _module_vjp(b.k_norm, p.k_raw, q_t.transpose(0, 1)).transpose(0, 1)
    from_key = torch.bmm(q_t, b.w_k.view(d, n_kv, d_head).permute(1, 2, 0)).view(n_heads, d)
    if g_z is None:
        # each position's key, rotated back as the query was, through W_Q
        keys = p.keys.unsqueeze(1).expand(-1, group, -1, -1).permute(2, 0, 1, 3)
        keys_t = _rotate_transpose(b, keys.reshape(n_pos, -1), n_heads)
        keys_t = keys_t.view(n_pos, n_heads, d_head)
        if p.q_raw is not None:
            keys_t = _module_vjp(b.q_norm, p.q_raw, keys_t)
        keys_t = keys_t.transpose(0, 1)
        w_q = b.w_q.view(d, n_heads, d_head).permute(1, 2, 0)
        from_query = torch.bmm(keys_t, w_q).view(-1, d)
        left = torch.cat([g_s.reshape(n_rows, -1), g_new, g_v], 1)
        return left @ torch.cat([from_query, from_key, b.w_v.T]), None
    g_q = torch.einsum("rkgt,ktd->rkgd", g_s, p.keys).reshape(n_rows, -1)
    g_q = _rotate_transpose(b, g_q, n_heads)
    if p.q_raw is not None:
        g_q = _module_vjp(b.q_norm, p.q_raw, g_q.view(n_rows, n_heads, d_head)).view(n_rows, -1)
    g_h = g_q @ b.w_q.T + g_v @ b.w_v.T
    return g_h + g_new @ from_key, g_z


def _rotate_transpose(b: FastBlock, g: Tensor, n: int) -> Tensor:
    """``g`` ``[rows, n * d_head]`` through the transpose of the block's rotary embedding at
    the last position (linear, the same for every head)."""
    if not b.rotary:
        return g
    vjp_fn = torch.func.vjp(lambda y: b._rotate(y, n), torch.zeros_like(g))[1]
    return vjp_fn(g.view(g.shape[0], n, b.d_head))[0].reshape(g.shape)


#: TransformerLens's norms (``cfg.normalization_type``) whose transpose is written out: each maps
#: x to w ⊙ n / s (+ b) with n the centred (LN) or plain (RMS) x and s its root mean square
_WRITTEN_NORMS = {"LN": (True, True), "LNPre": (True, False), "RMS": (False, True)}
_WRITTEN_NORMS["RMSPre"] = (False, False)


def _norm_vjp(b: FastBlock, norm: Callable[[Tensor], Tensor], x: Tensor, rows: Tensor) -> Tensor:
    """``rows`` ``[rows, d_model]`` pulled back through the block's ``norm`` at ``x``. A
    LayerNorm or RMSNorm (with or without its weight) by its transpose written out, a rank-one
    or rank-two update of the weighted rows: with a = g ⊙ w / s, RMS gives a − ⟨a, n⟩/d · n and
    LN that with the mean over d_model removed. Any other norm by one vjp over all rows."""
    written = _WRITTEN_NORMS.get(str(b.model.cfg.normalization_type))
    if written is None:
        n_rows = rows.shape[0]
        vjp_fn = torch.func.vjp(norm, x.view(1, 1, -1).expand(n_rows, 1, -1))[1]
        return vjp_fn(rows.view(n_rows, 1, -1))[0].view(n_rows, -1)
    centred, weighted = written
    module: Any = norm  # a TransformerLens norm: eps, and its weight w where weighted
    x = x.to(rows.dtype)
    d = x.shape[0]
    if centred:
        x = x - x.mean()
    s = (x.pow(2).mean() + module.eps).sqrt()
    n = x / s
    scale = module.w.to(rows.dtype) / s if weighted else 1 / s
    a = rows * scale
    basis = torch.stack([n, torch.ones_like(n)]) if centred else n.unsqueeze(0)
    coef = a @ (basis.T / d)  # ⟨a, n⟩/d, and mean(a) where centred (n is centred too)
    return torch.addmm(a, coef, basis, alpha=-1)


def _module_vjp(norm: Any, x: Tensor, rows: Tensor) -> Tensor:
    """``rows`` ``[rows, *x.shape]`` pulled back through the norm module ``norm`` at each of
    ``x``'s vectors on its own (``x`` ``[d]`` or ``[heads, d]``, normalised over its last axis):
    by the transpose written out where ``norm`` is a TransformerLens LayerNorm / RMSNorm
    (:func:`steerlens._tl.norm_form`), by one vjp over all rows otherwise."""
    form = _tl.norm_form(norm)
    if form is None:
        n_rows = rows.shape[0]
        flat = x.reshape(1, -1, x.shape[-1]).expand(n_rows, -1, -1)
        vjp_fn = torch.func.vjp(norm, flat)[1]
        return vjp_fn(rows.reshape(flat.shape))[0].view(rows.shape)
    centred, weighted = form
    x = x.to(rows.dtype)
    d = x.shape[-1]
    if centred:
        x = x - x.mean(-1, keepdim=True)
    s = (x.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()
    n = x / s
    a = rows * (norm.w.to(rows.dtype) / s if weighted else 1 / s)
    out = a - (a * n).sum(-1, keepdim=True) / d * n
    return out - a.mean(-1, keepdim=True) if centred else out


def _act_and_derivative(act: Callable[[Tensor], Tensor], pre: Tensor) -> tuple[Tensor, Tensor]:
    """An elementwise activation and its derivative at ``pre`` (its Jacobian's diagonal)."""
    value, vjp_fn = torch.func.vjp(act, pre)[:2]
    return value, vjp_fn(torch.ones_like(value))[0]
