"""Many prompts' single-position paths run as one: the blocks after a residual site, batched
over contexts.

A :class:`~steerlens.metric.local.LocalPath` is one prompt's blocks after the site at its last
position, its earlier keys and values frozen. :class:`StackedPaths` holds one such path per
prompt (prompts of any lengths) and runs points of *different* prompts through the blocks in one
call: each block's weights are read once for every row, each row attends to its own prompt's
cached keys and values (padded to the longest prompt, the padding masked out) at its own rotary
position. Where some block after the site is not a fast block (the fallback block
maps), the rows run prompt by prompt through their own paths instead; the values are the same.

>>> import torch
>>> from steerlens.testing import tiny_model
>>> model = tiny_model("llama")
>>> prompts = [torch.tensor([3, 1, 4, 1, 5]), torch.tensor([2, 7])]
>>> with StackedPaths(model, prompts, "resid_post.0") as paths:
...     xs = torch.stack([p.x0 for p in paths.paths])
...     logits = paths.logits(xs, [1, 1])
>>> all(torch.allclose(logits[i], model(t[None])[0, -1]) for i, t in enumerate(prompts))
True
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from steerlens import _tl
from steerlens.errors import InputError
from steerlens.metric.blockmap import FastBlock, shared_block_weights
from steerlens.metric.local import LocalPath
from steerlens.metric.pullback import lens_logits
from steerlens.prompts import PromptsLike, as_prompts
from steerlens.sites import Site

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer


class StackedBlock:
    """Block ``layer`` at the last position of several prompts: one :class:`FastBlock`'s weights
    (shared by every prompt) and each prompt's cached keys and values, stacked ``[prompt, kv,
    pos, d_head]`` and padded to the longest with a key mask."""

    def __init__(self, blocks: Sequence[FastBlock]) -> None:
        first = blocks[0]
        self.weights = first  # the weights and norms: the same block of the same model
        self.positions = [b.pos for b in blocks]
        n_past = max(b.k_past.shape[1] for b in blocks)
        n_kv, d_head, dtype = first.n_kv, first.d_head, first.k_past.dtype
        device = first.k_past.device
        self.k_past = torch.zeros(len(blocks), n_kv, n_past, d_head, dtype=dtype, device=device)
        self.v_past = torch.zeros_like(self.k_past)
        self.real = torch.zeros(len(blocks), n_past, dtype=torch.bool, device=device)
        for i, b in enumerate(blocks):
            n = b.k_past.shape[1]
            self.k_past[i, :, :n] = b.k_past
            self.v_past[i, :, :n] = b.v_past
            self.real[i, :n] = True

    def _rotate(self, x: Tensor, n: int, counts: Sequence[int]) -> Tensor:
        w = self.weights
        rows = x.shape[0]
        if not w.rotary:
            return x.view(rows, n, w.d_head)
        parts, start = [], 0
        for count, pos in zip(counts, self.positions, strict=True):
            if count:
                part = x[start : start + count].view(count, 1, n, w.d_head)
                parts.append(_tl.rotate(w.model, w.layer, part, pos).view(count, n, w.d_head))
            start += count
        return torch.cat(parts)

    def __call__(self, x: Tensor, counts: Sequence[int], index: Tensor) -> Tensor:
        """The block's output for each row of ``x`` ``[rows, d_model]``, the rows of prompt i
        being the ``counts[i]`` consecutive rows after those of prompts < i (``index``: each
        row's prompt)."""
        w, rows = self.weights, x.shape[0]
        h = w.ln1(x.view(rows, 1, -1)).view(rows, -1)
        q = self._rotate(w.head_norm(w.q_norm, h @ w.w_q + w.b_q), w.n_heads, counts)
        k = self._rotate(w.head_norm(w.k_norm, h @ w.w_k + w.b_k), w.n_kv, counts)
        v = (h @ w.w_v + w.b_v).view(rows, w.n_kv, w.d_head)
        qg = q.view(rows, w.n_kv, w.n_heads // w.n_kv, w.d_head)
        k_past, v_past = self.k_past[index], self.v_past[index]
        past = torch.einsum("rkgd,rktd->rkgt", qg, k_past)
        past = past.masked_fill(~self.real[index][:, None, None, :], float("-inf"))
        new = torch.einsum("rkgd,rkd->rkg", qg, k).unsqueeze(-1)
        pattern = torch.softmax(torch.cat([past, new], -1) / w.scale, -1)
        n_past = k_past.shape[2]
        z = torch.einsum("rkgt,rktd->rkgd", pattern[..., :n_past], v_past)
        z = z + pattern[..., n_past:] * v.unsqueeze(2)
        mid = x + w.post_attention(z.reshape(rows, -1) @ w.w_o_flat + w.b_o)
        return mid + w.mlp(mid)


class StackedPaths:
    """One :class:`LocalPath` per prompt (``paths``, each open while this is), and the blocks
    after the site batched over the prompts (:meth:`logits`). Use as a context manager."""

    def __init__(self, model: HookedTransformer, prompts: PromptsLike, site: str | Site) -> None:
        tokens = as_prompts(model, prompts)
        self.paths = [LocalPath(model, t, site) for t in tokens]
        self.model = self.paths[0].model
        self.site = self.paths[0].site
        #: every block after the site is a fast block map for every prompt: rows of different
        #: prompts share one call
        self.stacked = all(p.vectorized for p in self.paths)
        self._stack: ExitStack | None = None
        self._blocks: list[StackedBlock] = []

    def __len__(self) -> int:
        return len(self.paths)

    def __enter__(self) -> StackedPaths:
        stack = ExitStack()
        try:
            stack.enter_context(shared_block_weights(self.model))  # one copy for every prompt
            for path in self.paths:
                stack.enter_context(path)
            if self.stacked:
                dtype = self.paths[0].x0.dtype
                self._blocks = [
                    StackedBlock([FastBlock(self.model, layer, p.state, dtype) for p in self.paths])
                    for layer in range(self.paths[0].entry, self.model.cfg.n_layers)
                ]
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc: Any) -> None:
        stack, self._stack, self._blocks = self._stack, None, []
        if stack is not None:
            stack.close()

    def logits(
        self, xs: Float[Tensor, "rows d_model"], counts: Sequence[int]
    ) -> Float[Tensor, "rows d_vocab"]:
        """Next-token logits at each row of ``xs`` taken as the residual at the site of its
        prompt: the first ``counts[0]`` rows are prompt 0's, the next ``counts[1]`` prompt 1's, and
        so on (a count may be 0). Differentiable in ``xs``."""
        if self._stack is None:
            raise RuntimeError("use StackedPaths inside a 'with' block")
        counts = [int(c) for c in counts]
        d = self.paths[0].x0.shape[0]
        if len(counts) != len(self.paths) or min(counts) < 0:
            raise InputError(
                f"counts gives the number of rows of each of the {len(self.paths)} prompts "
                f"(each >= 0), got {counts}"
            )
        if xs.ndim != 2 or xs.shape != (sum(counts), d):
            raise InputError(
                f"points must be [{sum(counts)}, {d}] (the sum of counts) at {self.site.name}, "
                f"got {tuple(xs.shape)}"
            )
        if not self.stacked:
            parts, start = [], 0
            for path, count in zip(self.paths, counts, strict=True):
                if count:
                    rows = xs[start : start + count]
                    parts.append(torch.stack([path.logits(x) for x in rows]))
                start += count
            return torch.cat(parts)
        index = torch.repeat_interleave(
            torch.arange(len(counts), device=xs.device), torch.tensor(counts, device=xs.device)
        )
        h = xs
        for block in self._blocks:
            h = block(h, counts, index)
        return lens_logits(self.model, h)
