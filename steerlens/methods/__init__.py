"""Steering methods behind one interface: each fits to an :class:`Intervention` that applies as
a context manager, saves and loads, and exposes its vectors for diagnosis."""

from steerlens.methods.intervention import Intervention, load_intervention
from steerlens.methods.iterative import (
    DualConfig,
    EuclideanConfig,
    FishBackConfig,
    IterativeConfig,
    TruncatedFisherConfig,
    steer_iteratively,
)
from steerlens.methods.iti import iti_intervention
from steerlens.methods.postblock import bias_edit, postblock_intervention
from steerlens.methods.registry import METHODS, fit, list_methods, method_config
from steerlens.methods.vector import (
    actadd_intervention,
    caa_intervention,
    probe_intervention,
    repe_intervention,
    sae_intervention,
)

__all__ = [
    "METHODS",
    "DualConfig",
    "EuclideanConfig",
    "FishBackConfig",
    "Intervention",
    "IterativeConfig",
    "TruncatedFisherConfig",
    "actadd_intervention",
    "bias_edit",
    "caa_intervention",
    "fit",
    "iti_intervention",
    "list_methods",
    "load_intervention",
    "method_config",
    "postblock_intervention",
    "probe_intervention",
    "repe_intervention",
    "sae_intervention",
    "steer_iteratively",
]
