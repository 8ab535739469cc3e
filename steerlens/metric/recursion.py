"""The recursive layer-wise pullback: factor rows pushed back one block at a time.

At the last position T, block l maps the residual x entering it to the residual leaving it with
every earlier position held at its clean value (a frozen key-value cache). With B_post the factor
at the block's output, one ``torch.func.vjp`` of that single-position map, vmapped over the rows of
B_post, gives the factor at every site inside the block at once: zero perturbations are added at
each requested hook (``hook_resid_mid``, ``attn.hook_z``, ``mlp.hook_pre``...) and their
cotangents are the rows B_s = B_post ∂(block output)/∂h_s. The rows at ``hook_resid_pre`` feed the
next block down, so all sites of all layers cost one batched backward pass. On the fast block
map the same rows come from its hand-written reverse pass
(:mod:`steerlens.metric.reverse`: the primal once, weight products formed once where that saves
FLOPs); the vmapped vjp stays for the hooked map and as the reference.

The block decomposition splits ‖B_pre‖²_F = ⟨B_pre, B_pre⟩ exactly into the skip path ⟨B_post,
B_pre⟩, the MLP path ⟨B_mid − B_post, B_pre⟩, attention ⟨B_post, J_A B_pre⟩ and attention-then-MLP
⟨B_mid − B_post, J_A B_pre⟩ (the remainder ⟨B_pre − B_mid, B_pre⟩ − attention), with the two
attention paths together split per head: head h carries Σ_r ⟨B_z[r, h], (∂z_h/∂x) B_pre[r]⟩, where
B_z are the rows at ``hook_z``. One forward-mode pass with the n_rows rows of B_pre as tangents
through the attention half of the block gives J_A B_pre at ``hook_attn_out`` and every head's
(∂z_h/∂x) B_pre at ``hook_z`` at once, so the per-head split costs n_rows tangents however many
heads the block has (:func:`~steerlens.metric.blockmap.attention_pushforward`: the fast block map
linearises its attention by hand, the hooked one vmaps ``torch.func.jvp``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from steerlens.metric.autodiff import pullback_rows
from steerlens.metric.blockmap import (
    FastBlock,
    attention_pushforward,
    block_map,
    fast_supported,
)
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
    vmap: bool = False,
) -> BlockPullback:
    """Factor rows at ``kinds`` of block ``layer`` (always including ``resid_pre`` and
    ``resid_post``) from the rows ``b_post`` at its output. On the fast block map the rows go
    through its hand-written reverse pass (:meth:`~.blockmap.FastBlock.pullback`); ``vmap``
    (and the hooked map always) pulls them back by a vmapped ``torch.func.vjp`` of the map."""
    need = set(kinds) & set(_DELTA_KINDS)
    if decompose:
        need |= {"resid_mid", "z"}
    delta_kinds = [k for k in _DELTA_KINDS if k in need]
    x = state.resid[layer].to(b_post.dtype)
    use_fast = fast_supported(model, layer, state.n_pos) if fast is None else fast
    if use_fast and not vmap:
        rows = FastBlock(model, layer, state, x.dtype).pullback(x, b_post, delta_kinds)
    else:
        zeros = [_zeros_for(model, k, x) for k in delta_kinds]
        with block_map(model, layer, state, delta_kinds, dtype=x.dtype, fast=use_fast) as fn:
            grads = pullback_rows(lambda x, *d: fn(x, *d)[0], (x, *zeros), b_post)
        rows = dict(zip(("resid_pre", *delta_kinds), grads, strict=True))
    rows["resid_post"] = b_post
    out = BlockPullback(rows)
    if decompose:
        _decompose(model, state, layer, out, fast)
    return out


def _decompose(
    model: HookedTransformer, state: PromptState, layer: int, out: BlockPullback, fast: bool | None
) -> None:
    """Exact shares of ‖B_pre‖²_F by path and by head. Each row of B_pre is pushed forward
    through the attention half of the block (:func:`.blockmap.attention_pushforward`) to
    its tangents at ``hook_attn_out`` (J_A B_pre) and ``hook_z``; head h's share is
    Σ_r ⟨B_z[r, h], (∂z_h/∂x) B_pre[r]⟩ and the direct attention share ⟨B_post, J_A B_pre⟩."""
    b_pre, b_post, b_mid = out.rows["resid_pre"], out.rows["resid_post"], out.rows["resid_mid"]
    b_z = out.rows["z"]  # [rows, head, d_head]
    t_attn, t_z = attention_pushforward(model, layer, state, b_pre, fast=fast)
    total = b_pre.pow(2).sum()
    attn = (b_post * t_attn).sum()
    shares = {
        "skip": (b_post * b_pre).sum(),
        "mlp": ((b_mid - b_post) * b_pre).sum(),
        "attn": attn,
        "attn_mlp": ((b_pre - b_mid) * b_pre).sum() - attn,
    }
    out.shares = {k: float(v / total) for k, v in shares.items()}
    out.head_shares = ((b_z * t_z).sum((0, 2)) / total).tolist()
