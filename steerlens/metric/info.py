"""How a metric was computed: :class:`MetricInfo`, the record a
:class:`~steerlens.metric.core.Metric` and a :class:`~steerlens.metric.pullback.Sweep` carry as
``info``, read by attribute.

>>> info = MetricInfo("auto", 1e-4, top_k=812, n_prompts=3)
>>> info.top_k, info.depth
(812, None)
>>> info.recorded()
{'vocab': 'auto', 'dropped_mass': 0.0001, 'top_k': 812, 'n_prompts': 3}

For one release ``info["top_k"]``, ``info.get(...)``, ``info.keys()`` and ``info.items()`` still
read it as the mapping it used to be, with a :class:`DeprecationWarning` naming the attribute.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import ItemsView, Iterator, KeysView, ValuesView
from dataclasses import asdict, dataclass, fields
from typing import Any

from steerlens.errors import InputError

#: what ``vocab`` records: the exact modes of :func:`~steerlens.metric.outcomes.unembed_factor`
#: (``"auto"``: top-K outcomes and a rest row; ``"full"``) and the sampled Fisher
VOCABS = ("auto", "full", "sampled")


@dataclass(frozen=True)
class MetricInfo:
    """How a metric was computed. None marks a field that does not apply.

    Attributes:
        vocab: how the output distribution's factor was formed, one of :data:`VOCABS`.
        dropped_mass: probability mass of the outcomes left out of the top K, the largest over
            prompts (0 for ``"full"`` and ``"sampled"``).
        top_k: outcomes kept, the largest over prompts (for ``"sampled"``: distinct outcomes
            drawn); None for a dataset mean, which does not record it.
        mean_dropped_mass: ``dropped_mass`` averaged over prompts, where recorded.
        n_prompts: prompts averaged.
        depth: blocks pulled back through before reading the residual into the unembedding
            (None: the whole model).
        off_target: the name of the off-target transform (None: the plain distribution).
        samples: outcomes drawn per prompt for the sampled Fisher (None: exact).
        seed: the seed of those draws (None: exact).
        world_size: processes a dataset mean was sharded over.
        rank: the rank of a truncated factor (None: not truncated).
    """

    vocab: str
    dropped_mass: float
    top_k: int | None = None
    mean_dropped_mass: float | None = None
    n_prompts: int = 1
    depth: int | None = None
    off_target: str | None = None
    samples: int | None = None
    seed: int | None = None
    world_size: int | None = None
    rank: int | None = None

    def __post_init__(self) -> None:
        if self.vocab not in VOCABS:
            raise InputError(f"unknown vocab mode {self.vocab!r}; valid: {', '.join(VOCABS)}")
        for name in ("dropped_mass", "mean_dropped_mass"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and 0 <= value <= 1):
                raise InputError(f"{name} is a probability mass in [0, 1], got {value!r}")
        if self.n_prompts < 1:
            raise InputError(f"n_prompts must be >= 1, got {self.n_prompts!r}")

    def recorded(self) -> dict[str, Any]:
        """The fields that apply (those not None), in declaration order."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    # ------------------------------------------------ the deprecated mapping view
    # ``info[key]`` reads any field (None where it does not apply); ``in``, ``get``, ``keys``,
    # ``values`` and ``items`` see the fields that apply, as the old dicts held only those.
    def _deprecated(self, read: str, instead: str) -> None:
        warnings.warn(
            f"reading MetricInfo as a mapping ({read}) is deprecated: use {instead}; "
            "the mapping view goes in the next release",
            DeprecationWarning,
            stacklevel=3,
        )

    def __getitem__(self, key: str) -> Any:
        self._deprecated(f"info[{key!r}]", f"the attribute info.{key}")
        names = [f.name for f in fields(self)]
        if key not in names:
            raise KeyError(f"{key!r} is not a MetricInfo field; fields: {', '.join(names)}")
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        self._deprecated(f"info.get({key!r})", f"the attribute info.{key}")
        return self.recorded().get(key, default)

    def __contains__(self, key: object) -> bool:
        self._deprecated(f"{key!r} in info", f"info.{key} is not None")
        return key in self.recorded()

    def __iter__(self) -> Iterator[str]:
        self._deprecated("iter(info)", "dataclasses.fields(info)")
        return iter(self.recorded())

    def keys(self) -> KeysView[str]:
        self._deprecated("info.keys()", "dataclasses.fields(info) or info.recorded()")
        return self.recorded().keys()

    def values(self) -> ValuesView[Any]:
        self._deprecated("info.values()", "info.recorded().values()")
        return self.recorded().values()

    def items(self) -> ItemsView[str, Any]:
        self._deprecated("info.items()", "info.recorded().items()")
        return self.recorded().items()
