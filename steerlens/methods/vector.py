"""Fixed-direction methods: a probe's weight, an SAE feature's decoder row, and the contrastive
baselines CAA and ActAdd (mean or single paired differences of activations).

Each returns an :class:`~steerlens.methods.intervention.Intervention` whose ``scale`` is the
strength; the evaluation finds the strength that reaches a target concept probability.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from steerlens.activations import harvest
from steerlens.concepts.pairs import ContrastPairs
from steerlens.concepts.probes import LinearProbe
from steerlens.concepts.sae import SaeFeature
from steerlens.errors import ConceptError, InputError, MethodError
from steerlens.hooks import record
from steerlens.methods.clamp import SaeClamp
from steerlens.methods.intervention import Intervention
from steerlens.methods.registry import FitInputs, MethodSpec, one_layer, register_method
from steerlens.prompts import as_prompts
from steerlens.sites import Site, as_site

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer


def _unit(v: Tensor, what: str) -> Tensor:
    norm = float(v.norm())
    if norm == 0:
        raise MethodError(f"{what} is the zero vector: there is no direction to steer along")
    return v / norm


def probe_intervention(
    model: HookedTransformer, probe: LinearProbe, site: str | Site | None = None, scale: float = 1.0
) -> Intervention:
    """δ = scale · w/‖w‖ at the probe's site (or ``site``, same hook, another position rule)."""
    target = as_site(site if site is not None else probe.site, model)
    probe.check_site(target, model)
    vec = _unit(probe.weight.detach(), f"probe {probe.name!r} weight")
    info = {"probe": probe.name, "test_accuracy": probe.test_accuracy}
    return Intervention("probe", {target.name: vec}, scale, info)


def sae_intervention(
    model: HookedTransformer,
    feature: SaeFeature,
    site: str | Site | None = None,
    scale: float = 1.0,
    *,
    mode: str = "add",
) -> Intervention:
    """At the SAE's site (or ``site``, another position rule): ``mode="add"`` adds
    δ = scale · W_dec[f]/‖W_dec[f]‖; ``mode="clamp"`` sets the feature's activation to ``scale``
    (x ← x + (scale − f(x))·W_dec[f], :mod:`steerlens.methods.clamp`). The Fisher-optimal step
    that raises the feature is ``fit(model, "fishback", concept=feature, ...)``."""
    if mode not in ("add", "clamp"):
        raise InputError(f"unknown SAE steering mode {mode!r}; valid: 'add', 'clamp'")
    target = as_site(site if site is not None else feature.site, model)
    feature.check_site(target, model)
    info = {"feature": feature.feature, "mode": mode}
    if mode == "clamp":
        return Intervention("sae_clamp", {}, scale, info, clamps={target.name: SaeClamp(feature)})
    vec = _unit(feature.direction.to(model.cfg.dtype), feature.name)
    return Intervention("sae", {target.name: vec}, scale, info)


def _pair_tokens(
    model: HookedTransformer, pairs: ContrastPairs
) -> tuple[list[Tensor], list[Tensor]]:
    """Token ids of each side; exact ids when the pairs carry them (BOS prepended if the
    model uses one)."""
    if pairs.token_pairs is None:
        return as_prompts(model, list(pairs.plus)), as_prompts(model, list(pairs.minus))
    bos = model.tokenizer.bos_token_id if model.tokenizer is not None else None
    prefix = (bos,) if model.cfg.default_prepend_bos and bos is not None else ()
    plus = [torch.tensor(prefix + p, dtype=torch.long) for p, _ in pairs.token_pairs]
    minus = [torch.tensor(prefix + m, dtype=torch.long) for _, m in pairs.token_pairs]
    return as_prompts(model, plus), as_prompts(model, minus)


def caa_intervention(
    model: HookedTransformer,
    pairs: ContrastPairs,
    layer: int,
    *,
    position: str | int = "all",
    scale: float = 1.0,
) -> Intervention:
    """Contrastive activation addition (Rimsky et al.): v = mean over pairs of
    h⁺ − h⁻, read at ``hook_resid_post`` of ``layer`` at each side's last token, added (times
    ``scale``) at every position (``position="all"``; Rimsky et al. add after the instruction,
    which for a plain prompt is every position). The paper reads at the answer letter of an A/B
    question; for token concepts here the last token of each side is that answer. The vector is
    kept at its natural norm (the multiplier is relative to it)."""
    read = as_site(Site("resid_post", layer), model)
    plus, minus = _pair_tokens(model, pairs)
    diff = harvest(model, plus, read) - harvest(model, minus, read)
    vec = diff.mean(0)
    if float(vec.norm()) == 0:
        raise MethodError(f"CAA vector for {pairs.name!r} is zero: the two sides read the same")
    site = read.at(position)  # type: ignore[arg-type]
    info = {"pairs": pairs.name, "n_pairs": len(pairs), "read": read.name}
    return Intervention("caa", {site.name: vec}, scale, info)


def repe_intervention(
    model: HookedTransformer,
    pairs: ContrastPairs,
    layers: int | list[int],
    *,
    position: str | int = "all",
    scale: float = 1.0,
    centred: bool = False,
) -> Intervention:
    """RepE / PCA reading vectors (as in repeng): per layer, the first principal component of
    the paired differences h⁺ − h⁻ at ``hook_resid_post`` (each side's last token), or with
    ``centred`` of the pair-centred activations h± − (h⁺ + h⁻)/2; the sign is fixed so that the
    plus sides project higher than the minus sides on average. Unit norm, added (times
    ``scale``) at every position of each layer."""
    layer_list = [layers] if isinstance(layers, int) else list(layers)
    if not layer_list:
        raise InputError("RepE needs at least one layer")
    plus, minus = _pair_tokens(model, pairs)
    vectors: dict[str, Tensor] = {}
    for layer in layer_list:
        read = as_site(Site("resid_post", layer), model)
        h_plus, h_minus = harvest(model, plus, read), harvest(model, minus, read)
        if centred:
            mid = (h_plus + h_minus) / 2
            data = torch.cat([h_plus - mid, h_minus - mid])
        else:
            data = h_plus - h_minus
        # first right-singular vector of the (uncentred, as repeng does) difference matrix
        direction = torch.linalg.svd(data.double(), full_matrices=False)[2][0].to(data.dtype)
        if float(((h_plus - h_minus) @ direction).mean()) < 0:
            direction = -direction
        vectors[read.at(position).name] = _unit(direction, f"RepE direction at layer {layer}")  # type: ignore[arg-type]
    info = {"pairs": pairs.name, "n_pairs": len(pairs), "centred": centred}
    return Intervention("repe", vectors, scale, info)


def actadd_intervention(
    model: HookedTransformer,
    plus: str | Tensor,
    minus: str | Tensor,
    layer: int,
    *,
    scale: float = 1.0,
    pad_token: int | None = None,
) -> Intervention:
    """Activation addition (Turner et al.): c·(h(p⁺) − h(p⁻)) for one prompt pair (strings or
    token ids), read at ``hook_resid_pre`` of ``layer`` at every position (the shorter side
    padded with ``pad_token``, by default the tokenizer's pad or end-of-text token), and added
    to the same first positions of the user's prompt."""
    a, b = as_prompts(model, [plus, minus])  # type: ignore[list-item]
    if a.shape == b.shape and torch.equal(a, b):
        raise ConceptError("ActAdd needs two different prompts")
    read = as_site(Site("resid_pre", layer), model)
    n = max(a.shape[0], b.shape[0])
    tok = model.tokenizer
    if pad_token is None and tok is not None:
        pad: Any = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        pad_token = int(pad) if pad is not None else None
    if pad_token is None and a.shape[0] != b.shape[0]:
        raise InputError("ActAdd prompts differ in length: pass pad_token (no tokenizer pad)")
    a, b = (torch.cat([t, t.new_full((n - t.shape[0],), pad_token or 0)]) for t in (a, b))
    batch = torch.stack([a, b])
    with torch.no_grad(), record(model, [read]) as acts:
        model(batch, stop_at_layer=layer + 1, attention_mask=torch.ones_like(batch))
    h = acts[read.name]
    vectors = {read.at(i).name: h[0, i] - h[1, i] for i in range(n)}
    info = {"plus": a.tolist(), "minus": b.tolist(), "n_positions": n}
    return Intervention("actadd", vectors, scale, info)


@dataclass(frozen=True)
class ProbeConfig:
    """``site``: the probe's own site by default (the same hook with another position rule is
    allowed); ``scale``: ‖δ‖."""

    site: str | None = None
    scale: float = 1.0


@dataclass(frozen=True)
class SaeConfig:
    """``mode``: ``"add"`` (δ = scale·W_dec[f]/‖W_dec[f]‖) or ``"clamp"`` (the feature's
    activation set to ``scale``); ``site``: the SAE's own site by default."""

    site: str | None = None
    scale: float = 1.0
    mode: str = "add"


@dataclass(frozen=True)
class CaaConfig:
    """``layer``: read at its ``hook_resid_post``; ``position``: where it is added."""

    layer: int
    position: str | int = "all"
    scale: float = 1.0


@dataclass(frozen=True)
class RepeConfig:
    """``layer``: one layer or a list of layers, read and added at each."""

    layer: int | list[int]
    position: str | int = "all"
    scale: float = 1.0
    centred: bool = False


@dataclass(frozen=True)
class ActAddConfig:
    """``layer``: read and added at its ``hook_resid_pre``."""

    layer: int
    scale: float = 1.0
    pad_token: int | None = None


def _fit_probe(model: HookedTransformer, cfg: ProbeConfig, inputs: FitInputs) -> Intervention:
    assert isinstance(inputs.concept, LinearProbe)
    return probe_intervention(model, inputs.concept, cfg.site, cfg.scale)


def _fit_sae(model: HookedTransformer, cfg: SaeConfig, inputs: FitInputs) -> Intervention:
    assert isinstance(inputs.concept, SaeFeature)
    return sae_intervention(model, inputs.concept, cfg.site, cfg.scale, mode=cfg.mode)


def _fit_caa(model: HookedTransformer, cfg: CaaConfig, inputs: FitInputs) -> Intervention:
    layer = one_layer("CAA", cfg.layer)
    return caa_intervention(model, inputs.pairs, layer, position=cfg.position, scale=cfg.scale)


def _fit_repe(model: HookedTransformer, cfg: RepeConfig, inputs: FitInputs) -> Intervention:
    return repe_intervention(
        model, inputs.pairs, cfg.layer, position=cfg.position, scale=cfg.scale, centred=cfg.centred
    )


def _fit_actadd(model: HookedTransformer, cfg: ActAddConfig, inputs: FitInputs) -> Intervention:
    pair = inputs.pairs
    if not (isinstance(pair, tuple) and len(pair) == 2):
        raise InputError(f"actadd needs pairs= one (plus, minus) prompt pair, got {pair!r}")
    layer = one_layer("ActAdd", cfg.layer)
    return actadd_intervention(
        model, pair[0], pair[1], layer, scale=cfg.scale, pad_token=cfg.pad_token
    )


register_method(
    MethodSpec(
        "probe",
        ProbeConfig,
        _fit_probe,
        needs=("concept",),
        input_types={"concept": LinearProbe},
        implicit_metric="I on the probe",
        description="δ ∝ probe weight w",
    )
)
register_method(
    MethodSpec(
        "sae",
        SaeConfig,
        _fit_sae,
        needs=("concept",),
        input_types={"concept": SaeFeature},
        implicit_metric="the SAE's dictionary",
        description="δ ∝ decoder row W_dec[f] (mode='add'), or clamped: x + (c − f(x))·W_dec[f]",
    )
)
register_method(
    MethodSpec(
        "caa",
        CaaConfig,
        _fit_caa,
        needs=("pairs",),
        input_types={"pairs": ContrastPairs},
        implicit_metric="within-class covariance",
        description="mean paired difference at resid_post, added at every position",
    )
)
register_method(
    MethodSpec(
        "repe",
        RepeConfig,
        _fit_repe,
        needs=("pairs",),
        input_types={"pairs": ContrastPairs},
        implicit_metric="activation covariance",
        description="first principal component of paired differences, sign fixed by projection",
    )
)
register_method(
    MethodSpec(
        "actadd",
        ActAddConfig,
        _fit_actadd,
        needs=("pairs",),
        input_types={"pairs": tuple},
        implicit_metric="Euclidean on one pair",
        description="one pair's difference at resid_pre, added at the first positions",
    )
)
