"""What an edit does to a question with a known answer: the answer's rank at the answer position,
whether the greedy completion gives it, its token overlap with a reference completion, the
completion's fluency, and the off-target KL at the answer position.

Measured on token ids, with no text normalization: the answer is one token (the id the model
should predict after the prompt), a completion is the greedy continuation cut at the tokenizer's
end-of-sequence token (:func:`until_eos`), and the overlap is SQuAD's token F1 over token-id
multisets (:func:`token_f1`).

>>> round(token_f1([5, 6, 7], [6, 7, 8, 9]), 12)  # 2 shared: 2·(2/3)(2/4) / (2/3 + 2/4) = 4/7
0.571428571429
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Int
from torch import Tensor

from steerlens.errors import InputError
from steerlens.evaluation.generation import _perplexity, greedy_continuation
from steerlens.metric.outcomes import complement_kl

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer
    from steerlens.methods.intervention import Intervention

__all__ = ["QaOutcome", "qa_outcome", "token_f1", "until_eos"]


def token_f1(completion: Sequence[int] | Tensor, reference: Sequence[int] | Tensor) -> float:
    """SQuAD's token overlap of two token sequences: the F1 of the multiset intersection
    (precision over ``completion``, recall over ``reference``); 0 when either is empty."""
    got = Counter(int(t) for t in completion)
    want = Counter(int(t) for t in reference)
    common = sum((got & want).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(got.values()), common / sum(want.values())
    return 2 * precision * recall / (precision + recall)


def until_eos(model: HookedTransformer, tokens: Int[Tensor, " pos"]) -> Int[Tensor, " kept"]:
    """``tokens`` up to and including the first end-of-sequence token of the model's tokenizer
    (all of them without a tokenizer or an EOS id)."""
    eos = getattr(model.tokenizer, "eos_token_id", None)
    if eos is None:
        return tokens
    hits = (tokens == eos).nonzero()
    return tokens if len(hits) == 0 else tokens[: int(hits[0, 0]) + 1]


def completion(
    model: HookedTransformer,
    prompt: Int[Tensor, " pos"],
    intervention: Intervention | None,
    n_tokens: int,
) -> Int[Tensor, " new"]:
    """The greedy completion of ``prompt`` under ``intervention``: ``n_tokens`` tokens, cut at
    the first end-of-sequence token."""
    return until_eos(
        model, greedy_continuation(model, prompt, intervention, n_tokens)[len(prompt) :]
    )


def completion_perplexity(
    model: HookedTransformer, prompt: Int[Tensor, " pos"], tokens: Int[Tensor, " new"]
) -> float:
    """The unsteered model's perplexity of ``tokens`` after ``prompt`` (exp of the mean negative
    log-likelihood per token)."""
    return float(_perplexity(model, torch.cat([prompt, tokens])[None], len(prompt))[0])


@dataclass(frozen=True)
class QaOutcome:
    """One prompt's answer under an edit (:func:`qa_outcome`). ``answer_first``: 1.0 if the
    greedy completion's first token is the answer (the likeliest next token is the answer);
    ``answer_in_completion``: 1.0 if the answer token is anywhere in the completion;
    ``answer_logprob``: log p(answer) at the answer position, in nats; ``reference_f1``: the
    completion's :func:`token_f1` with the reference (NaN without one); ``perplexity``: the
    unsteered model's perplexity of the completion; ``off_target_kl``: the KL in nats at the
    answer position between the clean and steered distributions renormalized on every token but
    the answer (0 unsteered)."""

    answer_first: float
    answer_in_completion: float
    answer_logprob: float
    reference_f1: float
    perplexity: float
    off_target_kl: float

    def row(self) -> dict[str, float]:
        """The measures as a record's columns."""
        return asdict(self)


@torch.no_grad()
def qa_outcome(
    model: HookedTransformer,
    prompt: Int[Tensor, " pos"],
    answer: Sequence[int],
    intervention: Intervention | None = None,
    *,
    reference: Sequence[int] | Tensor | None = None,
    n_tokens: int = 12,
) -> QaOutcome:
    """How ``prompt`` (token ids) is answered under ``intervention`` (unsteered if None), for a
    one-token ``answer`` (its id, as a one-element sequence): see :class:`QaOutcome`. The greedy
    completion has ``n_tokens`` tokens, cut at the first end-of-sequence token."""
    answer = [int(t) for t in answer]
    if len(answer) != 1:
        raise InputError(
            f"the answer must be one token (its exact match and off-target KL are read at the "
            f"answer position), got {len(answer)} tokens {answer}; use a one-token answer, or "
            "score a longer one by its reference_f1 alone"
        )
    (target,) = answer
    if not 0 <= target < model.cfg.d_vocab:
        raise InputError(f"answer token {target} is not a token id in 0..{model.cfg.d_vocab - 1}")
    clean = model(prompt[None])[0, -1].double()
    steered = clean
    if intervention is not None:
        with intervention.apply(model):
            steered = model(prompt[None])[0, -1].double()
    got = completion(model, prompt, intervention, n_tokens)
    ref = [] if reference is None else [int(t) for t in reference]
    if reference is not None and not ref:
        raise InputError("the reference completion is empty: give its token ids, or None")
    return QaOutcome(
        answer_first=float(int(got[0]) == target),
        answer_in_completion=float(target in got.tolist()),
        answer_logprob=float(torch.log_softmax(steered, -1)[target]),
        reference_f1=token_f1(got, ref) if ref else math.nan,
        perplexity=completion_perplexity(model, prompt, got),
        off_target_kl=0.0 if intervention is None else complement_kl(clean, steered, [target]),
    )
