"""Benchmark: a FishBack run against a Euclidean run on the same contexts, side by side.

    .venv/bin/python bench/steering.py        # writes bench/results/steering.{md,csv}
    .venv/bin/python bench/steering.py --variants exact trace_kept=0.99 metric_every=3
    .venv/bin/python bench/steering.py --variants exact precision=float64

On the default model, past-tense contexts from the State of the Union corpus, resid_post of a
middle layer: each method steers the pair share p_t / (p_t + p_b) from its clean value to 0.5
with the same concept ladder (1 nat per step). Reports wall time per run and per step, steps, and
the off-target KL each pays. ``--variants`` adds FishBack runs with speed options
(``trace_kept=<f>``, ``metric_every=<k>``, ``dropped_mass=<f>``, ``precision=float64``, combined
with ``,``), each beside the same Euclidean
run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import UTC, datetime

import pandas as pd
import torch
from common import header, machine, save, sync

import steerlens as sl
from steerlens.concepts import PairConcept
from steerlens.datasets import load_corpus, train_test_contexts, verb_concept, verb_contexts
from steerlens.evaluation import next_logprobs, outcome_measures
from steerlens.methods import EuclideanConfig, FishBackConfig, steer_iteratively


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--contexts", type=int, default=4)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--variants", nargs="+", default=["exact"], help="FishBack options")
    parser.add_argument("--out", default="steering", help="results file stem")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    variants = {v: _options(v) for v in args.variants}
    torch.set_num_threads(args.threads)
    model = sl.load_model(device=args.device)
    mapping = verb_concept(model, "past")
    found = verb_contexts(model, mapping, load_corpus("sotu")[:20000], 200, max_per_verb=3)
    test = train_test_contexts(found, mapping).test[: args.contexts]
    site = f"resid_post.{args.layer}"
    rows = []
    for ctx in test:
        tokens = torch.tensor(ctx.token_ids)
        concept = PairConcept(ctx.base_id, ctx.target_id)
        clean = next_logprobs(model, tokens)
        configs = [("euclidean", EuclideanConfig(site, 0.5, step=1.0))]
        configs += [
            (
                f"fishback {v}" if v != "exact" else "fishback",
                FishBackConfig(site, 0.5, step=1.0, **o),
            )
            for v, o in variants.items()
        ]
        for name, cfg in configs:
            sync()
            start = time.perf_counter()
            run = steer_iteratively(model, cfg, concept, tokens)
            iv = run.intervention
            sync()
            seconds = time.perf_counter() - start
            steered = next_logprobs(model, tokens, iv)
            measures = outcome_measures(clean, steered, ctx.target_id, base=ctx.base_id)
            rows.append(
                {
                    "context": ctx.text[-40:],
                    "method": name,
                    "reached": run.reached,
                    "steps": run.steps,
                    "seconds": seconds,
                    "seconds_per_step": seconds / max(run.steps, 1),
                    "off_target_kl": measures.off_target_kl,
                }
            )
    frame = pd.DataFrame(rows)
    wide = frame.pivot(index="context", columns="method", values="seconds")
    kl = frame.pivot(index="context", columns="method", values="off_target_kl")
    lines = [
        *header("FishBack vs Euclidean steering: wall time"),
        "",
        f"{datetime.now(UTC):%Y-%m-%d}, {machine(args.device, args.threads)}, "
        f"torch {torch.__version__}, site {site}, target pair share 0.5.",
        "",
    ]
    for name, _ in configs[1:]:
        ratio = (wide[name] / wide["euclidean"]).tolist()
        kl_ratio = (kl["euclidean"] / kl[name]).tolist()
        lines += [
            f"- {name} / Euclidean wall time per run: median {statistics.median(ratio):.2f}× "
            f"(range {min(ratio):.2f}–{max(ratio):.2f}×); Euclidean / {name} off-target KL: "
            f"median {statistics.median(kl_ratio):.3g}× "
            f"(range {min(kl_ratio):.3g}–{max(kl_ratio):.3g}×)",
        ]
    lines += ["", frame.to_markdown(index=False, floatfmt=".4g")]
    save(args.out, lines, frame)
    print("\n".join(lines))


def _options(variant: str) -> dict[str, float | int | str]:
    """``exact`` → {}; ``trace_kept=0.99,metric_every=3`` → those FishBack options."""
    if variant == "exact":
        return {}
    out: dict[str, float | int | str] = {}
    for part in variant.split(","):
        key, _, value = part.partition("=")
        if key not in ("trace_kept", "metric_every", "dropped_mass", "precision") or not value:
            raise SystemExit(
                f"bad variant {variant!r}: use trace_kept=, metric_every=, dropped_mass=, "
                "precision="
            )
        if key == "precision":
            out[key] = value
        else:
            out[key] = int(value) if key == "metric_every" else float(value)
    return out


if __name__ == "__main__":
    main()
