"""Brute-force oracles: the pullback Fisher metric from torch.func.jacrev of the full logits."""

from __future__ import annotations

import torch
from torch import Tensor

from steerlens.sites import Site


def _shape(model, site: Site) -> tuple[int, ...]:
    cfg = model.cfg
    if site.kind == "z":
        return (cfg.d_head,) if site.head is not None else (cfg.n_heads, cfg.d_head)
    if site.kind == "result":
        return (cfg.d_model,) if site.head is not None else (cfg.n_heads, cfg.d_model)
    return (site.dim(model),)


def log_outcomes(logp: Tensor, exclude=(), merge=()) -> Tensor:
    """log q over outcomes (full vocabulary; dropped tokens get -inf and are ignored)."""
    vocab = logp.shape[-1]
    keep = torch.ones(vocab, dtype=torch.bool)
    keep[list(exclude)] = False
    groups = {t: [t] for t in range(vocab) if keep[t]}
    for b, t in merge:
        keep[b] = False
        groups.pop(b, None)
        groups[t].append(b)
    reps = sorted(groups)
    logmass = torch.stack([torch.logsumexp(logp[groups[r]], 0) for r in reps])
    return logmass - torch.logsumexp(logmass, 0)


def oracle_metric(model, tokens: Tensor, site: Site, *, exclude=(), merge=(), lens_layer=None):
    """G = Σ_j q_j ∇log q_j ∇log q_jᵀ w.r.t. a perturbation at the site, by jacrev."""
    n_pos = tokens.shape[0]
    pos = site.resolve_position(n_pos)
    shape = _shape(model, site)
    lens = model.cfg.n_layers if lens_layer is None else lens_layer

    def fn(delta: Tensor) -> Tensor:
        def hook(act, hook):
            idx = (0, slice(None) if pos == "all" else pos)
            if site.head is not None:
                idx = (*idx, site.head)
            mask = torch.zeros(act.shape, dtype=act.dtype)
            mask[idx] = 1.0
            return act + mask * _broadcast(delta, act, site)

        captured = {}

        def capture(act, hook):
            captured["resid"] = act[0, -1]

        lens_hook = (
            f"blocks.{lens}.hook_resid_pre"
            if lens < model.cfg.n_layers
            else f"blocks.{lens - 1}.hook_resid_post"
        )
        use = model.cfg.use_attn_result
        model.cfg.use_attn_result = site.kind == "result" or use
        try:
            with model.hooks(fwd_hooks=[(site.hook_name, hook), (lens_hook, capture)]):
                model(tokens[None])
        finally:
            model.cfg.use_attn_result = use
        resid = captured["resid"]
        logits = model.unembed(model.ln_final(resid[None, None]))[0, 0]
        return log_outcomes(torch.log_softmax(logits, -1), exclude, merge)

    zero = torch.zeros(shape, dtype=model.cfg.dtype)
    logq = fn(zero).detach()
    jac = torch.func.jacrev(fn)(zero).reshape(logq.shape[0], -1)
    q = logq.exp()
    return (jac.T @ (q[:, None] * jac)).detach()


def _broadcast(delta: Tensor, act: Tensor, site: Site) -> Tensor:
    """Place delta so that act + mask * out adds it at the masked entries."""
    if site.head is not None:
        return delta.view(*([1] * (act.dim() - 1)), -1)
    return delta.view(1, 1, *act.shape[2:])


def kl(logp: Tensor, logq: Tensor) -> Tensor:
    return (logp.exp() * (logp - logq)).sum(-1)


def vjp_block_shares(model, state, layer: int, rows: dict, fast=None) -> tuple[dict, list]:
    """The block decomposition by reverse mode, one cotangent per (row, path): B_post at
    ``hook_attn_out`` for the direct attention path, and for each head h the rows at ``hook_z``
    with every other head zeroed, (1 + n_heads) × n_rows VJPs through the attention half.
    Returns (path shares, head shares) of ‖B_pre‖²_F."""
    from steerlens.metric.autodiff import pullback_rows
    from steerlens.metric.blockmap import block_map

    b_pre, b_post, b_mid, b_z = (rows[k] for k in ("resid_pre", "resid_post", "resid_mid", "z"))
    x = state.resid[layer].to(b_pre.dtype)
    n_rows, n_heads = b_z.shape[0], b_z.shape[1]
    eye = torch.eye(n_heads, dtype=b_z.dtype, device=b_z.device)
    per_head = (b_z.unsqueeze(0) * eye.view(n_heads, 1, n_heads, 1)).flatten(0, 1)
    cot_attn = torch.cat([b_post, torch.zeros_like(b_post).repeat(n_heads, 1)])
    cot_z = torch.cat([torch.zeros_like(b_z), per_head])
    with (
        torch.no_grad(),
        block_map(model, layer, state, (), ("attn_out", "z"), dtype=x.dtype, fast=fast) as fn,
    ):
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
    head_shares = ((heads * b_pre.unsqueeze(0)).sum((1, 2)) / total).tolist()
    return {k: float(v / total) for k, v in shares.items()}, head_shares
