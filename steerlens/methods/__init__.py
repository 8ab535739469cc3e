"""Steering methods behind one interface: each method module registers its entry (name, frozen
config, fit function, inputs, implicit metric) in :mod:`steerlens.methods.registry`; every method
fits to an :class:`Intervention` that applies as a context manager, saves and loads, and exposes
its vectors for diagnosis. Iterative runs return a typed :class:`SteeringRun`."""

from steerlens.methods.configs import (
    DualConfig,
    EuclideanConfig,
    FishBackConfig,
    IterativeConfig,
    TruncatedFisherConfig,
)
from steerlens.methods.dynamic_scaling import (
    DynamicScalingConfig,
    ScalingMeasures,
    dynamic_scaling_intervention,
    scaling_measures,
)
from steerlens.methods.equivalence import (
    ShiftFit,
    UpdateShift,
    apply_shift,
    shift_from_weight_update,
    weight_update_from_shift,
)
from steerlens.methods.fusion import FusionConfig, fusion_intervention
from steerlens.methods.intervention import Intervention, load_intervention
from steerlens.methods.iterative import steer_batch, steer_iteratively
from steerlens.methods.iti import ItiConfig, iti_intervention
from steerlens.methods.joint import JointConfig, answer_accuracy, joint_intervention
from steerlens.methods.lowrank import LowRankUpdate, OutputProjection, apply_update
from steerlens.methods.multisite import MultisiteConfig
from steerlens.methods.postblock import PostblockConfig, bias_edit, postblock_intervention
from steerlens.methods.registry import (
    REGISTRY,
    FitInputs,
    MethodSpec,
    fit,
    list_methods,
    method_config,
    method_spec,
    register_method,
)
from steerlens.methods.run import Checkpoint, SteeringRun, Step
from steerlens.methods.scaling import ScalingConfig
from steerlens.methods.vector import (
    ActAddConfig,
    CaaConfig,
    ProbeConfig,
    RepeConfig,
    SaeConfig,
    actadd_intervention,
    caa_intervention,
    probe_intervention,
    repe_intervention,
    sae_intervention,
)


def __getattr__(name: str):
    if name == "METHODS":
        import warnings

        warnings.warn(
            "steerlens.methods.METHODS is now steerlens.methods.REGISTRY (MethodSpec entries); "
            "the old name goes in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return REGISTRY
    raise AttributeError(f"module 'steerlens.methods' has no attribute {name!r}")


__all__ = [
    "REGISTRY",
    "ActAddConfig",
    "CaaConfig",
    "Checkpoint",
    "DualConfig",
    "DynamicScalingConfig",
    "EuclideanConfig",
    "FishBackConfig",
    "FitInputs",
    "FusionConfig",
    "Intervention",
    "ItiConfig",
    "IterativeConfig",
    "JointConfig",
    "LowRankUpdate",
    "MethodSpec",
    "MultisiteConfig",
    "OutputProjection",
    "PostblockConfig",
    "ProbeConfig",
    "RepeConfig",
    "SaeConfig",
    "ScalingConfig",
    "ScalingMeasures",
    "ShiftFit",
    "SteeringRun",
    "Step",
    "TruncatedFisherConfig",
    "UpdateShift",
    "actadd_intervention",
    "answer_accuracy",
    "apply_shift",
    "apply_update",
    "bias_edit",
    "caa_intervention",
    "dynamic_scaling_intervention",
    "fit",
    "fusion_intervention",
    "iti_intervention",
    "joint_intervention",
    "list_methods",
    "load_intervention",
    "method_config",
    "method_spec",
    "postblock_intervention",
    "probe_intervention",
    "register_method",
    "repe_intervention",
    "sae_intervention",
    "scaling_measures",
    "shift_from_weight_update",
    "steer_batch",
    "steer_iteratively",
    "weight_update_from_shift",
]
