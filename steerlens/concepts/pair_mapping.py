"""Pair-mapping concepts: a set of base → target token pairs (" walk" → " walked").

A :class:`PairMapping` is the dual-steering / verb-morphology concept "turn each base form into
its target form"; it also yields the two off-target transforms of the metric
(:class:`~steerlens.metric.outcomes.OffTarget`): the complement of the targets, and each base's
mass merged into its target.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from html import escape
from typing import Any

import pandas as pd

from steerlens.concepts.token_set import TokenSet
from steerlens.concepts.tokenization import check_ids, describe_words, encode_word, tokenizer_of
from steerlens.errors import ConceptError
from steerlens.metric.outcomes import OffTarget


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

        >>> from steerlens.testing import WhitespaceTokenizer
        >>> tok = WhitespaceTokenizer([" walk", " walked", " run", " ran", " put"])
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
            dropped.append((base, target, "not a single token: " + describe_words(tok, multi)))
        if bad and not drop_multi_token:
            raise ConceptError(
                f"pair mapping {name!r}: {len(dropped)} pairs have words that are not a single "
                f"token: {describe_words(tok, bad)}. Pass drop_multi_token=True to leave them out."
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
        bases = check_ids([b for b, _ in items], d_vocab, f"pair mapping {name!r}")
        targets = check_ids([t for _, t in items], d_vocab, f"pair mapping {name!r}")
        words = tuple((f"<{b}>", f"<{t}>") for b, t in zip(bases, targets, strict=True))
        return cls(name=name, bases=bases, targets=targets, pairs_words=words)
