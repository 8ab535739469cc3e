"""Prompts: strings or token tensors in, a validated list of 1-D token tensors out.

>>> from steerlens.testing import tiny_model
>>> import torch
>>> [t.tolist() for t in as_prompts(tiny_model(), torch.tensor([[1, 2], [3, 4]]))]
[[1, 2], [3, 4]]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from jaxtyping import Int
from torch import Tensor

from steerlens.errors import InputError

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer

PromptsLike = str | Sequence[str] | Tensor | Sequence[Tensor]


def as_prompts(model: HookedTransformer, prompts: PromptsLike) -> list[Int[Tensor, " pos"]]:
    """Each prompt as a 1-D token tensor on the model's device.

    Strings are tokenized with the model's own convention for a beginning-of-sequence token
    (``model.cfg.default_prepend_bos``); a 2-D tensor is a batch of equal-length prompts. Raises
    :class:`InputError` for an empty prompt or batch, a prompt past ``n_ctx``, or token ids
    outside the vocabulary.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, Tensor):
        if prompts.dim() == 1:
            prompts = [prompts]
        elif prompts.dim() == 2:
            prompts = list(prompts)
        else:
            raise InputError(
                f"token tensor must be [pos] or [batch, pos], got shape {tuple(prompts.shape)}"
            )
    if not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise InputError("no prompts given: pass a string, a list of strings or a token tensor")
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if model.tokenizer is None:
                raise InputError("the model has no tokenizer: pass token ids instead of strings")
            if not prompt:
                raise InputError(f"prompt {i} is an empty string")
            toks = model.to_tokens(prompt, prepend_bos=model.cfg.default_prepend_bos)[0]
        elif isinstance(prompt, Tensor):
            if prompt.dim() != 1 or prompt.dtype not in (torch.int64, torch.int32):
                raise InputError(
                    f"prompt {i}: token ids must be a 1-D integer tensor, got shape "
                    f"{tuple(prompt.shape)} and dtype {prompt.dtype}"
                )
            toks = prompt.long()
        else:
            raise InputError(f"prompt {i} is a {type(prompt).__name__}; expected str or tensor")
        check_tokens(model, toks, f"prompt {i}")
        out.append(toks.to(model.cfg.device))
    return out


def check_tokens(model: HookedTransformer, toks: Tensor, what: str = "prompt") -> None:
    """Raise :class:`InputError` for an empty token sequence, one past ``n_ctx`` or bad ids."""
    n = toks.shape[-1]
    if n == 0:
        raise InputError(f"{what} has no tokens")
    if n > model.cfg.n_ctx:
        raise InputError(
            f"{what} has {n} tokens, past the model's context of {model.cfg.n_ctx} (n_ctx)"
        )
    lo, hi = int(toks.min()), int(toks.max())
    if lo < 0 or hi >= model.cfg.d_vocab:
        raise InputError(
            f"{what} has token ids outside the vocabulary 0..{model.cfg.d_vocab - 1} "
            f"(min {lo}, max {hi})"
        )
