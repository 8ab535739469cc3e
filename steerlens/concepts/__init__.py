"""Concepts: token sets and pair mappings, verb morphology data, local text, natural contexts and
contrast pairs.

A concept is a scalar the user wants to move. Here it is a token set S (c = log Σ_{y∈S} p_y,
:func:`log_prob_of_set`), a base → target :class:`PairMapping` (the verb-morphology concepts of
Park et al.), or a :class:`ContrastPairs` dataset for the contrastive methods.
"""

from steerlens.concepts.contexts import (
    ContextSplit,
    VerbContext,
    contexts_frame,
    train_test_contexts,
    verb_contexts,
)
from steerlens.concepts.pairs import ContrastPairs, verb_contrast_pairs
from steerlens.concepts.text import (
    TextSource,
    clean_text,
    iter_sentences,
    load_corpus,
    local_text_sources,
    split_sentences,
)
from steerlens.concepts.tokens import (
    PairConcept,
    PairMapping,
    TokenSet,
    encode_word,
    log_prob_of_set,
    tokenizer_of,
    word_text,
)
from steerlens.concepts.verbs import (
    VERB_KINDS,
    load_verb_pairs,
    split_by_verb,
    verb_concept,
    verb_key,
)

__all__ = [
    "VERB_KINDS",
    "ContextSplit",
    "ContrastPairs",
    "PairConcept",
    "PairMapping",
    "TextSource",
    "TokenSet",
    "VerbContext",
    "clean_text",
    "contexts_frame",
    "encode_word",
    "iter_sentences",
    "load_corpus",
    "load_verb_pairs",
    "local_text_sources",
    "log_prob_of_set",
    "split_by_verb",
    "split_sentences",
    "tokenizer_of",
    "train_test_contexts",
    "verb_concept",
    "verb_contexts",
    "verb_contrast_pairs",
    "verb_key",
    "word_text",
]
