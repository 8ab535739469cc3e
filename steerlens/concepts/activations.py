"""Moved to :mod:`steerlens.activations`; the names resolve here, with a
:class:`DeprecationWarning`, until the next release."""

from typing import Any

from steerlens._moved import moved_attribute

_MOVED = {
    "harvest": "steerlens.activations",
}


def __getattr__(name: str) -> Any:
    return moved_attribute(__name__, name, _MOVED)
