"""Verb-morphology data: the Park et al. verb pairs, made into token pairs and split by verb.

This module owns the packaged verb data (``steerlens/data/verb_morphology``: base form → past
tense, third person singular, present participle, or French infinitive; MIT, from Park, Nief,
Choe and Veitch, *The Information Geometry of Softmax*) and the train/test split *by verb*, so that
no verb seen in training is tested on.

>>> pairs = load_verb_pairs("past")
>>> pairs["▁walk"]
'▁walked'
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from typing import Any

from steerlens.concepts.pair_mapping import PairMapping
from steerlens.concepts.tokenization import SPACE_MARK
from steerlens.errors import ConceptError, InputError

VERB_KINDS: tuple[str, ...] = ("past", "third", "ing", "en_fr")
_DATA_PACKAGE = "steerlens"
_DATA_DIR = ("data", "verb_morphology")


def load_verb_pairs(kind: str) -> dict[str, str]:
    """``{base word: target word}`` for one kind of morphology (``"past"``, ``"third"``,
    ``"ing"`` or ``"en_fr"``), in the data's order; a leading ``"▁"`` is a leading space.

    >>> len(load_verb_pairs("ing")) > 1000
    True
    """
    if kind not in VERB_KINDS:
        raise InputError(f"unknown verb kind {kind!r}; valid kinds: {VERB_KINDS}")
    path = resources.files(_DATA_PACKAGE).joinpath(*_DATA_DIR, f"mapping_verb_{kind}.json")
    data: Any = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not data:
        raise ConceptError(f"verb data {path} is not a non-empty JSON object")
    return {str(k): str(v) for k, v in data.items()}


def verb_concept(
    model_or_tokenizer: Any, kind: str, *, drop_multi_token: bool = True
) -> PairMapping:
    """The verb pairs of one kind as single-token pairs of this model's tokenizer.

    With ``drop_multi_token`` (the default) pairs with a multi-token word, or that clash (same
    token for base and target, like ``" put" → " put"``; a token that is a base and a target)
    are left out and listed in ``dropped``; ``n_kept`` / ``n_dropped`` count them. Without it
    any such pair raises :class:`ConceptError`.
    """
    return PairMapping.from_words(
        model_or_tokenizer,
        load_verb_pairs(kind),
        name=f"verb_{kind}",
        drop_multi_token=drop_multi_token,
    )


def verb_key(word: str) -> str:
    """The verb a word belongs to, for splitting: no leading ``"▁"``/space, lower case.

    >>> verb_key("▁Walk")
    'walk'
    """
    return word.removeprefix(SPACE_MARK).strip().lower()


def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def split_by_verb(
    mapping: PairMapping, test_fraction: float = 0.3, seed: int = 0
) -> tuple[PairMapping, PairMapping]:
    """(train, test) mappings with no verb in both; the test side gets ``round(test_fraction ×
    n_verbs)`` verbs (at least one, and at least one left for training).

    Verbs are ranked by a seeded hash of :func:`verb_key` of the base word, so the split does not
    depend on the order of the pairs, and a verb tends to fall on the same side for every kind
    (past, third, ing) at the same seed.

    >>> m = PairMapping.from_ids({1: 2, 3: 4, 5: 6, 7: 8})
    >>> train, test = split_by_verb(m, 0.25)
    >>> len(train), len(test), set(train.bases) & set(test.bases)
    (3, 1, set())
    """
    if not 0 < test_fraction < 1:
        raise InputError(f"test_fraction must be in (0, 1), got {test_fraction}")
    verbs = sorted({verb_key(b) for b in mapping.base_words}, key=lambda v: _rank(seed, v))
    if len(verbs) < 2:
        raise ConceptError(
            f"{mapping.name!r} has {len(verbs)} verb(s): a split by verb needs at least two"
        )
    n_test = min(max(round(test_fraction * len(verbs)), 1), len(verbs) - 1)
    test_verbs = set(verbs[:n_test])
    is_test = [verb_key(b) in test_verbs for b in mapping.base_words]
    train = mapping.subset(
        [i for i, t in enumerate(is_test) if not t], name=mapping.name + "/train"
    )
    test = mapping.subset([i for i, t in enumerate(is_test) if t], name=mapping.name + "/test")
    return train, test
