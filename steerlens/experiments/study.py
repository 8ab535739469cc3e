"""The study: does Fisher-geometry steering beat Euclidean steering, over many independent
contexts, on every measure, against fairly set-up baselines?

Per verb concept (past, third person, -ing) the verb pairs are split by verb (no verb on both
sides). Test contexts are chosen by :func:`select_contexts`, whose rule is fixed here before any
steering result is seen and reads only the clean model: in corpus order (the corpus shuffled by
``seed``), a test context is kept when

- its pair share p_t/(p_t + p_b) is below the lowest target (there is something to steer),
- the pair holds at least :data:`MIN_PAIR_MASS` of the next token (a verb slot: either form can
  follow), and the target form has at least :data:`MIN_TARGET_PROBABILITY` (one the model can
  write there),
- its text is new and its verb has fewer than ``max_per_verb`` contexts so far;

the first ``contexts`` kept are used, and fewer than ``min_verbs`` distinct verbs (or
``contexts``, if fewer) is an error.
Training contexts (CAA's pairs, the probe, ActAdd's choice, the SAE feature) come from the
training verbs only (:mod:`steerlens.experiments.baselines`).

One unit of work is (concept, context, layer): every method to every target on that context
(:func:`~steerlens.experiments.matched.context_records`), with the generation measures, appended
to the run folder as it finishes (:mod:`steerlens.experiments.runner`: resumable, sharded over
``torchrun`` ranks). Each record also carries the context's clean p(base), p(target) and pair
mass, and a ``stratum`` of the clean target probability.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

import steerlens
from steerlens.datasets import (
    VerbContext,
    load_corpus,
    train_test_contexts,
    verb_concept,
    verb_contexts,
    verb_contrast_pairs,
)
from steerlens.errors import ConceptError, InputError
from steerlens.evaluation import next_logprobs
from steerlens.experiments.baselines import (
    ACTADD_PROMPTS,
    FIXED,
    fit_fixed,
    has_shipped_sae,
    target_followed,
)
from steerlens.experiments.matched import (
    FISHBACK_VARIANTS,
    ITERATIVE,
    MatchedSettings,
    context_records,
)
from steerlens.experiments.runner import run_units
from steerlens.experiments.verb_context import context_tokens
from steerlens.sites import Site

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer

#: a verb slot: base + target hold at least this much of the clean next-token distribution
MIN_PAIR_MASS = 1e-2
#: the target form is one the model can write there
MIN_TARGET_PROBABILITY = 1e-4
#: the strata of the clean target probability the results are also reported by
STRATA = ((0.0, 1e-3, "p_t < 1e-3"), (1e-3, 1e-2, "1e-3 ≤ p_t < 1e-2"), (1e-2, 1.0, "p_t ≥ 1e-2"))


@dataclass(frozen=True)
class StudyConfig:
    """What the study runs; see the module docstring. ``generation_tokens`` / ``samples``: the
    continuations of :func:`~steerlens.evaluation.generation_measures` per record (0: none)."""

    concepts: tuple[str, ...] = ("past", "third", "ing")
    layers: tuple[int, ...] = (6, 12, 18, 24)
    contexts: int = 30
    max_per_verb: int = 3
    min_verbs: int = 10
    targets: tuple[float, ...] = (0.5, 0.9)
    methods: tuple[str, ...] = ITERATIVE + FISHBACK_VARIANTS + FIXED
    step: float = 1.0
    damping: float = 1e-2
    train_pairs: int = 48
    sentences: int = 30000
    generation_tokens: int = 20
    samples: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        self.settings()
        if "fishback" not in self.methods:
            raise InputError("the study compares every method to fishback: keep it")
        unknown = set(self.concepts) - set(ACTADD_PROMPTS)
        if unknown or not self.concepts:
            raise InputError(
                f"concepts must be among {sorted(ACTADD_PROMPTS)}, got {self.concepts}"
            )
        if self.contexts < 1 or self.max_per_verb < 1 or self.min_verbs < 1:
            raise InputError(
                "contexts, max_per_verb and min_verbs must be >= 1, got "
                f"{self.contexts}, {self.max_per_verb}, {self.min_verbs}"
            )

    def settings(self) -> MatchedSettings:
        return MatchedSettings(
            self.targets,
            self.methods,
            self.step,
            self.damping,
            0,
            self.seed,
            self.generation_tokens,
            self.samples,
        )


@dataclass(frozen=True)
class CleanStats:
    """A context's clean next-token probabilities of its base and target forms."""

    p_base: float
    p_target: float

    @property
    def pair_mass(self) -> float:
        return self.p_base + self.p_target

    @property
    def share(self) -> float:
        return self.p_target / self.pair_mass if self.pair_mass > 0 else 0.0


def clean_stats(model: HookedTransformer, ctx: VerbContext) -> CleanStats:
    logp = next_logprobs(model, context_tokens(model, ctx))
    return CleanStats(float(logp[ctx.base_id].exp()), float(logp[ctx.target_id].exp()))


def rule_rejects(stats: CleanStats, below: float) -> str | None:
    """Why the rule of the module docstring rejects a context with these clean probabilities
    (None: it passes)."""
    if stats.share >= below:
        return "already at the lowest target"
    if stats.pair_mass < MIN_PAIR_MASS:
        return f"pair mass below {MIN_PAIR_MASS:g} (not a verb slot)"
    if stats.p_target < MIN_TARGET_PROBABILITY:
        return f"target probability below {MIN_TARGET_PROBABILITY:g}"
    return None


def select_contexts(
    model: HookedTransformer,
    candidates: Sequence[VerbContext],
    n: int,
    *,
    below: float,
    max_per_verb: int = 3,
    min_verbs: int = 10,
) -> tuple[list[tuple[VerbContext, CleanStats]], dict[str, int]]:
    """The first ``n`` ``candidates`` the rule keeps, with their clean probabilities, and the
    count of candidates rejected for each reason. :class:`ConceptError` if fewer than ``n`` pass
    or they span fewer than ``min_verbs`` verbs (``n``, when ``n`` is smaller)."""
    kept: list[tuple[VerbContext, CleanStats]] = []
    rejected: dict[str, int] = {}
    per_verb: dict[str, int] = {}
    texts: set[str] = set()
    for ctx in candidates:
        if len(kept) == n:
            break
        if ctx.text in texts:
            reason: str | None = "repeated text"
        elif per_verb.get(ctx.verb, 0) >= max_per_verb:
            reason = f"verb already has {max_per_verb} contexts"
        else:
            stats = clean_stats(model, ctx)
            reason = rule_rejects(stats, below)
        if reason is not None:
            rejected[reason] = rejected.get(reason, 0) + 1
            continue
        texts.add(ctx.text)
        per_verb[ctx.verb] = per_verb.get(ctx.verb, 0) + 1
        kept.append((ctx, stats))
    verbs = len(per_verb)
    if len(kept) < n or verbs < min(min_verbs, n):
        raise ConceptError(
            f"the context rule kept {len(kept)} of {len(candidates)} candidates over {verbs} "
            f"verbs; need {n} over at least {min_verbs} (rejected: {rejected}); search more "
            "sentences"
        )
    return kept, rejected


def stratum(p_target: float) -> str:
    return next(name for lo, hi, name in STRATA if lo <= p_target < hi or hi == 1.0)


@dataclass
class _Concept:
    mapping: Any
    split: Any
    test: list[tuple[VerbContext, CleanStats]]
    followed: list[VerbContext]
    rejected: dict[str, int]


class Study:
    """The study of the module docstring on one model: ``units`` are its keys, ``work(key)``
    one unit's records (concept data and fixed baselines prepared once, lazily)."""

    def __init__(self, model: HookedTransformer, cfg: StudyConfig) -> None:
        for layer in cfg.layers:
            Site("resid_post", layer).validate(model)
        self.model, self.cfg = model, cfg
        self._sentences: list[str] | None = None
        self._concepts: dict[str, _Concept] = {}
        self._fixed: dict[tuple[str, int], Any] = {}
        # context-major: a run stopped part-way holds the first contexts of every concept at
        # every layer, not every context of the first concept
        self.units = [
            f"{kind}/{i:03d}/{layer}"
            for i in range(cfg.contexts)
            for kind in cfg.concepts
            for layer in cfg.layers
        ]

    def manifest(self) -> dict[str, Any]:
        return {
            "study": asdict(self.cfg),
            "model": str(self.model.cfg.model_name),
            "steerlens": steerlens.__version__,
        }

    def concept(self, kind: str) -> _Concept:
        if kind not in self._concepts:
            cfg = self.cfg
            if self._sentences is None:
                self._sentences = load_corpus("sotu", seed=cfg.seed)[: cfg.sentences]
            mapping = verb_concept(self.model, kind)
            found = verb_contexts(self.model, mapping, self._sentences, 4000, max_per_verb=8)
            split = train_test_contexts(found, mapping, test_fraction=0.3, seed=cfg.seed)
            test, rejected = select_contexts(
                self.model,
                split.test,
                cfg.contexts,
                below=min(cfg.targets),
                max_per_verb=cfg.max_per_verb,
                min_verbs=cfg.min_verbs,
            )
            followed = target_followed(self.model, mapping, split, self._sentences, cfg.train_pairs)
            self._concepts[kind] = _Concept(mapping, split, test, followed, rejected)
        return self._concepts[kind]

    def fixed(self, kind: str, layer: int) -> tuple[MatchedSettings, Any]:
        settings = self.cfg.settings()
        if "sae" in settings.methods and not has_shipped_sae(self.model, layer):
            settings = replace(settings, methods=tuple(m for m in settings.methods if m != "sae"))
        if (kind, layer) not in self._fixed:
            data = self.concept(kind)
            train = data.split.train[: self.cfg.train_pairs]
            self._fixed[(kind, layer)] = fit_fixed(
                self.model,
                settings.methods,
                verb_contrast_pairs(train, name=kind),
                layer,
                train,
                seed=self.cfg.seed,
                actadd_prompts=ACTADD_PROMPTS[kind],
                target_contexts=data.followed,
                damping=self.cfg.damping,
            )
        return settings, self._fixed[(kind, layer)]

    def unit(self, key: str) -> UnitInputs:
        """What unit ``key`` steers: its context, layer, settings, fitted fixed directions, the
        concept's merge pairs and the columns every record of the unit carries."""
        kind, index, layer_text = key.split("/")
        layer = int(layer_text)
        data = self.concept(kind)
        ctx, stats = data.test[int(index)]
        settings, fixed = self.fixed(kind, layer)
        common = {
            "concept": kind,
            "context_index": int(index),
            "p_base_clean": stats.p_base,
            "p_target_clean": stats.p_target,
            "pair_mass_clean": stats.pair_mass,
            "stratum": stratum(stats.p_target),
        }
        return UnitInputs(ctx, layer, settings, fixed, data.mapping.as_dict(), common)

    def work(self, key: str) -> list[dict[str, Any]]:
        u = self.unit(key)
        return context_records(self.model, u.ctx, u.layer, u.settings, u.fixed, u.merge, u.common)


@dataclass(frozen=True)
class UnitInputs:
    """One unit's inputs (:meth:`Study.unit`)."""

    ctx: VerbContext
    layer: int
    settings: MatchedSettings
    fixed: dict[str, Any]
    merge: dict[int, int]
    common: dict[str, Any]


def run_study(
    model: HookedTransformer,
    cfg: StudyConfig,
    folder: str | Path,
    *,
    progress: bool = True,
) -> pd.DataFrame | None:
    """Run (or resume) the study into ``folder``; under ``torch.distributed`` each rank takes a
    share of the units and rank 0 merges. Returns the merged records on rank 0, else None."""
    from tqdm.auto import tqdm

    study = Study(model, cfg)
    bar = tqdm(total=len(study.units), disable=not progress, desc="study")

    def advance(_: str) -> None:
        bar.update()

    records = run_units(folder, study.manifest(), study.units, study.work, progress=advance)
    bar.close()
    return records


def reached_table(records: pd.DataFrame) -> pd.DataFrame:
    """Per method and layer: runs, reached, and the unreached runs' reasons with counts."""
    frame: Any = records
    rows = []
    for (method, layer), group in frame.groupby(["method", "layer"], sort=True):
        missed = group[~group["reached"].astype(bool)]
        reasons = missed["reason"].value_counts() if "reason" in missed else pd.Series(dtype=int)
        rows.append(
            {
                "method": method,
                "layer": layer,
                "runs": len(group),
                "reached": int(group["reached"].astype(bool).sum()),
                "unreached, why": "; ".join(f"{r}: {n}" for r, n in reasons.items()) or "—",
            }
        )
    return pd.DataFrame(rows)


def generation_table(records: pd.DataFrame) -> pd.DataFrame:
    """Per method (reached runs): the mean fraction of continuations whose next word is the
    target form (greedy, sampled) and the median perplexity under the clean model."""
    frame: Any = records
    cols = [
        "target_first_greedy",
        "target_first_sampled",
        "perplexity_greedy",
        "perplexity_sampled",
    ]
    if not set(cols) <= set(frame.columns):
        return pd.DataFrame()
    ok = frame[frame["reached"].astype(bool)]
    out = ok.groupby("method").agg(
        runs=("method", "size"),
        target_first_greedy=("target_first_greedy", "mean"),
        target_first_sampled=("target_first_sampled", "mean"),
        perplexity_greedy_median=("perplexity_greedy", "median"),
        perplexity_sampled_median=("perplexity_sampled", "median"),
    )
    return out.reset_index()
