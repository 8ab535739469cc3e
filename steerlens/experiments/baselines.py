"""The fixed-direction baselines of the matched-share experiments, each set up as its authors ran
it: CAA (Rimsky et al.) at every position and at the prediction position, ActAdd (Turner et al.)
from two short prompts of different content, a linear probe of the next token's form, and the
shipped SAE's best-matching feature.

How each is chosen is fixed here, before any steering result is seen:

- **CAA**: the mean of h⁺ − h⁻ over contrast pairs (a training context followed by the target
  form vs by the base form), read at ``resid_post`` at the last token; ``caa`` adds it at every
  position (``@all``), ``caa_last`` at the prediction position of every pass (``@last``: the
  prompt's last token, then each generated token).
- **ActAdd**: one prompt pair of different content for the concept (:data:`ACTADD_PROMPTS` for
  the verb concepts, plus the first training verbs' own target and base words as one-word
  prompts), padded to one length with a space token as Turner et al. pad, read at ``resid_pre``
  and added at the first positions of the user's prompt. Among the candidates, the pair whose
  vector raises the log pair share most on average over up to 8 training contexts, at
  coefficient 1 or 4 (the better of the two), is used.
- **probe**: logistic regression at ``resid_post.layer`` on the last token of training contexts,
  label 1 where the corpus continued with the target form and 0 where it continued with the
  base form: it reads "the next token will be the target form". Without target-followed
  contexts it falls back to the token-form probe (the context followed by the target vs the base
  form, read on that token), which reads "this token is the target form".
- **FishBack transfer**: one vector per concept and layer from training contexts, the natural
  gradient of the mean concept under the expected off-target metric (:func:`fit_transfer`),
  applied unchanged to held-out contexts and scaled like the other fixed directions — the fair
  comparison with CAA, which is fitted on the same contexts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from steerlens.concepts import PairMapping
from steerlens.concepts.pairs import ContrastPairs
from steerlens.concepts.probes import train_probe
from steerlens.concepts.sae import SaeFeature
from steerlens.datasets import VerbContext, verb_contexts
from steerlens.datasets.contexts import ContextSplit
from steerlens.errors import InputError
from steerlens.evaluation import next_logprobs
from steerlens.experiments.verb_context import context_tokens, pair_concept, pair_share
from steerlens.methods.intervention import Intervention
from steerlens.methods.vector import (
    actadd_intervention,
    caa_intervention,
    probe_intervention,
    sae_intervention,
)
from steerlens.metric.local import LocalPath
from steerlens.metric.pullback import MetricOptions
from steerlens.sites import Site

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer

#: the fixed-direction methods this module fits
FIXED = ("caa", "caa_last", "actadd", "probe", "sae", "fishback_transfer")

#: training contexts the transfer vector's expected metric and gradient are averaged over
TRANSFER_CONTEXTS = 16

#: ActAdd prompt pairs (plus, minus) per verb concept: short prompts whose content, not a shared
#: context, differs — a past-tense cue against a base-form (future) cue, a singular subject
#: against a plural one, a progressive auxiliary against a modal
ACTADD_PROMPTS: dict[str, tuple[tuple[str, str], ...]] = {
    "past": (("Yesterday", "Tomorrow"), ("In the past", "In the future")),
    "third": (("He", "They"), ("She often", "They often")),
    "ing": (("They are", "They will"), ("is", "will")),
}

#: training contexts ActAdd's candidates are scored on, and the coefficients tried
ACTADD_SCORING_CONTEXTS = 8
ACTADD_COEFFICIENTS = (1.0, 4.0)


def fit_fixed(
    model: HookedTransformer,
    methods: Sequence[str],
    pairs: ContrastPairs,
    layer: int,
    train: Sequence[VerbContext] = (),
    *,
    seed: int = 0,
    actadd_prompts: Sequence[tuple[str, str]] = (),
    target_contexts: Sequence[VerbContext] = (),
    damping: float = 1e-2,
) -> dict[str, Intervention]:
    """The methods of ``methods`` that are in :data:`FIXED`, fitted at ``layer`` as the module
    docstring says: CAA on ``pairs``; ActAdd from ``actadd_prompts`` (and the word pairs of the
    ``train`` contexts' verbs), scored on ``train``; the probe on ``train`` (followed by the
    base form) against ``target_contexts`` (followed by the target form); the shipped SAE's
    feature matched on ``train`` (:class:`ConceptError` if none ships: :func:`has_shipped_sae`);
    the FishBack transfer vector (:func:`fit_transfer`) on ``train`` with ``damping``."""
    out: dict[str, Intervention] = {}
    if "sae" in methods:
        from steerlens.concepts.sae import pretrained_sae

        sae = pretrained_sae(model, f"resid_post.{layer}", dtype=str(model.cfg.dtype)[6:])
        if not train:
            raise InputError("the SAE feature is chosen on training contexts: none given")
        feature = matching_sae_feature(model, sae, Site("resid_post", layer), train)
        out["sae"] = sae_intervention(model, feature)
    if "caa" in methods or "caa_last" in methods:
        caa = caa_intervention(model, pairs, layer)
        if "caa" in methods:
            out["caa"] = caa
        if "caa_last" in methods:
            last = Site("resid_post", layer).name
            out["caa_last"] = Intervention("caa_last", {last: caa.vector()}, info=dict(caa.info))
    if "actadd" in methods:
        out["actadd"] = fit_actadd(model, layer, train, actadd_prompts)
    if "probe" in methods:
        out["probe"] = fit_probe_baseline(model, layer, pairs, train, target_contexts, seed)
    if "fishback_transfer" in methods:
        out["fishback_transfer"] = fit_transfer(model, layer, train, damping)
    return out


def fit_transfer(
    model: HookedTransformer,
    layer: int,
    train: Sequence[VerbContext],
    damping: float = 1e-2,
) -> Intervention:
    """One FishBack vector for a concept at ``resid_post.layer``, fitted on training contexts
    and applied unchanged elsewhere: the natural gradient of the mean concept under the expected
    off-target metric, v = (E[G_off] + λI)⁻¹ E[g] (unit norm), with λ = ``damping``·tr E[G]/d,
    over the first :data:`TRANSFER_CONTEXTS` of ``train`` at their clean points."""
    used = list(train[:TRANSFER_CONTEXTS])
    if not used:
        raise InputError("the transfer vector is fitted on training contexts: none given")
    site = Site("resid_post", layer)
    mean_g: torch.Tensor | None = None
    mean_G: torch.Tensor | None = None
    for ctx in used:
        concept = pair_concept(ctx)
        with LocalPath(model, context_tokens(model, ctx), site) as path:
            with torch.enable_grad():
                x = path.x0.clone().requires_grad_(True)
                (g,) = torch.autograd.grad(concept.value(x, path.logits(x)), x)
            options = MetricOptions(off_target=concept.off_target(), precision="float32")
            big = path.metric(path.x0, options).matrix().double()
        g = g.detach().double()
        mean_g = g if mean_g is None else mean_g + g
        mean_G = big if mean_G is None else mean_G + big
    assert mean_g is not None and mean_G is not None
    mean_g, mean_G = mean_g / len(used), mean_G / len(used)
    lam = damping * float(torch.trace(mean_G)) / mean_G.shape[0]
    eye = torch.eye(mean_G.shape[0], dtype=mean_G.dtype, device=mean_G.device)
    v = torch.linalg.solve(mean_G + lam * eye, mean_g)
    v = (v / v.norm()).to(model.cfg.dtype)
    info = {"contexts": len(used), "damping": damping, "metric": "expected off-target Fisher"}
    return Intervention("fishback_transfer", {site.name: v}, info=info)


def actadd_candidates(
    train: Sequence[VerbContext], prompts: Sequence[tuple[str, str]] = (), words: int = 2
) -> list[tuple[str, str]]:
    """``prompts``, then the target and base words of the first ``words`` distinct training
    verbs as one-word prompts (``"walked"`` vs ``"walk"``), duplicates dropped."""
    out = list(dict.fromkeys(prompts))
    verbs = list(dict.fromkeys((c.target_word, c.verb) for c in train))[:words]
    for target, base in verbs:
        pair = (target.replace("▁", " ").strip(), base.replace("▁", " ").strip())
        if pair[0] and pair[1] and pair not in out:
            out.append(pair)
    return out


def _space_token(model: HookedTransformer) -> int | None:
    try:
        return int(model.to_single_token(" "))
    except (AssertionError, KeyError, ValueError, AttributeError):
        return None


def fit_actadd(
    model: HookedTransformer,
    layer: int,
    train: Sequence[VerbContext],
    prompts: Sequence[tuple[str, str]] = (),
) -> Intervention:
    """ActAdd as the module docstring says: the best of :func:`actadd_candidates` on ``train``;
    ``info`` records every candidate's score and the pair chosen."""
    candidates = actadd_candidates(train, prompts)
    if not candidates:
        raise InputError("ActAdd needs prompt pairs or training contexts to take its words from")
    scoring = list(train[:ACTADD_SCORING_CONTEXTS])
    if not scoring:
        raise InputError("ActAdd's prompt pair is chosen on training contexts: none given")
    pad = _space_token(model)
    tokens = [context_tokens(model, c) for c in scoring]
    clean = [
        float(pair_share(next_logprobs(model, t), c).log())
        for t, c in zip(tokens, scoring, strict=True)
    ]
    scores: list[float] = []
    fitted: list[Intervention] = []
    for plus, minus in candidates:
        iv = actadd_intervention(model, plus, minus, layer, pad_token=pad)
        best = -float("inf")
        for coefficient in ACTADD_COEFFICIENTS:
            gains = [
                float(pair_share(next_logprobs(model, t, iv.scaled(coefficient)), c).log()) - base
                for t, c, base in zip(tokens, scoring, clean, strict=True)
            ]
            best = max(best, sum(gains) / len(gains))
        scores.append(best)
        fitted.append(iv)
    pick = max(range(len(candidates)), key=lambda i: scores[i])
    info = dict(fitted[pick].info)
    info |= {
        "prompts": list(candidates[pick]),
        "candidates": [list(c) for c in candidates],
        "candidate_scores": scores,
    }
    return Intervention("actadd", fitted[pick].vectors, info=info)


def inverted(mapping: PairMapping) -> PairMapping:
    """The mapping read backwards (target → base), for finding contexts that the corpus
    continued with a target form; a target shared by several bases keeps its first base."""
    pairs: dict[int, tuple[int, tuple[str, str]]] = {}
    for base, target, (bw, tw) in zip(
        mapping.bases, mapping.targets, mapping.pairs_words, strict=True
    ):
        pairs.setdefault(target, (base, (tw, bw)))
    return PairMapping(
        f"{mapping.name} (inverted)",
        tuple(pairs),
        tuple(b for b, _ in pairs.values()),
        tuple(w for _, w in pairs.values()),
    )


def target_followed(
    model: HookedTransformer,
    mapping: PairMapping,
    split: ContextSplit,
    sentences: Sequence[str],
    n: int,
    *,
    max_per_verb: int = 4,
) -> list[VerbContext]:
    """Up to ``n`` contexts (in sentence order) that the corpus continued with a target form of
    one of ``split``'s training verbs — the positives of the next-form probe. Each is returned
    as read backwards: its ``base_id`` is the target form that followed."""
    train_bases = set(split.train_mapping.bases)
    found = verb_contexts(model, inverted(mapping), sentences, 20 * n, max_per_verb=max_per_verb)
    return [c for c in found if c.target_id in train_bases][:n]


def fit_probe_baseline(
    model: HookedTransformer,
    layer: int,
    pairs: ContrastPairs,
    train: Sequence[VerbContext],
    target_contexts: Sequence[VerbContext],
    seed: int = 0,
) -> Intervention:
    """The probe baseline of the module docstring: the next-form probe where
    ``target_contexts`` are given, the token-form probe on ``pairs`` otherwise; ``info["reads"]``
    says which."""
    site = Site("resid_post", layer)
    if target_contexts:
        if not train:
            raise InputError("the next-form probe needs base-followed training contexts too")
        positive = [context_tokens(model, c) for c in target_contexts]
        negative = [context_tokens(model, c) for c in train]
        probe = train_probe(model, site, positive, negative, seed=seed)
        reads = "the next token's form"
    else:
        if pairs.token_pairs is None:
            raise InputError("the probe here needs contrast pairs with token ids")
        probe = train_probe(
            model,
            site,
            [torch.tensor(p) for p, _ in pairs.token_pairs],
            [torch.tensor(m) for _, m in pairs.token_pairs],
            seed=seed,
        )
        reads = "this token's form"
    iv = probe_intervention(model, probe, site)
    return Intervention("probe", iv.vectors, info=dict(iv.info) | {"reads": reads})


def has_shipped_sae(model: HookedTransformer, layer: int) -> bool:
    """Whether steerlens ships an SAE for ``resid_post.layer`` of this model."""
    from steerlens.concepts.sae import shipped_saes

    return f"resid_post.{layer}" in shipped_saes().get(str(model.cfg.model_name), [])


def matching_sae_feature(
    model: HookedTransformer, sae: Any, site: Site, contexts: Sequence[VerbContext]
) -> SaeFeature:
    """The feature whose decoder row raises the concept most per unit norm, on average over
    ``contexts`` at their clean points: argmax_f mean gᵀW_dec[f]/‖W_dec[f]‖ — the SAE's best
    single-feature match for moving this concept at this site."""
    if not contexts:
        raise InputError("no contexts to match an SAE feature on")
    w_dec = sae.W_dec.detach().to(torch.float64)
    units = w_dec / w_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    score = torch.zeros(units.shape[0], dtype=torch.float64, device=units.device)
    for ctx in contexts:
        with LocalPath(model, context_tokens(model, ctx), site) as path, torch.enable_grad():
            x = path.x0.clone().requires_grad_(True)
            value = pair_concept(ctx).value(x, path.logits(x))
            (g,) = torch.autograd.grad(value, x)
        score += units @ g.detach().double() / g.norm().double().clamp_min(1e-30)
    best = int(score.argmax())
    return SaeFeature(sae, best, site.name, f"sae feature {best} at {site.name}")
