"""The spectral numbers of a metric, from its eigenvalues: effective dimension, rank at a share
of the trace, deviation from Euclidean. :class:`~steerlens.metric.core.Metric`'s summary shows
them; :mod:`steerlens.diagnostics.spectra` builds its tables on them.

- participation ratio: PR = (tr G)² / tr(G²), reported absolute and as a fraction of d;
- rank@q: the fewest eigen-directions holding a fraction q of tr G (q = 0.9, 0.95, 0.99);
- deviation from Euclidean: ‖G − ḡI‖₂ / ‖G‖₂ with ḡ = tr(G)/d (spectral norms). It is 0 for a
  multiple of the identity and tends to 1 for a metric concentrated on few directions. The FishBack
  paper's exact definition is not public; this is ours.

>>> import torch
>>> numbers = spectral_summary(torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64))
>>> numbers["participation_ratio"], numbers["rank_90"]
(2.6666666666666665, 3)
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from steerlens.errors import MetricError

TRACE_LEVELS = (0.9, 0.95, 0.99)


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


def spectral_summary(evals: Float[Tensor, " d"]) -> dict[str, float | int]:
    """The numbers of the module docstring from the eigenvalues of G (descending, ≥ 0), keyed
    as the fields of :class:`~steerlens.diagnostics.MetricDiagnostics` after ``site``."""
    dim = int(evals.shape[0])
    pr = effective_dimension(evals)
    ranks = [rank_holding(evals, q) for q in TRACE_LEVELS]
    return {
        "dim": dim,
        "trace": float(evals.sum()),
        "top_eigenvalue": float(evals[0]),
        "participation_ratio": pr,
        "participation_fraction": pr / dim,
        "rank_90": ranks[0],
        "rank_95": ranks[1],
        "rank_99": ranks[2],
        "deviation_from_euclidean": deviation_from_euclidean(evals),
    }
