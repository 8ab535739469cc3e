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

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from steerlens.hooks import hooked
from steerlens.metric.state import PromptState
from steerlens.sites import HOOKS

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

#: kinds whose rows come from a zero perturbation at their hook (resid_pre is the block input)
_DELTA_KINDS = ("resid_mid", "attn_out", "mlp_out", "z", "result", "mlp_pre", "mlp_post")


@dataclass
class BlockPullback:
    """Factor rows at the sites of one block, keyed by kind; per-head kinds keep a head axis."""

    rows: dict[str, Tensor]
    shares: dict[str, float] = field(default_factory=dict)
    head_shares: list[float] = field(default_factory=list)


def _block_fn(
    model: HookedTransformer, layer: int, state: PromptState, names: list[str]
) -> tuple[Callable[..., Tensor], list[tuple[str, Callable]]]:
    """The single-position map of block ``layer``: (x, *perturbations at ``names``) -> output.
    Returns the function and the hooks it needs attached."""
    block = model.blocks[layer]
    entry = state.cache[layer]
    holder: dict[str, Tensor] = {}

    def make_hook(name: str) -> Callable:
        def hook(act: Tensor, hook: object) -> Tensor:
            return act + holder[name].view(act.shape)

        return hook

    def fn(x: Tensor, *deltas: Tensor) -> Tensor:
        holder.update(zip(names, deltas, strict=True))
        return block(x.view(1, 1, -1), past_kv_cache_entry=entry).view(-1)

    return fn, [(n, make_hook(n)) for n in names]


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
) -> BlockPullback:
    """Factor rows at ``kinds`` of block ``layer`` (always including ``resid_pre`` and
    ``resid_post``) from the rows ``b_post`` at its output."""
    need = set(kinds) & set(_DELTA_KINDS)
    if decompose:
        need |= {"resid_mid", "result"}
    delta_kinds = [k for k in _DELTA_KINDS if k in need]
    names = [f"blocks.{layer}.{HOOKS[k]}" for k in delta_kinds]
    x = state.resid[layer].to(b_post.dtype)
    fn, hooks = _block_fn(model, layer, state, names)
    zeros = [_zeros_for(model, k, x) for k in delta_kinds]
    with hooked(model, hooks, need_result="result" in need):  # type: ignore[arg-type]
        _, vjp_fn = torch.func.vjp(fn, x, *zeros)
        grads = torch.vmap(vjp_fn)(b_post)
    rows = {"resid_pre": grads[0], "resid_post": b_post}
    rows.update(zip(delta_kinds, grads[1:], strict=True))
    out = BlockPullback(rows)
    if decompose:
        _decompose(model, state, layer, out)
    return out


@functools.cache
def _load_forward_ad() -> None:
    """Load torch's forward-mode decompositions once, silencing the ``torch.jit.script``
    deprecation warning that torch 2.13 itself raises while loading them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=DeprecationWarning)
        torch.autograd.forward_ad._maybe_load_decompositions()


def _decompose(model: HookedTransformer, state: PromptState, layer: int, out: BlockPullback) -> None:
    """Exact shares of ‖B_pre‖²_F by path and by head, from one batched forward-mode pass."""
    b_pre, b_post, b_mid = out.rows["resid_pre"], out.rows["resid_post"], out.rows["resid_mid"]
    block = model.blocks[layer]
    entry = state.cache[layer]
    captured: dict[str, Tensor] = {}
    attn_name = f"blocks.{layer}.hook_attn_out"
    result_name = f"blocks.{layer}.attn.hook_result"

    def capture(act: Tensor, hook: object) -> None:
        captured[hook.name] = act  # type: ignore[attr-defined]

    def fn(x: Tensor) -> tuple[Tensor, Tensor]:
        block(x.view(1, 1, -1), past_kv_cache_entry=entry)
        return captured[attn_name][0, 0], captured[result_name][0, 0]

    x = state.resid[layer].to(b_pre.dtype)
    _load_forward_ad()
    with hooked(model, [(attn_name, capture), (result_name, capture)], need_result=True):
        d_attn, d_result = torch.vmap(lambda t: torch.func.jvp(fn, (x,), (t,))[1])(b_pre)
    total = b_pre.pow(2).sum()
    b_mlp = b_mid - b_post
    shares = {
        "skip": (b_post * b_pre).sum(),
        "mlp": (b_mlp * b_pre).sum(),
        "attn": (b_post * d_attn).sum(),
        "attn_mlp": (b_mlp * d_attn).sum(),
    }
    out.shares = {k: float(v / total) for k, v in shares.items()}
    b_result = out.rows["result"]  # [rows, head, d_model]
    out.head_shares = ((b_result * d_result).sum((0, 2)) / total).tolist()
