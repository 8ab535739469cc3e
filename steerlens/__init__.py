"""steerlens: the pullback Fisher geometry of activation steering, for TransformerLens models.

The public API, re-exported explicitly::

    import steerlens as sl
    model = sl.load_model()                       # SmolLM2-135M-Instruct, offline
    metric = sl.pullback_metric(model, "The capital of France is", "resid_post.12")
    sweep = sl.pullback_sweep(model, "The capital of France is")
    sl.diagnostics_table(sweep)
"""

from steerlens import errors
from steerlens.auditing import Audit, audit
from steerlens.concepts import PairMapping, TokenSet
from steerlens.concepts.probes import LinearProbe, fit_probe, train_probe
from steerlens.concepts.sae import SaeFeature, pretrained_sae, sae_feature
from steerlens.diagnostics import (
    MetricDiagnostics,
    diagnostics_table,
    kantorovich_bound,
    metric_diagnostics,
    site_costs,
    spectral_cost_ratio,
)
from steerlens.hooks import add_vector, record
from steerlens.methods import Intervention, bias_edit, fit, list_methods, load_intervention
from steerlens.metric import (
    Metric,
    MetricInfo,
    MetricOptions,
    OffTarget,
    Sweep,
    pullback_metric,
    pullback_sweep,
)
from steerlens.metric.dataset import expected_metric
from steerlens.models import DEFAULT_MODEL, load_model
from steerlens.sites import Site, all_sites

__version__ = "0.1.0"

#: names that left the top level, importable from here for one release with a warning
_MOVED = {"tiny_model": ("steerlens.testing", "tiny_model")}


def __getattr__(name: str):
    if name in _MOVED:
        import importlib
        import warnings

        module, attr = _MOVED[name]
        warnings.warn(
            f"steerlens.{name} moved to {module}.{attr} (test support, not the public API); "
            "the old name goes in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'steerlens' has no attribute {name!r}")


__all__ = [
    "DEFAULT_MODEL",
    "Audit",
    "audit",
    "Intervention",
    "LinearProbe",
    "PairMapping",
    "SaeFeature",
    "TokenSet",
    "fit",
    "fit_probe",
    "list_methods",
    "load_intervention",
    "pretrained_sae",
    "sae_feature",
    "site_costs",
    "train_probe",
    "Metric",
    "MetricDiagnostics",
    "MetricInfo",
    "OffTarget",
    "Site",
    "Sweep",
    "add_vector",
    "all_sites",
    "diagnostics_table",
    "errors",
    "expected_metric",
    "load_model",
    "metric_diagnostics",
    "pullback_metric",
    "pullback_sweep",
    "record",
    "MetricOptions",
    "bias_edit",
    "kantorovich_bound",
    "spectral_cost_ratio",
]
