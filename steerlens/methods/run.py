"""The typed result of an iterative steering run: the intervention it ends at, every accepted
step, the path of δ from 0 to it, the checkpoints it passed on the way, ρ integrated along it and
its wall time.

An :class:`~steerlens.methods.intervention.Intervention` stays pure data that applies, saves and
loads; a :class:`SteeringRun` is what
:func:`~steerlens.methods.iterative.steer_iteratively` returns around it, for the evaluation
(the path's Fisher length, matched targets from checkpoints) and for plots of the trajectory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from steerlens.errors import InputError
from steerlens.methods.intervention import Intervention


@dataclass(frozen=True)
class Step:
    """One accepted point of the run: the concept's and the stop concept's values there, ‖δ‖,
    and (metric methods) the dropped mass and top-K of the metric the step was solved with."""

    step: int
    value: float
    stop_value: float
    delta_norm: float
    dropped_mass: float | None = None
    top_k: int | None = None


@dataclass(frozen=True)
class Checkpoint:
    """Where the run first crossed a lower stop-concept ``value``: the δ there (bisected like the
    final step), the index of the step that crossed it (the path to it is ``path[:step]`` then
    ``delta``) and, when directions were compared, their ρ integrated up to it."""

    value: float
    delta: Float[Tensor, " d_model"]
    step: int
    path_rho: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class SteeringRun:
    """An iterative run at one ``site``. ``path``: δ at every accepted point, from 0 to the
    intervention's vector (one row per entry of ``trajectory``); ``checkpoints``: keyed by the
    stop-concept value passed in; ``path_rho``: each compared direction's ρ along the whole path
    (:class:`~steerlens.diagnostics.cost.PathRho`)."""

    intervention: Intervention
    site: str
    reached: bool
    start_value: float
    final_value: float
    target_value: float
    trajectory: tuple[Step, ...]
    path: Float[Tensor, "n_points d_model"]
    checkpoints: Mapping[float, Checkpoint] = field(default_factory=dict)
    path_rho: Mapping[str, float] = field(default_factory=dict)
    seconds: float = math.nan

    def __post_init__(self) -> None:
        if self.path.ndim != 2 or self.path.shape[0] != len(self.trajectory):
            raise InputError(
                f"a run's path has one row per step: {len(self.trajectory)} steps, path of "
                f"shape {tuple(self.path.shape)}"
            )

    @property
    def steps(self) -> int:
        """The number of steps taken (the trajectory holds the start too)."""
        return len(self.trajectory) - 1

    @property
    def delta(self) -> Float[Tensor, " d_model"]:
        """The δ the run ends at."""
        return self.path[-1]

    def checkpoint(self, value: float) -> Checkpoint | None:
        """The checkpoint at stop value ``value`` if the run passed it, else None."""
        return self.checkpoints.get(float(value))

    def path_to(self, value: float | None = None) -> Float[Tensor, "n_points d_model"]:
        """The points of the path up to checkpoint ``value``: those before the step that first
        crossed it, then the checkpoint's δ; the whole path for None or a checkpoint not
        passed."""
        mark = None if value is None else self.checkpoint(value)
        if mark is None:
            return self.path
        return torch.cat([self.path[: mark.step], mark.delta.unsqueeze(0).to(self.path)])
