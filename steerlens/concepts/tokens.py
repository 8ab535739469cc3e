"""Token-set concepts: which tokens a concept is about, and the concept value c = log Σ_{y∈S} p_y.

This module owns turning *words* into *token ids* for one tokenizer, and saying so loudly when a
word is not exactly one token. A :class:`TokenSet` is a set of single tokens (the concept "the next
token is one of these"); a :class:`PairMapping` is a set of base → target token pairs (the dual
steering / verb-morphology concept "turn each base form into its target form"), which also yields
the two off-target transforms of the metric (:class:`~steerlens.metric.outcomes.OffTarget`).

Words follow the convention of the Park et al. data: a leading ``"▁"`` (U+2581) stands for a
leading space, so ``"▁walk"`` is tokenized as ``" walk"``; any other string is taken literally.
Words are tokenized without a beginning-of-sequence token.

>>> tok = _WhitespaceTokenizer(["<bos>", " walk", " walked", " run"])
>>> ts = TokenSet.from_words(tok, ["▁walk", "▁run"], name="verbs")
>>> ts.ids, ts.words
((1, 3), ('▁walk', '▁run'))
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Any, Protocol

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from steerlens.errors import ConceptError, InputError
from steerlens.metric.outcomes import OffTarget

SPACE_MARK = "\u2581"


class TokenizerLike(Protocol):
    """The part of a Hugging Face tokenizer this module uses."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


def tokenizer_of(model_or_tokenizer: Any) -> TokenizerLike:
    """The tokenizer of a HookedTransformer (its ``.tokenizer``), or the argument itself if it
    already has an ``encode`` method. Raises :class:`ConceptError` for a model without one.

    >>> tok = _WhitespaceTokenizer([" a"])
    >>> tokenizer_of(tok) is tok
    True
    """
    if hasattr(model_or_tokenizer, "cfg") and hasattr(model_or_tokenizer, "tokenizer"):
        tok = model_or_tokenizer.tokenizer
        if tok is None:
            raise ConceptError(
                "the model has no tokenizer, so words cannot be mapped to tokens: "
                "use TokenSet.from_ids / PairMapping.from_ids instead"
            )
        return tok
    if callable(getattr(model_or_tokenizer, "encode", None)):
        return model_or_tokenizer
    raise InputError(
        f"expected a HookedTransformer or a tokenizer with an encode method, got "
        f"{type(model_or_tokenizer).__name__}"
    )


def word_text(word: str) -> str:
    """The literal text of a word: a leading ``"▁"`` becomes a space.

    >>> word_text("▁walk"), word_text("walk")
    (' walk', 'walk')
    """
    if word.startswith(SPACE_MARK):
        return " " + word[len(SPACE_MARK) :]
    return word


def encode_word(tokenizer: TokenizerLike, word: str) -> tuple[int, ...]:
    """The token ids of one word (``"▁"`` = leading space), with no special tokens."""
    if not isinstance(word, str) or not word_text(word).strip():
        raise ConceptError(f"a concept word must be a non-empty string, got {word!r}")
    ids = [int(i) for i in tokenizer.encode(word_text(word), add_special_tokens=False)]
    # Some tokenizers prepend BOS regardless of add_special_tokens.
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and len(ids) > 1 and ids[0] == bos:
        ids = ids[1:]
    return tuple(ids)


def _pieces(tokenizer: TokenizerLike, ids: Sequence[int]) -> list[str]:
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    if callable(convert):
        pieces: Any = convert(list(ids))
        return [str(p) for p in pieces]
    return [str(i) for i in ids]


def _describe(tokenizer: TokenizerLike, bad: Sequence[tuple[str, tuple[int, ...]]]) -> str:
    shown = [f"{w!r} -> {_pieces(tokenizer, ids)}" for w, ids in bad[:20]]
    more = f" (and {len(bad) - 20} more)" if len(bad) > 20 else ""
    return "; ".join(shown) + more


def _check_ids(ids: Sequence[int], d_vocab: int | None, what: str) -> tuple[int, ...]:
    out = tuple(int(i) for i in ids)
    bad = [i for i in out if i < 0 or (d_vocab is not None and i >= d_vocab)]
    if bad:
        valid = f"[0, {d_vocab})" if d_vocab is not None else "non-negative"
        raise InputError(f"{what}: token ids {bad[:10]} are out of range; valid ids are {valid}")
    return out


def log_target(probability: float) -> float:
    """log p of a target probability p in (0, 1), the value of a log-probability concept."""
    if not 0 < probability < 1:
        raise InputError(f"target probability must be in (0, 1), got {probability}")
    return math.log(probability)


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
                f"{_describe(tok, bad)}. Pass drop_multi_token=True to leave them out."
            )
        if not ids:
            raise ConceptError(
                f"token set {name!r} is empty: no word is a single token"
                + (f" ({_describe(tok, bad)})" if bad else "")
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
        checked = _check_ids(list(ids), d_vocab, f"token set {name!r}")
        labels = tuple(words) if words is not None else tuple(f"<{i}>" for i in checked)
        return cls(name=name, ids=checked, words=labels)

    def check(self, d_vocab: int) -> None:
        """Raise :class:`InputError` if an id is outside ``[0, d_vocab)``."""
        _check_ids(self.ids, d_vocab, f"token set {self.name!r}")

    def as_tensor(self, device: torch.device | str | None = None) -> Int[Tensor, " n"]:
        """The ids as a 1-D int64 tensor."""
        return torch.tensor(self.ids, dtype=torch.long, device=device)

    def off_target(self) -> OffTarget:
        """The off-target transform of this concept: p on the complement of S, renormalized."""
        return OffTarget.complement(self.ids)

    def value(
        self, act: Float[Tensor, "... dim"], logits: Float[Tensor, "... d_vocab"]
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


@dataclass(frozen=True)
class PairMapping:
    """A base → target token mapping (one pair per verb, say: " walk" → " walked").

    ``bases[i]`` maps to ``targets[i]``; ``pairs_words[i]`` are the words they came from.
    ``dropped`` lists (base word, target word, reason) of every pair left out, so that the counts
    kept / dropped are on the object (:attr:`n_kept`, :attr:`n_dropped`).
    """

    name: str
    bases: tuple[int, ...]
    targets: tuple[int, ...]
    pairs_words: tuple[tuple[str, str], ...]
    dropped: tuple[tuple[str, str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.bases:
            raise ConceptError(f"pair mapping {self.name!r} is empty: it needs at least one pair")
        if not len(self.bases) == len(self.targets) == len(self.pairs_words):
            raise ConceptError(
                f"pair mapping {self.name!r}: bases, targets and words differ in length"
            )
        if len(set(self.bases)) != len(self.bases):
            raise ConceptError(f"pair mapping {self.name!r} has a repeated base token")
        both = set(self.bases) & set(self.targets)
        if both:
            raise ConceptError(
                f"pair mapping {self.name!r}: tokens {sorted(both)[:10]} are both a base and a "
                "target"
            )

    def __len__(self) -> int:
        return len(self.bases)

    def __repr__(self) -> str:
        shown = ", ".join(f"{b!r} → {t!r}" for b, t in self.pairs_words[:3])
        more = ", ..." if len(self.bases) > 3 else ""
        return (
            f"PairMapping({self.name!r}, {self.n_kept} pairs kept [{shown}{more}], "
            f"{self.n_dropped} dropped)"
        )

    def _repr_html_(self) -> str:
        rows = pd.DataFrame(
            {
                "base": [b for b, _ in self.pairs_words[:10]],
                "target": [t for _, t in self.pairs_words[:10]],
                "base_id": self.bases[:10],
                "target_id": self.targets[:10],
            }
        )
        return f"<p><b>{escape(repr(self))}</b></p>" + rows.to_html(index=False)

    @property
    def n_kept(self) -> int:
        return len(self.bases)

    @property
    def n_dropped(self) -> int:
        return len(self.dropped)

    @property
    def base_words(self) -> tuple[str, ...]:
        return tuple(b for b, _ in self.pairs_words)

    @property
    def target_words(self) -> tuple[str, ...]:
        return tuple(t for _, t in self.pairs_words)

    def as_dict(self) -> dict[int, int]:
        """``{base id: target id}``."""
        return dict(zip(self.bases, self.targets, strict=True))

    def target_of(self, base_id: int) -> int:
        """The target id of one base id; :class:`ConceptError` if it is not a base."""
        try:
            return self.targets[self.bases.index(int(base_id))]
        except ValueError:
            raise ConceptError(f"token {base_id} is not a base of {self.name!r}") from None

    def base_set(self) -> TokenSet:
        return TokenSet(self.name + " (bases)", self.bases, self.base_words)

    def target_set(self) -> TokenSet:
        return TokenSet.from_ids(
            dict.fromkeys(self.targets),
            name=self.name + " (targets)",
            words=tuple(dict(zip(self.targets, self.target_words, strict=True)).values()),
        )

    def off_target_complement(self) -> OffTarget:
        """p on the complement of the target tokens, renormalized."""
        return OffTarget.complement(self.targets)

    def off_target_merge(self) -> OffTarget:
        """Each base token's mass merged into its target (the dual-steering definition)."""
        return OffTarget.pair_merge(self.as_dict())

    def subset(self, indices: Iterable[int], *, name: str | None = None) -> PairMapping:
        """The pairs at ``indices`` (in that order), with no dropped list."""
        idx = list(indices)
        return PairMapping(
            name=name or self.name,
            bases=tuple(self.bases[i] for i in idx),
            targets=tuple(self.targets[i] for i in idx),
            pairs_words=tuple(self.pairs_words[i] for i in idx),
        )

    @classmethod
    def from_words(
        cls,
        model_or_tokenizer: Any,
        pairs: Mapping[str, str] | Iterable[tuple[str, str]],
        *,
        name: str = "pair mapping",
        drop_multi_token: bool = False,
    ) -> PairMapping:
        """Each (base word, target word) as a pair of single tokens of this tokenizer.

        A pair with a word that is not one token raises :class:`ConceptError` naming them all,
        unless ``drop_multi_token``; then the pair is listed in ``dropped`` with the reason, as
        are pairs that would make the mapping inconsistent (base token = target token, a token
        that is both a base and a target, a base token already used).

        >>> tok = _WhitespaceTokenizer([" walk", " walked", " run", " ran", " put"])
        >>> m = PairMapping.from_words(tok, {"▁walk": "▁walked", "▁run": "▁ran",
        ...                                  "▁put": "▁put"}, drop_multi_token=True)
        >>> m.as_dict(), m.n_kept, m.dropped
        ({0: 1, 2: 3}, 2, (('▁put', '▁put', 'base and target are the same token'),))
        """
        tok = tokenizer_of(model_or_tokenizer)
        items: list[tuple[str, str]] = list(
            pairs.items() if isinstance(pairs, Mapping) else pairs  # type: ignore[arg-type]
        )
        encoded: list[tuple[str, str, tuple[int, ...], tuple[int, ...]]] = []
        bad: list[tuple[str, tuple[int, ...]]] = []
        dropped: list[tuple[str, str, str]] = []
        for base, target in items:
            b, t = encode_word(tok, base), encode_word(tok, target)
            if len(b) == 1 and len(t) == 1:
                encoded.append((base, target, b, t))
                continue
            multi = [(w, e) for w, e in ((base, b), (target, t)) if len(e) != 1]
            bad.extend(multi)
            dropped.append((base, target, "not a single token: " + _describe(tok, multi)))
        if bad and not drop_multi_token:
            raise ConceptError(
                f"pair mapping {name!r}: {len(dropped)} pairs have words that are not a single "
                f"token: {_describe(tok, bad)}. Pass drop_multi_token=True to leave them out."
            )
        all_bases = {b[0] for _, _, b, _ in encoded}
        all_targets = {t[0] for _, _, _, t in encoded}
        bases: list[int] = []
        targets: list[int] = []
        words: list[tuple[str, str]] = []
        conflicts: list[tuple[str, str, str]] = []
        for base, target, (b,), (t,) in encoded:
            if b == t:
                reason = "base and target are the same token"
            elif b in all_targets or t in all_bases:
                reason = "a token is both a base and a target of the mapping"
            elif b in bases:
                reason = f"base token {b} already maps to {targets[bases.index(b)]}"
            else:
                bases.append(b)
                targets.append(t)
                words.append((base, target))
                continue
            conflicts.append((base, target, reason))
        if conflicts and not drop_multi_token:
            shown = "; ".join(f"{b!r} -> {t!r}: {r}" for b, t, r in conflicts[:20])
            raise ConceptError(
                f"pair mapping {name!r}: {len(conflicts)} inconsistent pairs ({shown}). "
                "Pass drop_multi_token=True to leave them out."
            )
        if not bases:
            raise ConceptError(f"pair mapping {name!r} is empty: no pair of single tokens is left")
        return cls(
            name=name,
            bases=tuple(bases),
            targets=tuple(targets),
            pairs_words=tuple(words),
            dropped=tuple(dropped + conflicts),
        )

    @classmethod
    def from_ids(
        cls,
        pairs: Mapping[int, int] | Iterable[tuple[int, int]],
        *,
        name: str = "pair mapping",
        d_vocab: int | None = None,
    ) -> PairMapping:
        """A mapping from (base id, target id) pairs, checked against ``d_vocab`` when given.

        >>> PairMapping.from_ids({3: 4, 5: 6}, d_vocab=48).targets
        (4, 6)
        """
        items: list[tuple[int, int]] = list(
            pairs.items() if isinstance(pairs, Mapping) else pairs  # type: ignore[arg-type]
        )
        bases = _check_ids([b for b, _ in items], d_vocab, f"pair mapping {name!r}")
        targets = _check_ids([t for _, t in items], d_vocab, f"pair mapping {name!r}")
        words = tuple((f"<{b}>", f"<{t}>") for b, t in zip(bases, targets, strict=True))
        return cls(name=name, bases=bases, targets=targets, pairs_words=words)


@dataclass(frozen=True)
class PairConcept:
    """The target's share of one base/target pair: c = log p_t − log(p_t + p_b).

    This is Park et al.'s stopping rule for dual steering (p_t / (p_t + p_b) above a threshold):
    a context whose next token would be the base form is steered to the target form. Its
    off-target distribution is p renormalized on every token but the two.

    >>> c = PairConcept(base=0, target=1)
    >>> round(float(c.value(None, torch.tensor([0.0, 0.0, 5.0])).exp()), 3)
    0.5
    """

    base: int
    target: int
    name: str = ""

    def __post_init__(self) -> None:
        if self.base == self.target:
            raise ConceptError(f"pair concept: base and target are the same token {self.base}")
        if min(self.base, self.target) < 0:
            raise InputError(f"pair concept: negative token id in ({self.base}, {self.target})")
        if not self.name:
            object.__setattr__(self, "name", f"{self.target} over {self.base}")

    def value(self, act: Tensor | None, logits: Float[Tensor, "... d_vocab"]) -> Tensor:
        if max(self.base, self.target) >= logits.shape[-1]:
            raise InputError(f"pair concept ids out of range for d_vocab={logits.shape[-1]}")
        pair = logits[..., [self.target, self.base]]
        return pair[..., 0] - torch.logsumexp(pair, -1)

    def target_value(self, probability: float) -> float:
        return log_target(probability)

    def probability(self, value: float) -> float:
        return math.exp(value)

    def off_target(self) -> OffTarget:
        """p on every token but the base and the target, renormalized."""
        return OffTarget.complement([self.base, self.target])


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


class _WhitespaceTokenizer:
    """A tiny stand-in tokenizer for examples and tests: a fixed vocabulary of strings, greedy
    longest match from the left; a character matching nothing is its own token,
    ``len(vocab) + ord(char)``. Not part of the public API."""

    def __init__(self, vocab: Sequence[str], bos_token_id: int | None = None) -> None:
        self.vocab = list(vocab)
        self.bos_token_id = bos_token_id
        self._index = {piece: i for i, piece in enumerate(self.vocab)}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        out: list[int] = []
        rest = text
        while rest:
            for end in range(len(rest), 0, -1):
                if rest[:end] in self._index:
                    out.append(self._index[rest[:end]])
                    rest = rest[end:]
                    break
            else:
                out.append(len(self.vocab) + ord(rest[0]))
                rest = rest[1:]
        if add_special_tokens and self.bos_token_id is not None:
            out.insert(0, self.bos_token_id)
        return out

    def _piece(self, i: int) -> str:
        return self.vocab[i] if i < len(self.vocab) else chr(i - len(self.vocab))

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self._piece(int(i)) for i in ids)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self._piece(int(i)) for i in ids]
