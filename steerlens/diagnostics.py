"""Numbers about metrics: spectrum, effective dimension, deviation from Euclidean.

Every definition is stated beside its number:

- participation ratio: PR = (tr G)² / tr(G²), reported absolute and as a fraction of d;
- rank@q: the fewest eigen-directions holding a fraction q of tr G (q = 0.9, 0.95, 0.99);
- deviation from Euclidean: ‖G − ḡI‖₂ / ‖G‖₂ with ḡ = tr(G)/d (spectral norms). It is 0 for a
  multiple of the identity and tends to 1 for a metric concentrated on few directions. The FishBack
  paper's exact definition is not public; this is ours.

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
import torch
from jaxtyping import Float
from torch import Tensor

from steerlens.errors import MetricError
from steerlens.metric.core import Metric

TRACE_LEVELS = (0.9, 0.95, 0.99)


@dataclass(frozen=True)
class MetricDiagnostics:
    """Spectral summary of one metric (see the module docstring for the definitions)."""

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


def effective_dimension(evals: Float[Tensor, " d"]) -> float:
    """Participation ratio (Σλ)² / Σλ² of non-negative eigenvalues."""
    total = evals.sum()
    if total <= 0:
        raise MetricError("the metric is zero: its effective dimension is undefined")
    return float(total**2 / evals.pow(2).sum())


def rank_holding(evals: Float[Tensor, " d"], fraction: float) -> int:
    """The fewest top eigenvalues (descending order) whose sum is ≥ ``fraction`` of the trace."""
    frac = torch.cumsum(evals, 0) / evals.sum()
    return int((frac < fraction - 1e-12).sum()) + 1


def deviation_from_euclidean(evals: Float[Tensor, " d"]) -> float:
    """‖G − ḡI‖₂ / ‖G‖₂ with ḡ = tr(G)/d, from the eigenvalues of G."""
    mean = evals.mean()
    return float((evals - mean).abs().max() / evals.max())


def metric_diagnostics(metric: Metric) -> MetricDiagnostics:
    """The spectral summary of ``metric``."""
    evals = metric.spectrum().double()
    pr = effective_dimension(evals)
    ranks = [rank_holding(evals, q) for q in TRACE_LEVELS]
    return MetricDiagnostics(
        site=metric.site,
        dim=metric.dim,
        trace=float(evals.sum()),
        top_eigenvalue=float(evals[0]),
        participation_ratio=pr,
        participation_fraction=pr / metric.dim,
        rank_90=ranks[0],
        rank_95=ranks[1],
        rank_99=ranks[2],
        deviation_from_euclidean=deviation_from_euclidean(evals),
    )


def diagnostics_table(metrics: Mapping[str, Metric]) -> pd.DataFrame:
    """One row of :class:`MetricDiagnostics` per metric (e.g. every site of a sweep), with the
    site's layer and kind parsed out, and the rank columns also as fractions of d."""
    from steerlens.sites import Site

    rows = []
    for name, metric in metrics.items():
        row: dict[str, Any] = metric_diagnostics(metric).as_dict()
        site = Site.parse(name)
        row.update(layer=site.layer, kind=site.kind, head=site.head)
        for q in ("90", "95", "99"):
            row[f"rank_{q}_fraction"] = row[f"rank_{q}"] / row["dim"]  # type: ignore[operator]
        rows.append(row)
    return pd.DataFrame(rows)
