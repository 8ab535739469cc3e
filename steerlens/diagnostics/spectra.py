"""Spectral summaries of metrics: one :class:`MetricDiagnostics` per metric, and the table of
them over a sweep. The numbers and their definitions are :mod:`steerlens.metric.spectrum`'s
(participation ratio, rank at q of the trace, deviation from Euclidean).

>>> import torch
>>> from steerlens.metric import Metric
>>> diag = metric_diagnostics(Metric(torch.eye(4, dtype=torch.float64), "identity"))
>>> diag.participation_ratio, diag.deviation_from_euclidean
(4.0, 0.0)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd

from steerlens.metric.core import Metric
from steerlens.metric.spectrum import (
    TRACE_LEVELS,
    deviation_from_euclidean,
    effective_dimension,
    rank_holding,
    spectral_summary,
)
from steerlens.sites import Site

__all__ = [
    "TRACE_LEVELS",
    "MetricDiagnostics",
    "deviation_from_euclidean",
    "diagnostics_table",
    "effective_dimension",
    "metric_diagnostics",
    "rank_holding",
]


@dataclass(frozen=True)
class MetricDiagnostics:
    """Spectral summary of one metric (see :mod:`steerlens.metric.spectrum` for the
    definitions)."""

    site: str
    dim: int
    trace: float
    top_eigenvalue: float
    participation_ratio: float
    participation_fraction: float
    rank_90: int
    rank_95: int
    rank_99: int
    deviation_from_euclidean: float

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)

    def _repr_html_(self) -> str:
        return pd.DataFrame([self.as_dict()]).to_html(index=False)


def metric_diagnostics(metric: Metric) -> MetricDiagnostics:
    """The spectral summary of ``metric``."""
    numbers: dict[str, Any] = spectral_summary(metric.spectrum().double())
    return MetricDiagnostics(site=metric.site, **numbers)


def diagnostics_table(metrics: Mapping[str, Metric]) -> pd.DataFrame:
    """One row of :class:`MetricDiagnostics` per metric (e.g. every site of a sweep), with the
    site's layer and kind parsed out, and the rank columns also as fractions of d."""
    rows = []
    for name, metric in metrics.items():
        row: dict[str, Any] = metric_diagnostics(metric).as_dict()
        site = Site.parse(name)
        row.update(layer=site.layer, kind=site.kind, head=site.head)
        for q in ("90", "95", "99"):
            row[f"rank_{q}_fraction"] = row[f"rank_{q}"] / row["dim"]  # type: ignore[operator]
        rows.append(row)
    return pd.DataFrame(rows)
