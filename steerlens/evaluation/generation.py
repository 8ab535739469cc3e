"""What an edit does to generated text: greedy and sampled continuations generated under an
intervention, and the unsteered model's perplexity of them (fluency).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from steerlens import _tl
from steerlens.errors import InputError

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer
    from steerlens.methods.intervention import Intervention


def _prompt_with_room(model: HookedTransformer, tokens: Tensor, n_tokens: int) -> Tensor:
    """``tokens`` as a [1, pos] batch, after checking that ``n_tokens`` more fit the context."""
    if n_tokens < 1:
        raise InputError(f"n_tokens must be >= 1, got {n_tokens}")
    seq = tokens.view(1, -1)
    if seq.shape[1] + n_tokens > model.cfg.n_ctx:
        raise InputError(
            f"{seq.shape[1]} prompt tokens + {n_tokens} generated exceed the model's context of "
            f"{model.cfg.n_ctx}"
        )
    return seq


@torch.no_grad()
def _continue(
    model: HookedTransformer,
    prompt: Tensor,
    n_tokens: int,
    intervention: Intervention | None,
    rows: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``rows`` continuations [rows, pos + n_tokens] of ``prompt`` [1, pos], generated with
    ``intervention`` applied: row 0 greedily (argmax), the others (if any) sampled from the
    softmax with ``generator``.

    The prompt runs once and each new token once, with a key-value cache (TransformerLens's
    own) that the rows share for the prompt. The intervention is applied to every pass with the
    prompt's attention mask, so a one-token pass counts as a generation step
    (:func:`steerlens.hooks.edit_at`): ``@last`` and ``@all`` edit each new token and ``@p``
    only the prompt's p-th, as a full forward of the whole sequence at every step would (the
    edit at earlier positions is in their cached keys and values)."""

    def steered(n: int) -> AbstractContextManager[object]:
        if intervention is None:
            return nullcontext()
        return intervention.apply(model, attention_mask=torch.ones_like(prompt).expand(n, -1))

    cache = _tl.new_kv_cache(model, 1)
    with steered(1):
        logits = _tl.forward_filling_cache(model, prompt, cache)[:, -1].expand(rows, -1)
    _tl.repeat_kv_cache(cache, rows)
    out = [prompt.expand(rows, -1)]
    with steered(rows):
        for i in range(n_tokens):
            nxt = logits[:1].argmax(-1, keepdim=True)
            if rows > 1:
                probs = torch.softmax(logits[1:].double(), -1)
                picked = torch.multinomial(probs, 1, generator=generator)
                nxt = torch.cat([nxt, picked.to(nxt.dtype)], 0)
            out.append(nxt.to(prompt.dtype))
            if i + 1 < n_tokens:
                logits = _tl.forward_filling_cache(model, out[-1], cache)[:, -1]
    return torch.cat(out, 1)


@torch.no_grad()
def _perplexity(model: HookedTransformer, seqs: Tensor, start: int) -> Tensor:
    """The unsteered model's perplexity of each row of ``seqs`` [batch, pos] from position
    ``start`` on: exp of the mean negative log-likelihood per token, [batch]. The rows share
    their first ``start`` tokens (one prompt): it runs once, into a key-value cache the rows
    then share for their own tokens."""
    prompt = seqs[:1, :start]
    if not torch.equal(seqs[:, :start], prompt.expand_as(seqs[:, :start])):
        raise InputError("the continuations scored together must share their prompt")
    cache = _tl.new_kv_cache(model, 1)
    first = _tl.forward_filling_cache(model, prompt, cache)[:, -1:]
    logits = first.expand(seqs.shape[0], -1, -1)
    if seqs.shape[1] - start > 1:
        _tl.repeat_kv_cache(cache, seqs.shape[0])
        rest = _tl.forward_filling_cache(model, seqs[:, start:-1], cache)
        logits = torch.cat([logits, rest], 1)
    logp = torch.log_softmax(logits.double(), -1)
    return (-logp.gather(2, seqs[:, start:, None]).mean((1, 2))).exp()


@torch.no_grad()
def greedy_continuation(
    model: HookedTransformer,
    tokens: Tensor,
    intervention: Intervention | None = None,
    n_tokens: int = 8,
) -> Tensor:
    """``tokens`` followed by ``n_tokens`` greedy tokens generated with ``intervention``
    applied (an ``@last`` edit steers each new prediction position and nothing else; see
    :func:`_continue`)."""
    seq = _prompt_with_room(model, tokens, n_tokens)
    return _continue(model, seq, n_tokens, intervention)[0]


@torch.no_grad()
def continuation_perplexity(
    model: HookedTransformer,
    tokens: Tensor,
    intervention: Intervention | None = None,
    n_tokens: int = 8,
) -> float:
    """Fluency: the unsteered model's perplexity (exp of the mean negative log-likelihood per
    token) of the :func:`greedy_continuation` generated under ``intervention``."""
    seq = greedy_continuation(model, tokens, intervention, n_tokens)
    return float(_perplexity(model, seq[None], tokens.numel())[0])


@dataclass(frozen=True)
class Generation:
    """What an edit does to generated text (:func:`generation_measures`)."""

    target_first_greedy: float
    target_first_sampled: float
    perplexity_greedy: float
    perplexity_sampled: float

    def row(self) -> dict[str, float]:
        """The measures as a record's columns."""
        return asdict(self)


@torch.no_grad()
def generation_measures(
    model: HookedTransformer,
    tokens: Tensor,
    intervention: Intervention | None,
    target: int,
    *,
    n_tokens: int = 20,
    samples: int = 4,
    seed: int = 0,
) -> Generation:
    """What the edit does to generated text: a greedy continuation and ``samples`` sampled ones
    (temperature 1, seeded), ``n_tokens`` each, generated with ``intervention`` applied to every
    pass (an ``@last`` edit so steers each generated token). ``target_first_greedy``: 1.0 if the
    greedy continuation's next word is the target token; ``target_first_sampled``: the fraction
    of sampled continuations whose next word is; ``perplexity_greedy`` /
    ``perplexity_sampled`` (mean over samples): the unsteered model's perplexity of the
    continuations (exp of the mean negative log-likelihood per generated token)."""
    if samples < 1:
        raise InputError(f"samples must be >= 1, got {samples}")
    seq = _prompt_with_room(model, tokens, n_tokens)
    start = seq.shape[1]
    generator = torch.Generator(device=seq.device).manual_seed(seed)
    both = _continue(model, seq, n_tokens, intervention, 1 + samples, generator)
    greedy, sampled = both[:1], both[1:]
    perplexity = _perplexity(model, both, start)
    return Generation(
        target_first_greedy=float(greedy[0, start] == target),
        target_first_sampled=float((sampled[:, start] == target).double().mean()),
        perplexity_greedy=float(perplexity[0]),
        perplexity_sampled=float(perplexity[1:].mean()),
    )
