"""Concepts: the scalars a user wants to move, as types the steering methods take.

A concept is a token set S (c = log Σ_{y∈S} p_y, :func:`log_prob_of_set`), a base → target
:class:`PairMapping` (the verb-morphology concepts of Park et al.), one base/target
:class:`PairConcept`, a :class:`ContrastPairs` set for the contrastive methods, a linear probe
(:mod:`.probes`) or an SAE feature (:mod:`.sae`). The data they are made from lives in
:mod:`steerlens.datasets`.
"""

from steerlens.concepts.base import Concept
from steerlens.concepts.pair_concept import PairConcept
from steerlens.concepts.pair_mapping import PairMapping
from steerlens.concepts.pairs import ContrastPairs
from steerlens.concepts.token_set import TokenSet, log_prob_of_set
from steerlens.concepts.tokenization import encode_word, tokenizer_of, word_text

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
