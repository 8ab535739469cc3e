"""Moved to :mod:`steerlens.datasets.verbs`; the names resolve here, with a
:class:`DeprecationWarning`, until the next release."""

from typing import Any

from steerlens._moved import moved_attribute

_MOVED = {
    "VERB_KINDS": "steerlens.datasets.verbs",
    "load_verb_pairs": "steerlens.datasets.verbs",
    "split_by_verb": "steerlens.datasets.verbs",
    "verb_concept": "steerlens.datasets.verbs",
    "verb_key": "steerlens.datasets.verbs",
}


def __getattr__(name: str) -> Any:
    return moved_attribute(__name__, name, _MOVED)
