"""Token-set concepts: the next token is one of a set S, with value c = log Σ_{y∈S} p_y.

A :class:`TokenSet` is a set of single tokens of one tokenizer (words that are not one token are
refused or listed in ``dropped``, never left out silently); :func:`log_prob_of_set` is its value.

>>> from steerlens.testing import WhitespaceTokenizer
>>> tok = WhitespaceTokenizer(["<bos>", " walk", " walked", " run"])
>>> ts = TokenSet.from_words(tok, ["▁walk", "▁run"], name="verbs")
>>> ts.ids, ts.words
((1, 3), ('▁walk', '▁run'))
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from html import escape
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from steerlens.concepts.base import log_target
from steerlens.concepts.tokenization import check_ids, describe_words, encode_word, tokenizer_of
from steerlens.errors import ConceptError, InputError
from steerlens.metric.outcomes import OffTarget

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer
    from steerlens.sites import Site


@dataclass(frozen=True)
class TokenSet:
    """A token-set concept S: the next token is one of ``ids``.

    ``words[i]`` is the word ``ids[i]`` came from (the decoded token for :meth:`from_ids`).
    ``dropped`` lists (word, its token ids) of the words left out because they were not a single
    token, so nothing is dropped silently.
    """

    name: str
    ids: tuple[int, ...]
    words: tuple[str, ...]
    dropped: tuple[tuple[str, tuple[int, ...]], ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.ids:
            raise ConceptError(f"token set {self.name!r} is empty: a concept needs at least one")
        if len(self.words) != len(self.ids):
            raise ConceptError(
                f"token set {self.name!r}: {len(self.ids)} ids but {len(self.words)} words"
            )
        if len(set(self.ids)) != len(self.ids):
            raise ConceptError(f"token set {self.name!r} has repeated token ids")

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        shown = ", ".join(repr(w) for w in self.words[:4])
        more = ", ..." if len(self.ids) > 4 else ""
        return (
            f"TokenSet({self.name!r}, {len(self.ids)} tokens [{shown}{more}], "
            f"{len(self.dropped)} words dropped)"
        )

    def _repr_html_(self) -> str:
        rows = pd.DataFrame({"word": self.words[:10], "id": self.ids[:10]})
        return f"<p><b>{escape(repr(self))}</b></p>" + rows.to_html(index=False)

    @classmethod
    def from_words(
        cls,
        model_or_tokenizer: Any,
        words: Iterable[str],
        *,
        name: str = "token set",
        drop_multi_token: bool = False,
    ) -> TokenSet:
        """Each word as one token of this tokenizer.

        A word that is not exactly one token raises :class:`ConceptError` naming every such word
        and its tokenization, unless ``drop_multi_token`` is set: then it is left out and listed
        in ``dropped``. Words that give a token already in the set are merged into it.
        """
        tok = tokenizer_of(model_or_tokenizer)
        ids: list[int] = []
        kept: list[str] = []
        bad: list[tuple[str, tuple[int, ...]]] = []
        for word in words:
            enc = encode_word(tok, word)
            if len(enc) != 1:
                bad.append((word, enc))
            elif enc[0] not in ids:
                ids.append(enc[0])
                kept.append(word)
        if bad and not drop_multi_token:
            raise ConceptError(
                f"token set {name!r}: {len(bad)} words are not a single token: "
                f"{describe_words(tok, bad)}. Pass drop_multi_token=True to leave them out."
            )
        if not ids:
            raise ConceptError(
                f"token set {name!r} is empty: no word is a single token"
                + (f" ({describe_words(tok, bad)})" if bad else "")
            )
        return cls(name=name, ids=tuple(ids), words=tuple(kept), dropped=tuple(bad))

    @classmethod
    def from_ids(
        cls,
        ids: Iterable[int],
        *,
        name: str = "token set",
        words: Sequence[str] | None = None,
        d_vocab: int | None = None,
    ) -> TokenSet:
        """A token set from ids (checked against ``d_vocab`` when given); ``words`` default to
        ``"<id>"`` labels.

        >>> TokenSet.from_ids([4, 7], d_vocab=48).words
        ('<4>', '<7>')
        """
        checked = check_ids(list(ids), d_vocab, f"token set {name!r}")
        labels = tuple(words) if words is not None else tuple(f"<{i}>" for i in checked)
        return cls(name=name, ids=checked, words=labels)

    def check(self, d_vocab: int) -> None:
        """Raise :class:`InputError` if an id is outside ``[0, d_vocab)``."""
        check_ids(self.ids, d_vocab, f"token set {self.name!r}")

    def as_tensor(self, device: torch.device | str | None = None) -> Int[Tensor, " n"]:
        """The ids as a 1-D int64 tensor."""
        return torch.tensor(self.ids, dtype=torch.long, device=device)

    def off_target(self) -> OffTarget:
        """The off-target transform of this concept: p on the complement of S, renormalized."""
        return OffTarget.complement(self.ids)

    def check_site(self, site: str | Site, model: HookedTransformer) -> None:
        """Nothing to check: the concept is read at the output, reachable from any site."""

    def value(
        self, act: Float[Tensor, "... dim"] | None, logits: Float[Tensor, "... d_vocab"]
    ) -> Float[Tensor, "..."]:
        """The concept value c = log Σ_{y∈S} p_y from the logits (``act`` is unused: a token
        set is read at the output). Differentiable."""
        return log_prob_of_set(logits, self)

    def target_value(self, probability: float) -> float:
        """The value c that means "the set holds ``probability`` of the mass": log p."""
        return log_target(probability)

    def probability(self, value: float) -> float:
        """The mass on the set for a concept value: exp(c)."""
        return math.exp(value)


def log_prob_of_set(
    logits: Float[Tensor, "... d_vocab"],
    ids: TokenSet | Sequence[int] | Int[Tensor, " n"],
) -> Float[Tensor, "..."]:
    """The concept value c = log Σ_{y∈S} p_y with p = softmax(logits), in nats; differentiable.

    >>> logits = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]])
    >>> log_prob_of_set(logits, [1, 2]).exp()
    tensor([0.9100, 0.6667])
    """
    if isinstance(ids, TokenSet):
        index = ids.as_tensor(logits.device)
    elif isinstance(ids, Tensor):
        index = ids.to(device=logits.device, dtype=torch.long).reshape(-1)
    else:
        index = torch.tensor([int(i) for i in ids], dtype=torch.long, device=logits.device)
    if index.numel() == 0:
        raise ConceptError("log_prob_of_set needs at least one token id")
    d_vocab = logits.shape[-1]
    if int(index.min()) < 0 or int(index.max()) >= d_vocab:
        raise InputError(
            f"token ids {index.tolist()[:10]} are out of range for logits with d_vocab={d_vocab}"
        )
    index = torch.unique(index)
    return torch.logsumexp(logits[..., index], -1) - torch.logsumexp(logits, -1)
