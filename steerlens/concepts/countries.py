"""Moved to :mod:`steerlens.datasets.countries`; the names resolve here, with a
:class:`DeprecationWarning`, until the next release."""

from typing import Any

from steerlens._moved import moved_attribute

_MOVED = {
    "CITIES": "steerlens.datasets.countries",
    "TEMPLATE": "steerlens.datasets.countries",
    "CapitalFact": "steerlens.datasets.countries",
    "capital_facts": "steerlens.datasets.countries",
}


def __getattr__(name: str) -> Any:
    return moved_attribute(__name__, name, _MOVED)
