"""Reading and writing activations at sites, only inside context managers.

Every hook steerlens adds lives in a ``with`` block that removes it in ``finally``, so the model
is left exactly as found even when the code inside raises (KeyboardInterrupt included).

>>> import torch
>>> from steerlens.testing import tiny_model
>>> model = tiny_model()
>>> tokens = torch.tensor([[1, 2, 3]])
>>> with record(model, ["resid_post.0"]) as acts:
...     _ = model(tokens)
>>> acts["blocks.0.hook_resid_post"].shape
torch.Size([1, 3, 16])
>>> with add_vector(model, "resid_post.0", torch.zeros(16, dtype=torch.float64)):
...     steered = model(tokens)
>>> torch.equal(steered, model(tokens)), sum(len(m._forward_hooks) for m in model.modules())
(True, 0)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from steerlens._tl import attn_result_enabled, forward_hooks
from steerlens.errors import InputError, NonFiniteError
from steerlens.prompts import check_mask
from steerlens.sites import Site, as_site

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer

HookFn = Callable[[Tensor, object], Tensor | None]


@contextmanager
def hooked(
    model: HookedTransformer, fwd_hooks: list[tuple[str, HookFn]], *, need_result: bool = False
) -> Iterator[HookedTransformer]:
    """Attach forward hooks (``(hook name, fn)`` pairs) for the duration of the block; they are
    removed in ``finally``, from the hook points they were added to only (see
    :func:`steerlens._tl.forward_hooks`). ``need_result`` also turns on ``attn.hook_result``."""
    with ExitStack() as stack:
        if need_result:
            stack.enter_context(attn_result_enabled(model))
        stack.enter_context(forward_hooks(model, fwd_hooks))
        yield model


def _select(act: Tensor, site: Site) -> Tensor:
    """The site's slice of a hook activation, keeping [batch, pos, ...]."""
    if site.head is not None:
        return act[:, :, site.head]
    return act


@contextmanager
def record(
    model: HookedTransformer, sites: Iterable[str | Site], *, detach: bool = True
) -> Iterator[dict[str, Tensor]]:
    """Record the activations at ``sites`` during forward passes in the block.

    Yields a dict filled as the model runs, keyed by the site's canonical name, each value
    ``[batch, pos, ...]`` (the head selected for per-head sites). Repeated forward passes overwrite.
    """
    parsed = [as_site(s, model) for s in sites]
    acts: dict[str, Tensor] = {}

    def make_hook(site: Site) -> HookFn:
        def hook(act: Tensor, hook: object) -> None:
            value = _select(act, site)
            acts[site.name] = value.detach() if detach else value

        return hook

    fwd = [(s.hook_name, make_hook(s)) for s in parsed]
    with hooked(model, fwd, need_result=any(s.kind == "result" for s in parsed)):
        yield acts


def check_vector(
    vector: Tensor, site: Site, model: HookedTransformer, what: str = "vector"
) -> None:
    """Raise a steerlens error unless ``vector`` is a finite, non-zero [dim] tensor for the site."""
    dim = site.dim(model)
    if not isinstance(vector, Tensor):
        raise InputError(f"{what} must be a torch.Tensor, got {type(vector).__name__}")
    if vector.shape != (dim,):
        raise InputError(
            f"{what} has shape {tuple(vector.shape)} but site {site.name} needs shape ({dim},)"
        )
    if not vector.is_floating_point() or vector.is_complex():
        raise InputError(f"{what} must be a real floating-point tensor, got dtype {vector.dtype}")
    if vector.device.type == "meta":
        raise InputError(
            f"{what} is on the meta device (it holds no values); the model is on {model.cfg.device}"
        )
    if not torch.isfinite(vector).all():
        raise NonFiniteError(f"{what} for site {site.name} contains NaN or inf")


def _position_slice(site: Site, n_pos: int, offset: int) -> slice | int | None:
    """The positions of a [batch, pos, ...] activation the site writes to, or None if the
    site's position is not in this forward pass (e.g. an earlier position during cached
    generation). ``offset`` is the absolute index of the activation's first position."""
    if site.position == "all":
        return slice(None)
    if site.position == "last":
        return n_pos - 1
    if site.position < 0:
        raise InputError(
            f"site {site.name}: a negative position is relative to the prompt; "
            "resolve it first with Site.resolve_position"
        )
    idx = site.position - offset
    return idx if 0 <= idx < n_pos else None


def site_index(site: Site, n_pos: int) -> tuple[slice | int, ...] | None:
    """The index of the site's slice of a [batch, pos, ...] activation of ``n_pos`` positions:
    its positions, and its head for a per-head site; None if none of its positions is in this
    forward pass. The site's own activation shape is ``act.shape[len(index):]``."""
    sl = _position_slice(site, n_pos, 0)
    if sl is None:
        return None
    return (slice(None), sl) if site.head is None else (slice(None), sl, site.head)


#: a [batch, pos] attention mask, 1 on real tokens and 0 on padding (TransformerLens's own)
Mask = Tensor


def _masked_rows(site: Site, real: Tensor) -> Tensor:
    """The [batch, pos] positions a site's rule picks among each row's real tokens: all of
    them, the last, or the p-th (none in a row shorter than p + 1)."""
    if site.position == "all":
        return real
    rank = real.long().cumsum(1) - 1  # each real token's index among its row's real tokens
    if site.position == "last":
        want = real.sum(1, keepdim=True) - 1
    elif site.position < 0:
        raise InputError(
            f"site {site.name}: a negative position is relative to the prompt; "
            "resolve it first with Site.resolve_position"
        )
    else:
        want = torch.full_like(rank[:, :1], site.position)
    return real & (rank == want)


@contextmanager
def edit_at(
    model: HookedTransformer,
    site: Site,
    edit: Callable[[Tensor, torch.Size], Tensor],
    *,
    attention_mask: Mask | None = None,
) -> Iterator[HookedTransformer]:
    """While inside the block, replace the site's slice of its activation (its positions, its
    head) by ``edit(slice, shape)``, ``shape`` being the site's own activation shape.

    With an ``attention_mask`` (a padded batch, either padding side), positions count real
    tokens only: ``@last`` is each row's last real token, ``@all`` skips padding, ``@p`` is each
    row's p-th real token. A forward pass of one position per row (a cached generation step)
    holds only new, real tokens: ``@last`` and ``@all`` edit it, ``@p`` does not."""
    real = None if attention_mask is None else check_mask(attention_mask)

    def hook(act: Tensor, hook: object) -> Tensor:
        if real is not None:
            return _edit_masked(act, real)
        if site.position == "all" and site.head is None:  # one addition, no clone
            return edit(act, act.shape[2:])
        index = site_index(site, act.shape[1])
        if index is None:
            return act
        act = act.clone()
        act[index] = edit(act[index], act.shape[len(index) :])
        return act

    def _edit_masked(act: Tensor, real: Tensor) -> Tensor:
        if act.shape[0] != real.shape[0]:
            raise InputError(
                f"the attention mask has {real.shape[0]} rows but the forward pass at "
                f"{site.name} has {act.shape[0]}"
            )
        if act.shape[1] == real.shape[1]:
            rows = _masked_rows(site, real.to(act.device))
        elif act.shape[1] == 1:  # a generation step: one new, real token per row
            if site.position not in ("all", "last"):
                return act
            rows = torch.ones(act.shape[:2], dtype=torch.bool, device=act.device)
        else:
            raise InputError(
                f"the attention mask covers {real.shape[1]} positions but the forward pass at "
                f"{site.name} has {act.shape[1]}: give the mask of the tokens being run"
            )
        if not bool(rows.any()):
            return act
        act = act.clone()
        picked = act[rows]
        if site.head is None:
            picked = edit(picked, picked.shape[1:])
        else:
            picked[:, site.head] = edit(picked[:, site.head], picked.shape[2:])
        act[rows] = picked
        return act

    with hooked(model, [(site.hook_name, hook)], need_result=site.kind == "result"):
        yield model


@contextmanager
def add_vector(
    model: HookedTransformer,
    site: str | Site,
    vector: Float[Tensor, " dim"],
    scale: float = 1.0,
    *,
    attention_mask: Mask | None = None,
) -> Iterator[HookedTransformer]:
    """Add ``scale * vector`` to the activation at ``site`` (at its position rule) while inside
    the block. ``"last"`` adds at the final position of every forward pass, so it also steers
    each new token during generation; ``"all"`` adds at every position. With an
    ``attention_mask`` the rule counts each row's real tokens (:func:`edit_at`)."""
    site = as_site(site, model)
    check_vector(vector, site, model)
    delta = (scale * vector).to(dtype=model.cfg.dtype, device=model.cfg.device)
    if not torch.isfinite(delta).all():
        raise NonFiniteError(f"scale {scale} times the vector overflows at site {site.name}")
    with edit_at(
        model,
        site,
        lambda x, shape: x + delta.view(shape).to(x.dtype),
        attention_mask=attention_mask,
    ):
        yield model


@contextmanager
def scale_activation(
    model: HookedTransformer,
    site: str | Site,
    factor: float,
    *,
    attention_mask: Mask | None = None,
) -> Iterator[HookedTransformer]:
    """Multiply the activation at ``site`` (its position rule; one head for per-head sites) by
    ``factor`` while inside the block: 0 ablates it, 2 doubles it, -1 flips its sign. With an
    ``attention_mask`` the rule counts each row's real tokens (:func:`edit_at`)."""
    site = as_site(site, model)
    factor = float(factor)
    if not math.isfinite(factor):
        raise NonFiniteError(f"scaling factor {factor} at {site.name} is not finite")
    with edit_at(model, site, lambda x, shape: x * factor, attention_mask=attention_mask):
        yield model
