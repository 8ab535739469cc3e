"""The direct pullback: factor rows through the whole graph with one VJP per row.

Needed where the recursion is not exact: a perturbation at an earlier position, or one vector tied
across all positions (it spreads to later positions through attention). A zero perturbation is
added at the site (at one position, or the same vector at every position), the residual at the
lens layer is read at the prediction position, and the final factor rows are pulled back with
``torch.func.vjp`` vmapped over chunks of rows. Also the per-site whole-graph baseline that the
recursion is benchmarked against.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor

from steerlens.hooks import hooked
from steerlens.metric.autodiff import pullback_rows
from steerlens.sites import Site

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer


@torch.no_grad()  # no graph w.r.t. the weights; torch.func still differentiates
def direct_rows(
    model: HookedTransformer,
    tokens: Int[Tensor, " pos"],
    site: Site,
    b_lens: Float[Tensor, "n_rows d_model"],
    lens_layer: int,
    *,
    chunk: int = 64,
) -> Float[Tensor, "n_rows dim"]:
    """Rows of the factor at ``site`` from rows ``b_lens`` at the residual entering block
    ``lens_layer`` (``n_layers``: the final residual) at the last position."""
    n_pos = tokens.shape[0]
    pos = site.resolve_position(n_pos)
    shape = _site_shape(model, site)
    holder: dict[str, Tensor] = {}

    sel = torch.zeros(n_pos, dtype=b_lens.dtype, device=b_lens.device)
    sel[slice(None) if pos == "all" else pos] = 1.0

    def hook(act: Tensor, hook: object) -> Tensor:
        delta = holder["delta"]
        if site.head is None:
            add = sel.view(1, n_pos, *[1] * delta.dim()) * delta
        else:
            head = torch.zeros(act.shape[2], dtype=act.dtype, device=act.device)
            head[site.head] = 1.0
            add = sel.view(1, n_pos, 1, 1) * head.view(1, 1, -1, 1) * delta.view(1, 1, 1, -1)
        return act + add

    def fn(delta: Tensor) -> Tensor:
        holder["delta"] = delta
        return model(tokens[None], stop_at_layer=lens_layer)[0, -1]

    zero = torch.zeros(shape, dtype=b_lens.dtype, device=b_lens.device)
    with hooked(model, [(site.hook_name, hook)], need_result=site.kind == "result"):
        rows = pullback_rows(fn, (zero,), b_lens, chunk=chunk)[0]
    return rows.reshape(len(b_lens), -1)


def _site_shape(model: HookedTransformer, site: Site) -> tuple[int, ...]:
    cfg = model.cfg
    if site.kind == "z":
        return (cfg.d_head,) if site.head is not None else (cfg.n_heads, cfg.d_head)
    if site.kind == "result":
        return (cfg.d_model,) if site.head is not None else (cfg.n_heads, cfg.d_model)
    return (site.dim(model),)
