"""Moved to :mod:`steerlens.diagnostics.cost` and :mod:`steerlens.diagnostics.path`; the names
resolve here, with a :class:`DeprecationWarning`, until the next release."""

from typing import Any

from steerlens._moved import moved_attribute

_MOVED = {
    "PathRho": "steerlens.diagnostics.cost",
    "kantorovich_bound": "steerlens.diagnostics.cost",
    "optimal_quad": "steerlens.diagnostics.cost",
    "spectral_cost_ratio": "steerlens.diagnostics.cost",
    "fisher_length": "steerlens.diagnostics.path",
    "fisher_rao": "steerlens.diagnostics.path",
}


def __getattr__(name: str) -> Any:
    return moved_attribute(__name__, name, _MOVED)
