"""The method registry: every steering method by name, its config and its implicit metric.

>>> sorted(list_methods()["name"])[:3]
['actadd', 'caa', 'dual']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd

from steerlens.concepts.base import Concept
from steerlens.concepts.pairs import ContrastPairs
from steerlens.concepts.probes import LinearProbe
from steerlens.concepts.sae import SaeFeature
from steerlens.errors import InputError, MethodError
from steerlens.methods.intervention import Intervention
from steerlens.methods.iterative import (
    DualConfig,
    EuclideanConfig,
    FishBackConfig,
    IterativeConfig,
    TruncatedFisherConfig,
    steer_iteratively,
)
from steerlens.methods.iti import iti_intervention
from steerlens.methods.multisite import multisite_intervention
from steerlens.methods.postblock import postblock_intervention
from steerlens.methods.scaling import scaling_intervention
from steerlens.methods.vector import (
    actadd_intervention,
    caa_intervention,
    probe_intervention,
    repe_intervention,
    sae_intervention,
)
from steerlens.prompts import PromptsLike

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer


@dataclass(frozen=True)
class MethodInfo:
    name: str
    fits_on: str
    implicit_metric: str
    description: str


METHODS: dict[str, MethodInfo] = {
    m.name: m
    for m in (
        MethodInfo(
            "fishback",
            "a prompt + concept",
            "full pullback Fisher (off-target)",
            "iterative natural gradient δ ∝ (G_off + λI)⁻¹g to a target probability",
        ),
        MethodInfo(
            "euclidean",
            "a prompt + concept",
            "I",
            "iterative gradient ascent δ ∝ g to a target probability",
        ),
        MethodInfo(
            "truncated_fisher",
            "a prompt + concept",
            "depth-k Fisher G^(k)",
            "iterative δ ∝ (G^(k) + λI)⁻¹g; k = 0 is the softmax geometry",
        ),
        MethodInfo(
            "dual",
            "a prompt + probe",
            "depth-0 Fisher",
            "Park et al.'s dual steering: CG-solved Newton steps on a probe",
        ),
        MethodInfo("probe", "a LinearProbe", "I on the probe", "δ ∝ probe weight w"),
        MethodInfo(
            "sae",
            "an SaeFeature",
            "the SAE's dictionary",
            "δ ∝ decoder row W_dec[f] (mode='add'), or clamped: x + (c − f(x))·W_dec[f]",
        ),
        MethodInfo(
            "caa",
            "ContrastPairs",
            "within-class covariance",
            "mean paired difference at resid_post, added at every position",
        ),
        MethodInfo(
            "iti",
            "ContrastPairs",
            "per-head Euclidean",
            "top-K heads by probe accuracy shifted by α·σ·θ at hook_z, every generation step",
        ),
        MethodInfo(
            "repe",
            "ContrastPairs",
            "activation covariance",
            "first principal component of paired differences, sign fixed by projection",
        ),
        MethodInfo(
            "postblock",
            "prompts + concept",
            "I (trained by gradient descent)",
            "a resid_post vector trained by Adam on −concept + l2·‖δ‖²; exportable as a bias edit",
        ),
        MethodInfo(
            "multisite",
            "ContrastPairs + tuning prompts",
            "per-segment Euclidean, weights tuned by optuna",
            "per-layer mean differences at every layer, one optuna-tuned weight per segment",
        ),
        MethodInfo(
            "scaling",
            "prompts + target/source tokens",
            "none (multiplicative, per component)",
            "signed scalars on head and MLP outputs: flip target vs source, KL, L1 (Stoehr et al.)",
        ),
        MethodInfo(
            "actadd",
            "one prompt pair",
            "Euclidean on one pair",
            "one pair's difference at resid_pre, added at the first positions",
        ),
    )
}

ITERATIVE: dict[str, type[IterativeConfig]] = {
    "fishback": FishBackConfig,
    "euclidean": EuclideanConfig,
    "truncated_fisher": TruncatedFisherConfig,
    "dual": DualConfig,
}


def list_methods() -> pd.DataFrame:
    """One row per registered method: what it fits on, its implicit metric, what it does."""
    return pd.DataFrame([vars(m) for m in METHODS.values()])


def method_config(name: str, **options: Any) -> IterativeConfig:
    """The frozen config of an iterative method (``fishback``, ``euclidean``,
    ``truncated_fisher``, ``dual``) with ``options`` (``site`` is required)."""
    if name not in ITERATIVE:
        raise MethodError(f"{name!r} has no iterative config; iterative methods: {list(ITERATIVE)}")
    try:
        return ITERATIVE[name](**options)
    except TypeError as err:
        raise InputError(f"bad options for {name!r}: {err}") from None


def fit(
    model: HookedTransformer,
    method: str,
    *,
    concept: Concept | None = None,
    prompt: PromptsLike | None = None,
    pairs: ContrastPairs | tuple[Any, Any] | None = None,
    site: str | None = None,
    layer: int | list[int] | None = None,
    scale: float = 1.0,
    stop_on: Concept | None = None,
    **options: Any,
) -> Intervention:
    """Fit one method to an :class:`Intervention`.

    - iterative (``fishback``, ``euclidean``, ``truncated_fisher``, ``dual``): ``site``,
      ``concept`` and the ``prompt`` to steer; ``options`` go to the method's config
      (``target_probability``, ``damping``...); ``stop_on`` stops on another concept.
    - ``probe``: ``concept`` a :class:`LinearProbe`; ``sae``: ``concept`` an :class:`SaeFeature`
      (``site`` may change the position rule), option ``mode`` ``"add"`` (default: add
      scale·W_dec[f]/‖W_dec[f]‖) or ``"clamp"`` (set the feature's activation to ``scale``).
    - ``postblock``: ``concept``, ``prompt`` (prompts) and ``layer``; options ``position``,
      ``steps``, ``lr``, ``l2`` (:func:`~steerlens.methods.postblock.postblock_intervention`).
    - ``multisite``: ``pairs``, ``prompt`` (tuning prompts), option ``concepts`` (one per
      prompt), ``layer`` (a list; default all) and options ``segments``, ``trials``,
      ``max_weight``, ``kl_weight``, ``seed``
      (:func:`~steerlens.methods.multisite.multisite_intervention`).
    - ``scaling``: ``prompt`` (prompts) and options ``targets``, ``sources`` (one token id each),
      ``components`` or ``layers``, ``position``, ``steps``, ``lr``, ``l1``, ``faithfulness``
      (:func:`~steerlens.methods.scaling.scaling_intervention`).
    - ``iti``: ``pairs`` a :class:`ContrastPairs`, ``layer`` an int, a list or None (all);
      options ``k``, ``alpha``, ``direction``.
    - ``caa``, ``repe``: ``pairs`` a :class:`ContrastPairs` and ``layer``; ``actadd``: ``pairs`` one
      (plus, minus) prompt pair and ``layer``.
    """
    if method not in METHODS:
        raise MethodError(f"unknown method {method!r}; registered methods: {', '.join(METHODS)}")
    if method in ITERATIVE:
        if site is None or concept is None or prompt is None:
            raise InputError(f"{method} needs site=, concept= and prompt=")
        cfg = method_config(method, site=site, **options)
        return steer_iteratively(model, cfg, concept, prompt, stop_on=stop_on)
    if method == "postblock":
        if concept is None or prompt is None or not isinstance(layer, int):
            raise InputError("postblock needs concept=, prompt= (one or more prompts) and layer=")
        try:
            return postblock_intervention(model, concept, prompt, layer, **options)
        except TypeError as err:
            raise InputError(f"bad options for postblock: {err}") from None
    if method == "multisite":
        if not isinstance(pairs, ContrastPairs) or prompt is None or "concepts" not in options:
            raise InputError(
                "multisite needs pairs= a ContrastPairs, prompt= tuning prompts and concepts= "
                "(one concept per prompt)"
            )
        layers = [layer] if isinstance(layer, int) else layer
        concepts = options.pop("concepts")
        try:
            return multisite_intervention(model, pairs, prompt, concepts, layers=layers, **options)
        except TypeError as err:
            raise InputError(f"bad options for multisite: {err}") from None
    if method == "scaling":
        if prompt is None:
            raise InputError("scaling needs prompt= (prompts), targets= and sources= (token ids)")
        try:
            return scaling_intervention(model, prompt, **options)
        except TypeError as err:
            raise InputError(f"bad options for scaling: {err}") from None
    if method == "iti":
        if not isinstance(pairs, ContrastPairs):
            raise InputError("ITI needs pairs= a ContrastPairs")
        layers = [layer] if isinstance(layer, int) else layer
        try:
            return iti_intervention(model, pairs, layers=layers, **options)
        except TypeError as err:
            raise InputError(f"bad options for iti: {err}") from None
    if method == "sae":
        if not isinstance(concept, SaeFeature):
            raise InputError("SAE steering needs concept= an SaeFeature")
        mode = options.pop("mode", "add")
        if options:
            raise InputError(f"sae takes only the option mode=, not {sorted(options)}")
        return sae_intervention(model, concept, site, scale, mode=mode)
    if options:
        raise InputError(f"{method} takes no options {sorted(options)}")
    if method == "probe":
        if not isinstance(concept, LinearProbe):
            raise InputError("probe steering needs concept= a LinearProbe")
        return probe_intervention(model, concept, site, scale)
    if layer is None:
        raise InputError(f"{method} needs layer=")
    if method in ("caa", "repe"):
        if not isinstance(pairs, ContrastPairs):
            raise InputError(f"{method} needs pairs= a ContrastPairs")
        if method == "repe":
            return repe_intervention(model, pairs, layer, scale=scale)
        if not isinstance(layer, int):
            raise InputError("CAA reads one layer: pass layer= an int")
        return caa_intervention(model, pairs, layer, scale=scale)
    if not (isinstance(pairs, tuple) and len(pairs) == 2):
        raise InputError("ActAdd needs pairs= one (plus, minus) prompt pair")
    if not isinstance(layer, int):
        raise InputError("ActAdd reads one layer: pass layer= an int")
    return actadd_intervention(model, pairs[0], pairs[1], layer, scale=scale)
