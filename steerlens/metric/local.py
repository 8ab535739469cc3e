"""The model downstream of a residual site, at the prediction position, as a plain function.

Iterative steering (FishBack, Euclidean gradient ascent, depth-k and dual steering) changes one
residual vector x at the last position T and asks, at every step, for the logits, the concept's
gradient and the metric at x. Under causal attention a change at T leaves every earlier position
alone, so all three need only the blocks after the site at T, with the prompt's keys and values
frozen: :class:`LocalPath` runs those single-position block maps (the same ones the recursive
sweep uses) and pulls factor rows back through them, never the whole graph.

>>> import torch
>>> from steerlens.testing import tiny_model
>>> model = tiny_model("llama")
>>> tokens = torch.tensor([3, 1, 4, 1, 5])
>>> with LocalPath(model, tokens, "resid_post.0") as path:
...     logits = path.logits(path.x0)
>>> torch.allclose(logits, model(tokens[None])[0, -1])
True
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from steerlens.errors import InputError, NonFiniteError, SiteError
from steerlens.metric.blockmap import BlockFn, block_map, fast_supported
from steerlens.metric.core import Metric
from steerlens.metric.precision import compute_model
from steerlens.metric.pullback import MetricOptions, lens_logits, lens_rows
from steerlens.metric.recursion import pull_block
from steerlens.metric.state import PromptState, prompt_state
from steerlens.prompts import as_prompts
from steerlens.sites import Site, as_site

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer

#: residual sites an iterative method can steer through the fast path
LOCAL_KINDS: tuple[str, ...] = ("resid_pre", "resid_post")


def entry_layer(site: Site, n_layers: int) -> int:
    """The block whose input residual the site is (``n_layers``: the final residual)."""
    if site.kind not in LOCAL_KINDS:
        raise SiteError(
            f"site {site.name}: iterative steering acts on the residual stream; valid kinds are "
            f"{', '.join(LOCAL_KINDS)} (e.g. 'resid_post.{site.layer}')"
        )
    if site.position != "last":
        raise SiteError(
            f"site {site.name}: iterative steering acts at the prediction position ('@last'), "
            f"where the metric is exact; got position {site.position!r}"
        )
    return site.layer + (1 if site.kind == "resid_post" else 0)


class LocalPath:
    """Blocks ``entry..n_layers-1`` of one prompt at its last position, as functions of the
    residual x entering block ``entry``. Use as a context manager (fallback block maps attach
    hooks for its duration). ``x0`` is the clean residual at the site. A float16 / bfloat16
    model is run as its float32 copy (:func:`~steerlens.metric.precision.compute_model`), so
    ``x0``, the logits and the metric are float32; the user's model is not changed."""

    def __init__(
        self, model: HookedTransformer, tokens: Int[Tensor, " pos"] | str, site: str | Site
    ) -> None:
        self.model = compute_model(model)
        self.site = as_site(site, model)
        self.entry = entry_layer(self.site, model.cfg.n_layers)
        self.tokens = as_prompts(model, tokens)[0]
        self.state: PromptState = prompt_state(self.model, self.tokens)
        self.x0: Float[Tensor, " d_model"] = self.state.resid[self.entry].clone()
        self._stack: ExitStack | None = None
        self._blocks: list[BlockFn] = []
        #: every block after the site is a plain tensor function (the fast block map), so a
        #: batch of points runs as one vmapped call
        self.vectorized = all(
            fast_supported(self.model, layer, self.state.n_pos)
            for layer in range(self.entry, model.cfg.n_layers)
        )

    def __enter__(self) -> LocalPath:
        stack = ExitStack()
        try:
            dtype = self.x0.dtype
            self._blocks = [
                stack.enter_context(block_map(self.model, layer, self.state, (), dtype=dtype))
                for layer in range(self.entry, self.model.cfg.n_layers)
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

    def _need_open(self) -> None:
        if self._stack is None:
            raise RuntimeError("use LocalPath inside a 'with' block")

    def residuals(self, x: Float[Tensor, " d_model"]) -> list[Float[Tensor, " d_model"]]:
        """The residual entering each block from ``entry`` on, then the final residual."""
        self._need_open()
        out = [x]
        for fn in self._blocks:
            out.append(fn(out[-1])[0])
        return out

    def logits(self, x: Float[Tensor, " d_model"]) -> Float[Tensor, " d_vocab"]:
        """Next-token logits with the residual at the site set to ``x`` (differentiable)."""
        return lens_logits(self.model, self.residuals(x)[-1])

    def batched(self, fn: Callable[[Tensor], Tensor], xs: Float[Tensor, "n d_model"]) -> Tensor:
        """``fn`` (a function of one point x, e.g. ``lambda x: concept.value(x, path.logits(x))``)
        at every row of ``xs``, stacked: one vmapped call where every block after the site is
        a fast block map (the rows share each weight read), a loop over the rows otherwise."""
        self._need_open()
        if xs.ndim != 2 or xs.shape[1] != self.x0.shape[0]:
            raise InputError(
                f"points must be [n, {self.x0.shape[0]}] at {self.site.name}, got {tuple(xs.shape)}"
            )
        if self.vectorized:
            return torch.vmap(fn)(xs)
        return torch.stack([fn(x) for x in xs])

    def metric(
        self,
        x: Float[Tensor, " d_model"],
        options: MetricOptions | None = None,
        *,
        depth: int | None = None,
    ) -> Metric:
        """The pullback metric at the site with its residual set to ``x``: the factor at the
        output pulled back block by block (``depth``: through that many blocks, then straight
        into the unembedding)."""
        self._need_open()
        options = options or MetricOptions()
        n_layers = self.model.cfg.n_layers
        with torch.no_grad():
            resid = self.residuals(x.detach())
        if not all(torch.isfinite(r).all() for r in resid):
            raise NonFiniteError(f"the residual stream is not finite with this x at {self.site}")
        state = replace(self.state, resid=self.state.resid[: self.entry] + resid)
        top = n_layers if depth is None else min(self.entry + depth, n_layers)
        rows, info = lens_rows(self.model, state.resid[top], options)
        for layer in range(top - 1, self.entry - 1, -1):
            rows = pull_block(self.model, state, layer, rows, set()).rows["resid_pre"]
        metric = Metric(rows.contiguous(), self.site.name, replace(info, depth=depth))
        return metric.compressed()
