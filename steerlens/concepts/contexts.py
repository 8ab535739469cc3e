"""Moved to :mod:`steerlens.datasets.contexts`; the names resolve here, with a
:class:`DeprecationWarning`, until the next release."""

from typing import Any

from steerlens._moved import moved_attribute

_MOVED = {
    "ContextSplit": "steerlens.datasets.contexts",
    "VerbContext": "steerlens.datasets.contexts",
    "contexts_frame": "steerlens.datasets.contexts",
    "train_test_contexts": "steerlens.datasets.contexts",
    "verb_contexts": "steerlens.datasets.contexts",
}


def __getattr__(name: str) -> Any:
    return moved_attribute(__name__, name, _MOVED)
