"""Moved to :mod:`steerlens.concepts` (tokenization, token_set, pair_mapping, pair_concept); the
names resolve here, with a :class:`DeprecationWarning`, until the next release."""

from typing import Any

from steerlens._moved import moved_attribute

_MOVED = {
    "SPACE_MARK": "steerlens.concepts.tokenization",
    "TokenizerLike": "steerlens.concepts.tokenization",
    "encode_word": "steerlens.concepts.tokenization",
    "tokenizer_of": "steerlens.concepts.tokenization",
    "word_text": "steerlens.concepts.tokenization",
    "log_target": "steerlens.concepts.base",
    "TokenSet": "steerlens.concepts.token_set",
    "log_prob_of_set": "steerlens.concepts.token_set",
    "PairMapping": "steerlens.concepts.pair_mapping",
    "PairConcept": "steerlens.concepts.pair_concept",
}


def __getattr__(name: str) -> Any:
    return moved_attribute(__name__, name, _MOVED)
