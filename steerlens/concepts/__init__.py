"""Concepts: the scalars a user wants to move, as types the steering methods take.

A concept is a token set S (c = log Σ_{y∈S} p_y, :func:`log_prob_of_set`), a base → target
:class:`PairMapping` (the verb-morphology concepts of Park et al.), one base/target
:class:`PairConcept`, a :class:`ContrastPairs` set for the contrastive methods, a linear probe
(:mod:`.probes`) or an SAE feature (:mod:`.sae`). The data they are made from lives in
:mod:`steerlens.datasets`.
"""

from typing import Any

from steerlens._moved import moved_attribute
from steerlens.concepts.base import Concept
from steerlens.concepts.pair_concept import PairConcept
from steerlens.concepts.pair_mapping import PairMapping
from steerlens.concepts.pairs import ContrastPairs
from steerlens.concepts.token_set import TokenSet, log_prob_of_set
from steerlens.concepts.tokenization import encode_word, tokenizer_of, word_text

#: data-set names this package re-exported before they moved to :mod:`steerlens.datasets`; they
#: resolve here, with a DeprecationWarning, until the next release
_MOVED: dict[str, str] = dict.fromkeys(
    (
        "VERB_KINDS",
        "ContextSplit",
        "TextSource",
        "VerbContext",
        "clean_text",
        "contexts_frame",
        "iter_sentences",
        "load_corpus",
        "load_verb_pairs",
        "local_text_sources",
        "split_by_verb",
        "split_sentences",
        "train_test_contexts",
        "verb_concept",
        "verb_contexts",
        "verb_contrast_pairs",
        "verb_key",
    ),
    "steerlens.datasets",
)


def __getattr__(name: str) -> Any:
    return moved_attribute(__name__, name, _MOVED)


__all__ = [
    "Concept",
    "ContrastPairs",
    "PairConcept",
    "PairMapping",
    "TokenSet",
    "encode_word",
    "log_prob_of_set",
    "tokenizer_of",
    "word_text",
]
