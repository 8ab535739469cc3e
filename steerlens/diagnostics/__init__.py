"""Diagnosis: numbers about metrics, directions and steering paths, never a change to a model.

- :mod:`~steerlens.diagnostics.spectra`: a metric's spectrum (effective dimension, rank at a
  share of the trace, deviation from Euclidean), one row per site;
- :mod:`~steerlens.diagnostics.cost`: the spectral cost ratio ρ of a direction, its Kantorovich
  bound, ρ integrated along a path;
- :mod:`~steerlens.diagnostics.path`: Fisher–Rao distances and the Fisher length of the path an
  intervention walks;
- :mod:`~steerlens.diagnostics.sites`: where to steer, sites ranked by the Fisher-optimal cost;
- :mod:`~steerlens.diagnostics.predictors`: how well each predictor of the KL ratio agrees with
  the measured one;
- :mod:`~steerlens.diagnostics.geometry`: the geometry figures of the claims, each under a named
  definition, and a model's figures beside its controls';
- :mod:`~steerlens.diagnostics.controls`: the controls themselves, new twin models (random-init,
  shuffled) built beside a model, which stays as found.
"""

from steerlens.diagnostics.controls import (
    CONTROL_KINDS,
    control_model,
    random_from_config,
    random_like,
    shuffled,
)
from steerlens.diagnostics.cost import (
    PathRho,
    kantorovich_bound,
    optimal_quad,
    spectral_cost_ratio,
)
from steerlens.diagnostics.geometry import (
    DEFINITIONS,
    GeometryRow,
    control_table,
    geometry_figures,
    geometry_rows,
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
    "CONTROL_KINDS",
    "DEFINITIONS",
    "TRACE_LEVELS",
    "WHERE_KINDS",
    "GeometryRow",
    "MetricDiagnostics",
    "PathRho",
    "concept_gradients",
    "control_model",
    "control_table",
    "deviation_from_euclidean",
    "diagnostics_table",
    "effective_dimension",
    "fisher_length",
    "fisher_rao",
    "geometry_figures",
    "geometry_rows",
    "kantorovich_bound",
    "metric_diagnostics",
    "optimal_quad",
    "path_length",
    "predictor_agreement",
    "random_from_config",
    "random_like",
    "rank_holding",
    "shuffled",
    "site_costs",
    "spectral_cost_ratio",
    "with_kl_ratio",
]
