"""Contrast-pair datasets: (prompt⁺, prompt⁻) strings for CAA, ActAdd, RepE and ITI.

This module owns the contrast-pair container and the builders that make pairs from concept data;
the steering methods take a :class:`ContrastPairs` and read activations of its two sides.

>>> cp = ContrastPairs.from_pairs([("I walked", "I walk")], name="past")
>>> cp.plus, cp.minus
(('I walked',), ('I walk',))
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from steerlens.concepts.contexts import VerbContext
from steerlens.concepts.tokens import word_text
from steerlens.errors import ConceptError


@dataclass(frozen=True)
class ContrastPairs:
    """A named list of (prompt⁺, prompt⁻) pairs: ⁺ shows the concept, ⁻ does not.

    ``token_pairs``, when given, holds the exact token ids of each side (no BOS), so that the
    activations read are those of the tokens the pair was built from rather than of a
    re-tokenization of the strings.
    """

    name: str
    pairs: tuple[tuple[str, str], ...]
    token_pairs: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...] | None = field(default=None)

    def __post_init__(self) -> None:
        if not self.pairs:
            raise ConceptError(f"contrast pairs {self.name!r} are empty: need at least one pair")
        for i, pair in enumerate(self.pairs):
            if len(pair) != 2 or not all(isinstance(s, str) and s.strip() for s in pair):
                raise ConceptError(
                    f"contrast pair {i} of {self.name!r} must be two non-empty strings, got "
                    f"{pair!r}"
                )
            if pair[0] == pair[1]:
                raise ConceptError(f"contrast pair {i} of {self.name!r} has identical sides")
        if self.token_pairs is not None and len(self.token_pairs) != len(self.pairs):
            raise ConceptError(
                f"contrast pairs {self.name!r}: {len(self.token_pairs)} token pairs for "
                f"{len(self.pairs)} pairs"
            )

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def plus(self) -> tuple[str, ...]:
        return tuple(p for p, _ in self.pairs)

    @property
    def minus(self) -> tuple[str, ...]:
        return tuple(m for _, m in self.pairs)

    @classmethod
    def from_pairs(
        cls, pairs: Iterable[tuple[str, str]] | Iterable[Sequence[str]], *, name: str = "pairs"
    ) -> ContrastPairs:
        """Pairs from any iterable of (prompt⁺, prompt⁻); :class:`ConceptError` if it is empty,
        or a pair is not two distinct non-empty strings."""
        items = []
        for i, pair in enumerate(pairs):
            if isinstance(pair, str) or len(pair) != 2:
                raise ConceptError(f"contrast pair {i} of {name!r} is not a (plus, minus) pair")
            items.append((pair[0], pair[1]))
        return cls(name=name, pairs=tuple(items))


def verb_contrast_pairs(
    contexts: Sequence[VerbContext], *, name: str = "verb pairs"
) -> ContrastPairs:
    """One pair per context: the context followed by the target form (⁺) vs by the base form
    (⁻), e.g. ``"... they walked"`` vs ``"... they walk"``. Token ids are kept exactly
    (context ids + target id, context ids + base id); duplicate pairs are kept once.

    >>> ctx = VerbContext("Then they", (5, 6), 7, 8, "▁walk", "▁walked", 0)
    >>> verb_contrast_pairs([ctx]).pairs
    (('Then they walked', 'Then they walk'),)
    """
    if not contexts:
        raise ConceptError(f"contrast pairs {name!r}: no contexts given")
    pairs: dict[tuple[str, str], tuple[tuple[int, ...], tuple[int, ...]]] = {}
    for c in contexts:
        key = (c.text + word_text(c.target_word), c.text + word_text(c.verb))
        pairs.setdefault(key, (c.token_ids + (c.target_id,), c.token_ids + (c.base_id,)))
    return ContrastPairs(name=name, pairs=tuple(pairs), token_pairs=tuple(pairs.values()))
