"""The recursive layer-wise pullback: factor rows pushed back one block at a time.

At the last position T, block l maps the residual x entering it to the residual leaving it with
every earlier position held at its clean value (a frozen key-value cache). With B_post the factor
at the block's output, one ``torch.func.vjp`` of that single-position map, vmapped over the rows of
B_post, gives the factor at every site inside the block at once: zero perturbations are added at
each requested hook (``hook_resid_mid``, ``attn.hook_z``, ``mlp.hook_pre``...) and their
cotangents are the rows B_s = B_post ∂(block output)/∂h_s. The rows at ``hook_resid_pre`` feed the
next block down, so all sites of all layers cost one batched backward pass.

The block decomposition splits ‖B_pre‖²_F = ⟨B_pre, B_pre⟩ exactly into the skip path ⟨B_post,
B_pre⟩, the MLP path ⟨B_mid − B_post, B_pre⟩, attention ⟨B_post, J_A B_pre⟩ and attention-then-MLP
⟨B_mid − B_post, J_A B_pre⟩, with attention further split per head; J_A B_pre comes from one
forward-mode pass (``torch.func.jvp``) over the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from steerlens.metric.autodiff import pullback_rows
from steerlens.metric.blockmap import block_map
from steerlens.metric.state import PromptState

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer

#: kinds whose rows come from a zero perturbation at their hook (resid_pre is the block input)
_DELTA_KINDS = ("resid_mid", "attn_out", "mlp_out", "z", "result", "mlp_pre", "mlp_post")


@dataclass
class BlockPullback:
    """Factor rows at the sites of one block, keyed by kind; per-head kinds keep a head axis."""

    rows: dict[str, Tensor]
    shares: dict[str, float] = field(default_factory=dict)
    head_shares: list[float] = field(default_factory=list)


def _zeros_for(model: HookedTransformer, kind: str, like: Tensor) -> Tensor:
    cfg = model.cfg
    shape = {
        "z": (cfg.n_heads, cfg.d_head),
        "result": (cfg.n_heads, cfg.d_model),
        "mlp_pre": (cfg.d_mlp,),
        "mlp_post": (cfg.d_mlp,),
    }.get(kind, (cfg.d_model,))
    return torch.zeros(shape, dtype=like.dtype, device=like.device)


@torch.no_grad()  # no graph w.r.t. the weights; torch.func still differentiates
def pull_block(
    model: HookedTransformer,
    state: PromptState,
    layer: int,
    b_post: Float[Tensor, "n_rows d_model"],
    kinds: set[str],
    *,
    decompose: bool = False,
    fast: bool | None = None,
) -> BlockPullback:
    """Factor rows at ``kinds`` of block ``layer`` (always including ``resid_pre`` and
    ``resid_post``) from the rows ``b_post`` at its output."""
    need = set(kinds) & set(_DELTA_KINDS)
    if decompose:
        need |= {"resid_mid", "z"}
    delta_kinds = [k for k in _DELTA_KINDS if k in need]
    x = state.resid[layer].to(b_post.dtype)
    zeros = [_zeros_for(model, k, x) for k in delta_kinds]
    with block_map(model, layer, state, delta_kinds, dtype=x.dtype, fast=fast) as fn:
        grads = pullback_rows(lambda x, *d: fn(x, *d)[0], (x, *zeros), b_post)
    rows = {"resid_pre": grads[0], "resid_post": b_post}
    rows.update(zip(delta_kinds, grads[1:], strict=True))
    out = BlockPullback(rows)
    if decompose:
        _decompose(model, state, layer, out, fast)
    return out


def _decompose(
    model: HookedTransformer, state: PromptState, layer: int, out: BlockPullback, fast: bool | None
) -> None:
    """Exact shares of ‖B_pre‖²_F by path and by head, from one batched VJP through the
    attention half of the block: cotangent B_post at ``hook_attn_out`` gives the direct attention
    path B_post J_A; cotangent B_z restricted to head h at ``hook_z`` gives head h's path."""
    b_pre, b_post, b_mid = out.rows["resid_pre"], out.rows["resid_post"], out.rows["resid_mid"]
    b_z = out.rows["z"]  # [rows, head, d_head]
    x = state.resid[layer].to(b_pre.dtype)
    n_rows, n_heads = b_z.shape[0], b_z.shape[1]
    eye = torch.eye(n_heads, dtype=b_z.dtype, device=b_z.device)
    per_head = (b_z.unsqueeze(0) * eye.view(n_heads, 1, n_heads, 1)).flatten(0, 1)
    cot_attn = torch.cat([b_post, torch.zeros_like(b_post).repeat(n_heads, 1)])
    cot_z = torch.cat([torch.zeros_like(b_z), per_head])
    with block_map(model, layer, state, (), ("attn_out", "z"), dtype=x.dtype, fast=fast) as fn:
        grads = pullback_rows(lambda y: fn(y)[1:], (x,), (cot_attn, cot_z))[0]
    direct = grads[:n_rows]
    heads = grads[n_rows:].view(n_heads, n_rows, -1)
    total = b_pre.pow(2).sum()
    attn = (direct * b_pre).sum()
    shares = {
        "skip": (b_post * b_pre).sum(),
        "mlp": ((b_mid - b_post) * b_pre).sum(),
        "attn": attn,
        "attn_mlp": ((b_pre - b_mid) * b_pre).sum() - attn,
    }
    out.shares = {k: float(v / total) for k, v in shares.items()}
    out.head_shares = ((heads * b_pre.unsqueeze(0)).sum((1, 2)) / total).tolist()
