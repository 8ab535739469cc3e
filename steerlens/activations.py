"""Activations at one site for many prompts, batched by length, read inside a hook context.

>>> import torch
>>> from steerlens.testing import tiny_model
>>> model = tiny_model()
>>> acts = harvest(model, [torch.tensor([1, 2, 3]), torch.tensor([4, 5])], "resid_post.0")
>>> acts.shape
torch.Size([2, 16])
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from steerlens.hooks import record
from steerlens.prompts import PromptsLike, as_prompts
from steerlens.sites import Site, as_site

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer


@torch.no_grad()
def harvest(
    model: HookedTransformer, prompts: PromptsLike, site: str | Site, *, batch_size: int = 32
) -> Float[Tensor, "n dim"]:
    """The activation at ``site`` (at its position rule; ``"all"`` averages over positions) for
    each prompt, in the prompts' order. Prompts of equal length run together; the model stops
    after the site's block."""
    site = as_site(site, model)
    tokens = as_prompts(model, prompts)
    by_length: dict[int, list[int]] = {}
    for i, t in enumerate(tokens):
        by_length.setdefault(t.shape[0], []).append(i)
    out: list[Tensor | None] = [None] * len(tokens)
    for n, indices in by_length.items():
        pos = site.resolve_position(n)
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            batch = torch.stack([tokens[i] for i in chunk])
            with record(model, [site]) as acts:
                # an explicit mask: TransformerLens would mask real tokens equal to the pad token
                model(batch, stop_at_layer=site.layer + 1, attention_mask=torch.ones_like(batch))
            act = acts[site.name]
            act = act.mean(1) if pos == "all" else act[:, pos]
            for i, row in zip(chunk, act.reshape(len(chunk), -1), strict=True):
                out[i] = row
    return torch.stack(out)  # type: ignore[arg-type]
