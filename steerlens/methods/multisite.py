"""Multi-site steering with tuned per-segment weights (after fusion steering, arXiv 2505.22572).

One vector per layer, each layer's mean paired difference h⁺ − h⁻ at ``hook_resid_post`` (each
side's last token) over contrast pairs, added at every position. The layers are split into
contiguous segments — one segment is the paper's "full" injection, several its "segmented" one —
and each segment k gets one weight w_k ∈ [0, max_weight], tuned by optuna (TPE, seeded) to
maximize

    mean concept probability − kl_weight · mean off-target KL

(the first trial is every weight at 1, the plain injection, so the tuned result is never worse)
over tuning prompts (each with its own concept, e.g. a :class:`~steerlens.concepts.PairConcept`
whose probability is the target's pair share; the off-target KL is on every token but the
concept's, renormalized). Where the paper differs: its deltas come from reference completions
per prompt and its objective is token overlap plus perplexity; with token-level concepts here the
deltas are contrastive (as CAA's, at every layer) and the objective is the concept's probability
against the off-target KL. The result is one :class:`Intervention` with a vector at every chosen
layer (the segment weight folded in); ``info`` has the segments, weights and every trial.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from steerlens.concepts.base import Concept
from steerlens.concepts.pairs import ContrastPairs
from steerlens.errors import InputError, MethodError
from steerlens.hooks import record
from steerlens.methods.intervention import Intervention
from steerlens.methods.registry import FitInputs, MethodSpec, register_method
from steerlens.methods.vector import _pair_tokens
from steerlens.metric.outcomes import complement_kl
from steerlens.prompts import PromptsLike, as_prompts
from steerlens.sites import Site

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer


def layer_deltas(
    model: HookedTransformer, pairs: ContrastPairs, layers: Sequence[int]
) -> dict[int, Tensor]:
    """Per layer, the mean over pairs of h⁺ − h⁻ at ``hook_resid_post``, last token."""
    for layer in layers:
        Site("resid_post", layer).validate(model)
    plus, minus = _pair_tokens(model, pairs)
    sites = [f"resid_post.{layer}" for layer in layers]
    acc = {"dtype": torch.float64, "device": model.cfg.device}
    total = {layer: torch.zeros(model.cfg.d_model, **acc) for layer in layers}
    for sign, side in ((1.0, plus), (-1.0, minus)):
        for tokens in side:
            with torch.no_grad(), record(model, sites) as acts:
                model(tokens[None])
            for layer in layers:
                act = acts[f"blocks.{layer}.hook_resid_post"][0, -1]
                total[layer] += sign * act.double()
    out = {layer: (v / len(pairs)).to(model.cfg.dtype) for layer, v in total.items()}
    if all(float(v.norm()) == 0 for v in out.values()):
        raise MethodError(f"every layer's difference for {pairs.name!r} is zero")
    return out


def contiguous_segments(layers: Sequence[int], n_segments: int) -> list[list[int]]:
    """``layers`` split in order into ``n_segments`` contiguous runs of near-equal length.

    >>> contiguous_segments(range(7), 3)
    [[0, 1, 2], [3, 4], [5, 6]]
    """
    layers = list(layers)
    if not 1 <= n_segments <= len(layers):
        raise InputError(
            f"segments must be between 1 and {len(layers)} (the layers), got {n_segments}"
        )
    size, extra = divmod(len(layers), n_segments)
    out, start = [], 0
    for k in range(n_segments):
        stop = start + size + (1 if k < extra else 0)
        out.append(layers[start:stop])
        start = stop
    return out


def build(
    deltas: dict[int, Tensor],
    segments: list[list[int]],
    weights: Sequence[float],
    info: dict,
    method: str = "multisite",
) -> Intervention:
    """The intervention adding w_k · Δ_l at every position of each layer l of segment k."""
    vectors = {
        f"resid_post.{layer}@all": float(w) * deltas[layer]
        for seg, w in zip(segments, weights, strict=True)
        for layer in seg
        if w != 0
    }
    if not vectors:
        vectors = {f"resid_post.{segments[0][0]}@all": 0.0 * deltas[segments[0][0]]}
    return Intervention(method, vectors, 1.0, info)


def tpe_study(seed: int) -> Any:
    """A maximizing optuna study sampled by TPE seeded ``seed`` (optuna's logging quietened)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))


def objective(
    model: HookedTransformer,
    iv: Intervention,
    prompts: Sequence[Tensor],
    concepts: Sequence[Any],
    kl_weight: float,
) -> tuple[float, float, float]:
    """(objective, mean concept probability, mean off-target KL) of ``iv`` on the prompts."""
    probs, kls = [], []
    for tokens, concept in zip(prompts, concepts, strict=True):
        with torch.no_grad():
            clean = model(tokens[None])[0, -1].double()
            with iv.apply(model):
                steered = model(tokens[None])[0, -1].double()
        probs.append(math.exp(float(concept.value(None, steered))))
        kls.append(complement_kl(clean, steered, concept.off_target().exclude))
    prob, kl = sum(probs) / len(probs), sum(kls) / len(kls)
    return prob - kl_weight * kl, prob, kl


def multisite_intervention(
    model: HookedTransformer,
    pairs: ContrastPairs,
    prompts: PromptsLike,
    concepts: Sequence[Any],
    *,
    layers: Sequence[int] | None = None,
    segments: int = 1,
    trials: int = 30,
    max_weight: float = 2.0,
    kl_weight: float = 1.0,
    seed: int = 0,
) -> Intervention:
    """Tune one weight per contiguous segment of ``layers`` (default: all) with optuna; see
    the module docstring. ``concepts[i]`` is the concept of ``prompts[i]`` (anything with
    ``value(act, logits)`` giving a log-probability and ``off_target()``, e.g. a PairConcept)."""
    toks = as_prompts(model, prompts)
    if len(concepts) != len(toks):
        raise InputError(f"{len(toks)} prompts but {len(concepts)} concepts: give one each")
    for c in concepts:
        if not isinstance(c, Concept) or c.off_target() is None:
            raise InputError(
                f"a multisite concept is read at the output (value() and an off_target(), e.g. "
                f"a PairConcept), got {c!r}"
            )
    if trials < 1 or not max_weight > 0 or kl_weight < 0:
        raise InputError(
            f"trials >= 1, max_weight > 0 and kl_weight >= 0 needed, got {trials}, "
            f"{max_weight}, {kl_weight}"
        )
    layer_list = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    if not layer_list or len(set(layer_list)) != len(layer_list):
        raise InputError(f"layers must be distinct and non-empty, got {layer_list}")
    segs = contiguous_segments(layer_list, segments)
    deltas = layer_deltas(model, pairs, layer_list)

    def run(trial: Any) -> float:
        weights = [trial.suggest_float(f"w{k}", 0.0, max_weight) for k in range(len(segs))]
        value, prob, kl = objective(
            model, build(deltas, segs, weights, {}), toks, concepts, kl_weight
        )
        trial.set_user_attr("probability", prob)
        trial.set_user_attr("off_target_kl", kl)
        return value

    study = tpe_study(seed)
    # the first trial is the unweighted injection (every weight 1), so tuning never ends worse
    study.enqueue_trial({f"w{k}": min(1.0, max_weight) for k in range(len(segs))})
    study.optimize(run, n_trials=trials)
    best = study.best_trial
    weights = [float(best.params[f"w{k}"]) for k in range(len(segs))]
    info = {
        "pairs": pairs.name,
        "segments": segs,
        "weights": weights,
        "objective": float(best.value) if best.value is not None else math.nan,
        "probability": best.user_attrs["probability"],
        "off_target_kl": best.user_attrs["off_target_kl"],
        "kl_weight": kl_weight,
        "trials": [
            {**{k: float(v) for k, v in t.params.items()}, "objective": t.value, **t.user_attrs}
            for t in study.trials
        ],
    }
    return build(deltas, segs, weights, info)


@dataclass(frozen=True)
class MultisiteConfig:
    """``layer``: one layer, a list, or None (every layer); ``segments`` contiguous runs of
    layers, one weight each in [0, ``max_weight``], tuned by ``trials`` optuna trials on
    concept − ``kl_weight``·KL."""

    layer: int | list[int] | None = None
    segments: int = 1
    trials: int = 30
    max_weight: float = 2.0
    kl_weight: float = 1.0
    seed: int = 0


def _fit_multisite(
    model: HookedTransformer, cfg: MultisiteConfig, inputs: FitInputs
) -> Intervention:
    assert inputs.prompt is not None and inputs.concepts is not None
    layers = [cfg.layer] if isinstance(cfg.layer, int) else cfg.layer
    return multisite_intervention(
        model,
        inputs.pairs,
        inputs.prompt,
        inputs.concepts,
        layers=layers,
        segments=cfg.segments,
        trials=cfg.trials,
        max_weight=cfg.max_weight,
        kl_weight=cfg.kl_weight,
        seed=cfg.seed,
    )


register_method(
    MethodSpec(
        "multisite",
        MultisiteConfig,
        _fit_multisite,
        needs=("pairs", "prompt", "concepts"),
        input_types={"pairs": ContrastPairs},
        implicit_metric="per-segment Euclidean, weights tuned by optuna",
        description="adapted from fusion steering: per-layer contrastive mean differences at "
        "every layer, one optuna-tuned weight per segment, shared across prompts (the paper's "
        "per-prompt method is `fusion`)",
    )
)
