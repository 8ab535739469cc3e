"""One exception hierarchy for steerlens.

Every error the toolkit raises on purpose is a :class:`SteerlensError`; each subclass also derives
from the builtin it refines (``ValueError``, ``KeyError``...) so ordinary ``except`` clauses keep
working.
"""

from __future__ import annotations


class SteerlensError(Exception):
    """Base class of every error steerlens raises on purpose."""


class SiteError(SteerlensError, ValueError):
    """An unknown, malformed or out-of-range site (hook, layer, head or position)."""


class ModelLoadError(SteerlensError, RuntimeError):
    """A model could not be loaded (unknown name, weights not available offline, bad cache)."""


class InputError(SteerlensError, ValueError):
    """Bad user input: prompts, tensors, shapes, dtypes or option values."""


class NonFiniteError(SteerlensError, FloatingPointError):
    """A NaN or infinite activation, logit, vector or metric."""


class MetricError(SteerlensError, ValueError):
    """A metric cannot be computed or used as asked (e.g. undamped solve of a singular metric)."""


class ConceptError(SteerlensError, ValueError):
    """An empty, multi-token or otherwise unusable concept."""


class MethodError(SteerlensError, ValueError):
    """A steering method was misconfigured or cannot reach what was asked."""


class ArtifactError(SteerlensError, ValueError):
    """A saved artifact is missing, truncated, tampered with or not what it claims to be."""
