"""Moved to :mod:`steerlens.testing` (test support); the names resolve here, with a
:class:`DeprecationWarning`, until the next release."""

from typing import Any

from steerlens._moved import moved_attribute

_MOVED = {
    "FLAVOURS": "steerlens.testing",
    "Flavour": "steerlens.testing",
    "tiny_config": "steerlens.testing",
    "tiny_model": "steerlens.testing",
}


def __getattr__(name: str) -> Any:
    return moved_attribute(__name__, name, _MOVED)
