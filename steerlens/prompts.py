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


def check_mask(mask: Tensor) -> Tensor:
    """``mask`` as a bool [batch, pos] tensor, after checking it is 0/1 with a real token in
    every row."""
    if not isinstance(mask, Tensor) or mask.ndim != 2:
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise InputError(f"an attention mask is a [batch, pos] tensor of 0/1, got {shape}")
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise InputError("an attention mask holds only 0 (padding) and 1 (a real token)")
    real = mask.bool()
    empty = [i for i, n in enumerate(real.sum(1).tolist()) if n == 0]
    if empty:
        raise InputError(f"rows {empty} of the attention mask have no real token (all padding)")
    return real


def unpad(tokens: Int[Tensor, "batch pos"], attention_mask: Tensor) -> list[Int[Tensor, " _pos"]]:
    """The real tokens of each row of a padded batch (padding on either side, as
    TransformerLens pads), one 1-D tensor a row.

    >>> mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    >>> [t.tolist() for t in unpad(torch.tensor([[5, 6, 0], [0, 7, 8]]), mask)]
    [[5, 6], [7, 8]]
    """
    if not isinstance(tokens, Tensor) or tokens.ndim != 2:
        raise InputError("a padded batch is a [batch, pos] token tensor with its attention mask")
    real = check_mask(attention_mask)
    if real.shape != tokens.shape:
        raise InputError(
            f"the attention mask has shape {tuple(real.shape)} but the tokens have shape "
            f"{tuple(tokens.shape)}"
        )
    rows = []
    for i, row in enumerate(real.to(tokens.device)):
        where = row.nonzero().flatten()
        if int(where[-1] - where[0]) + 1 != len(where):
            raise InputError(
                f"row {i} of the attention mask has padding between real tokens; pad on one side"
            )
        rows.append(tokens[i, row])
    return rows


def as_prompts(
    model: HookedTransformer, prompts: PromptsLike, attention_mask: Tensor | None = None
) -> list[Int[Tensor, " pos"]]:
    """Each prompt as a 1-D token tensor on the model's device.

    Strings are tokenized with the model's own convention for a beginning-of-sequence token
    (``model.cfg.default_prepend_bos``); a 2-D tensor is a batch of equal-length prompts, or with
    ``attention_mask`` a padded batch of prompts of different lengths (:func:`unpad`). Raises
    :class:`InputError` for an empty prompt or batch, a prompt past ``n_ctx``, token ids outside
    the vocabulary, or a mask that does not fit the tokens.
    """
    if attention_mask is not None:
        if not isinstance(prompts, Tensor):
            raise InputError(
                "attention_mask goes with a [batch, pos] token tensor (a padded batch), not "
                f"{type(prompts).__name__}"
            )
        prompts = unpad(prompts, attention_mask)
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
