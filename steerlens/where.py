"""Moved to :mod:`steerlens.diagnostics.sites`; the names resolve here, with a
:class:`DeprecationWarning`, until the next release."""

from typing import Any

from steerlens._moved import moved_attribute

_MOVED = {
    "WHERE_KINDS": "steerlens.diagnostics.sites",
    "concept_gradients": "steerlens.diagnostics.sites",
    "site_costs": "steerlens.diagnostics.sites",
}


def __getattr__(name: str) -> Any:
    return moved_attribute(__name__, name, _MOVED)
