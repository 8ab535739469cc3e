"""Diagnosis: numbers about metrics, directions and steering paths, never a change to a model.

- :mod:`~steerlens.diagnostics.spectra`: a metric's spectrum (effective dimension, rank at a
  share of the trace, deviation from Euclidean), one row per site;
- :mod:`~steerlens.diagnostics.cost`: the spectral cost ratio ρ of a direction, its Kantorovich
  bound, ρ integrated along a path;
- :mod:`~steerlens.diagnostics.path`: Fisher–Rao distances and the Fisher length of the path an
  intervention walks;
- :mod:`~steerlens.diagnostics.sites`: where to steer, sites ranked by the Fisher-optimal cost;
- :mod:`~steerlens.diagnostics.predictors`: how well each predictor of the KL ratio agrees with
  the measured one.
"""

from steerlens.diagnostics.cost import (
    PathRho,
    kantorovich_bound,
    optimal_quad,
    spectral_cost_ratio,
)
from steerlens.diagnostics.path import fisher_length, fisher_rao, path_length
from steerlens.diagnostics.predictors import predictor_agreement, with_kl_ratio
from steerlens.diagnostics.sites import WHERE_KINDS, concept_gradients, site_costs
from steerlens.diagnostics.spectra import (
    TRACE_LEVELS,
    MetricDiagnostics,
    deviation_from_euclidean,
    diagnostics_table,
    effective_dimension,
    metric_diagnostics,
    rank_holding,
)

__all__ = [
    "TRACE_LEVELS",
    "WHERE_KINDS",
    "MetricDiagnostics",
    "PathRho",
    "concept_gradients",
    "deviation_from_euclidean",
    "diagnostics_table",
    "effective_dimension",
    "fisher_length",
    "fisher_rao",
    "kantorovich_bound",
    "metric_diagnostics",
    "optimal_quad",
    "path_length",
    "predictor_agreement",
    "rank_holding",
    "site_costs",
    "spectral_cost_ratio",
    "with_kl_ratio",
]
