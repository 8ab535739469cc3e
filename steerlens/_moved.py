"""Names whose module moved: read from the old module for one release, with a warning."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Mapping
from typing import Any


def moved_attribute(old: str, name: str, moved: Mapping[str, str]) -> Any:
    """``name`` from its new module ``moved[name]``, warning that ``old.name`` is deprecated
    (the body of an old module's ``__getattr__``)."""
    if name not in moved:
        raise AttributeError(f"module {old!r} has no attribute {name!r}")
    new = moved[name]
    warnings.warn(
        f"{old}.{name} moved to {new}.{name}; the old path goes in the next release",
        DeprecationWarning,
        stacklevel=3,
    )
    return getattr(importlib.import_module(new), name)
