"""One verb context as the experiments run it: its tokens (with the model's BOS), its pair
share p_t/(p_t + p_b), and its pair concept."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from steerlens.concepts import PairConcept
from steerlens.datasets import VerbContext

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer


def context_tokens(model: HookedTransformer, ctx: VerbContext) -> Tensor:
    """The context's ids with the model's BOS prepended if it uses one."""
    ids = list(ctx.token_ids)
    tok: Any = model.tokenizer
    if model.cfg.default_prepend_bos and tok is not None and tok.bos_token_id is not None:
        ids = [int(tok.bos_token_id)] + ids
    return torch.tensor(ids, dtype=torch.long, device=model.cfg.device)


def pair_share(logp: Tensor, ctx: VerbContext) -> Tensor:
    """The target's share of the pair, p_t / (p_t + p_b)."""
    return (logp[ctx.target_id] - torch.logaddexp(logp[ctx.target_id], logp[ctx.base_id])).exp()


def pair_concept(ctx: VerbContext) -> PairConcept:
    return PairConcept(ctx.base_id, ctx.target_id, f"{ctx.target_word} over {ctx.verb}")
