"""The pullback Fisher metric: factors, vocabulary modes, the recursive sweep, depth-k metrics."""

from steerlens.metric.core import Metric
from steerlens.metric.info import MetricInfo
from steerlens.metric.outcomes import OffTarget
from steerlens.metric.pullback import MetricOptions, Sweep, pullback_metric, pullback_sweep

__all__ = [
    "Metric",
    "MetricInfo",
    "MetricOptions",
    "OffTarget",
    "Sweep",
    "pullback_metric",
    "pullback_sweep",
]
