"""Batched vector-Jacobian products: many factor rows pulled back through one function."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.autograd.forward_ad as fwad
from torch import Tensor


def pullback_rows(
    fn: Callable[..., Any], primals: tuple[Tensor, ...], rows: Any, *, chunk: int | None = None
) -> tuple[Tensor, ...]:
    """``rows`` (a tensor, or a tuple matching ``fn``'s outputs, each with a leading row axis)
    pulled back through ``fn`` at ``primals``: one ``torch.func.vjp``, vmapped over the rows in
    chunks of ``chunk`` (all at once if None). Returns one ``[rows, ...]`` tensor per primal."""
    vjp_fn = torch.func.vjp(fn, *primals)[1]
    if chunk is None:
        return tuple(torch.vmap(vjp_fn)(rows))
    first = rows[0] if isinstance(rows, tuple) else rows
    parts = []
    for i in range(0, first.shape[0], chunk):
        sl = slice(i, i + chunk)
        part = tuple(r[sl] for r in rows) if isinstance(rows, tuple) else rows[sl]
        parts.append(torch.vmap(vjp_fn)(part))
    return tuple(torch.cat([p[k] for p in parts], 0) for k in range(len(primals)))


@functools.cache
def load_forward_ad() -> None:
    """torch loads its forward-mode decompositions on first use through ``torch.jit.script``,
    which warns that jit is deprecated: torch's own internals, nothing a user can act on. Call
    this once before a forward-mode pass."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*torch.jit.script.*", DeprecationWarning)
        with fwad.dual_level():
            fwad.make_dual(torch.zeros(1), torch.zeros(1))
