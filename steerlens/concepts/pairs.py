"""Contrast pairs: (prompt⁺, prompt⁻) strings for CAA, ActAdd, RepE and ITI.

This module owns the contrast-pair container; the steering methods take a :class:`ContrastPairs`
and read activations of its two sides. Builders that make pairs from data sets live with the data
(:func:`steerlens.datasets.verb_contrast_pairs`).

>>> cp = ContrastPairs.from_pairs([("I walked", "I walk")], name="past")
>>> cp.plus, cp.minus
(('I walked',), ('I walk',))
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from steerlens._moved import moved_attribute
from steerlens.errors import ConceptError

#: names that moved out, resolved here with a DeprecationWarning until the next release
_MOVED = {"verb_contrast_pairs": "steerlens.datasets.contexts"}


def __getattr__(name: str) -> Any:
    return moved_attribute(__name__, name, _MOVED)


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
