"""The configs of the iterative methods (:mod:`steerlens.methods.iterative`): one frozen
dataclass a method, each validating its options when it is made."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from steerlens.errors import InputError
from steerlens.metric.outcomes import DEFAULT_DROPPED_MASS, OffTarget, check_precision


@dataclass(frozen=True)
class IterativeConfig:
    """Shared options. ``site``: a residual site (``resid_pre``/``resid_post``) at the last
    position. The loop stops at ``target_value`` of the stop concept, or (if None) at the value
    meaning ``target_probability``. ``step``: predicted concept rise per step (nats of log p for
    a token set; logits for a probe)."""

    name: ClassVar[str] = "iterative"
    site: str
    target_probability: float = 0.9
    target_value: float | None = None
    step: float = 0.5
    max_steps: int = 60

    def __post_init__(self) -> None:
        if not 0 < self.target_probability < 1:
            raise InputError(f"target_probability must be in (0, 1), got {self.target_probability}")
        if not (math.isfinite(self.step) and self.step > 0):
            raise InputError(f"step must be a finite number > 0, got {self.step}")
        if self.max_steps < 1:
            raise InputError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.target_value is not None and not math.isfinite(self.target_value):
            raise InputError(f"target_value must be finite, got {self.target_value}")


@dataclass(frozen=True)
class EuclideanConfig(IterativeConfig):
    """Euclidean gradient ascent: u = g."""

    name: ClassVar[str] = "euclidean"


@dataclass(frozen=True)
class FishBackConfig(IterativeConfig):
    """FishBack: u = (G + λI)⁻¹g with G the full pullback Fisher metric at the current x, of
    the concept's off-target distribution (``off_target=True``, the default), of a given
    :class:`~steerlens.metric.outcomes.OffTarget` (e.g. ``OffTarget.pair_merge(mapping)``), or of
    the whole output (``off_target=False``).
    λ = ``damping``·tr(G)/d. The defaults (damping 1e-2, step 0.5) give the largest median
    off-target KL advantage over Euclidean ascent in the grid of ``bench/results/defaults.md``.

    Speed knobs (``bench/steering.py`` measures them, ``bench/results/steering*.md``):
    ``precision`` is the dtype of the output factor's top-K Gram (``"float32"``, the default, is
    cheaper and moves the damped direction slightly from float64's); ``trace_kept`` keeps only the
    output-factor directions holding that fraction of its trace before the pull-back (fewer rows,
    a lower bound on G); ``metric_every`` recomputes G every that many steps (1: every step, the
    exact natural gradient) and reuses it in between."""

    name: ClassVar[str] = "fishback"
    off_target: bool | OffTarget = True
    damping: float = 1e-2
    vocab: str = "auto"
    dropped_mass: float = DEFAULT_DROPPED_MASS
    trace_kept: float | None = None
    metric_every: int = 1
    precision: str = "float32"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.damping) and self.damping > 0):
            raise InputError(f"damping must be a finite number > 0, got {self.damping}")
        check_precision(self.precision)
        if self.trace_kept is not None and not 0 < self.trace_kept <= 1:
            raise InputError(f"trace_kept must be in (0, 1], got {self.trace_kept}")
        if not (isinstance(self.metric_every, int) and self.metric_every >= 1):
            raise InputError(f"metric_every must be an int >= 1, got {self.metric_every!r}")


@dataclass(frozen=True)
class TruncatedFisherConfig(FishBackConfig):
    """The depth-k metric G^(k): pulled back through ``depth`` blocks, then straight into the
    unembedding (``depth=0``: the softmax's own geometry at the site)."""

    name: ClassVar[str] = "truncated_fisher"
    depth: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.depth < 0:
            raise InputError(f"depth must be >= 0, got {self.depth}")


@dataclass(frozen=True)
class DualConfig(IterativeConfig):
    """Dual steering (Park et al., *The Information Geometry of Softmax*): a regularized Newton
    step in dual coordinates, u = (G^(0) + λI)⁻¹w solved by ``cg_iters`` conjugate-gradient
    iterations, w the gradient of the concept (a probe's weight). Park et al. read G^(0) at the
    last layer over the top 20,000 logits with an absolute λ = 5e-3 and fixed-norm steps; here
    G^(0) is read at any residual site through ln_final (top-K by dropped mass), λ is relative
    (``damping``·tr/d) and steps follow the shared concept ladder."""

    name: ClassVar[str] = "dual"
    damping: float = 5e-3
    cg_iters: int = 20
    vocab: str = "auto"
    dropped_mass: float = DEFAULT_DROPPED_MASS
    precision: str = "float32"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_precision(self.precision)
