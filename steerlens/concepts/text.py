"""Moved to :mod:`steerlens.datasets.text` (the R decoder to :mod:`steerlens.datasets.rdata`); the
names resolve here, with a :class:`DeprecationWarning`, until the next release."""

from typing import Any

from steerlens._moved import moved_attribute

_MOVED = {
    "UNITS": "steerlens.datasets.text",
    "TextSource": "steerlens.datasets.text",
    "clean_text": "steerlens.datasets.text",
    "iter_sentences": "steerlens.datasets.text",
    "load_corpus": "steerlens.datasets.text",
    "local_text_sources": "steerlens.datasets.text",
    "split_sentences": "steerlens.datasets.text",
    "read_r_character_vectors": "steerlens.datasets.rdata",
}


def __getattr__(name: str) -> Any:
    return moved_attribute(__name__, name, _MOVED)
