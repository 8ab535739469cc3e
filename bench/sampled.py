"""Benchmark: the sampled expected metric against the exact one, error against compute time.

    .venv/bin/python bench/sampled.py --prompts 800     # bench/results/sampled.{md,csv}
    .venv/bin/python bench/sampled.py --analyze         # rewrite the results from the work dir

On the default model at one site (``resid_post.15``), prompts of ``--length`` tokens cut from the
State of the Union corpus (as ``bench/streaming.py`` makes them). For each prompt in turn, the exact
metric (``samples=None``: top-K outcomes plus the rest row) and the sampled one at each ``--k``
(``samples=k``, seed = the prompt's index) are computed one after the other, in an order that
rotates from prompt to prompt, each timed in elapsed and process CPU seconds. Each prompt's d×d
matrices (float32) and times go to ``--work``, so a run that stops resumes where it left off.

Two measurements, both as relative Frobenius error ‖Ĝ − G‖_F / ‖G‖_F:

- **against a reference**: the prompts split in two halves; the reference is the exact estimator
  over the second half, and each estimator's mean over n prompts of the first half (in random
  orders, RMS over ``--orders`` of them) is compared with it, beside the time those n prompts
  cost. The reference has an error of its own, estimated below, that sets a floor on this curve.
- **from the per-prompt spread**: every estimator here is a mean of i.i.d. per-prompt terms X_i,
  so E‖X̄_n − G‖²_F = σ²/n with σ² = E‖X − G‖²_F, estimated from all prompts without a reference
  (‖G‖²_F likewise, unbiasedly, from the exact terms). The time to reach a relative error e is
  then σ²/(e²‖G‖²_F) prompts times the mean time per prompt; the curve above checks the law.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from common import header, machine, save
from streaming import short_prompts

import steerlens as sl
from steerlens.models import DEFAULT_MODEL

TARGET = 0.05


def load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def collect(args: argparse.Namespace, work: Path) -> None:
    """Per-prompt matrices and times into ``work`` (skipping prompts already there)."""
    torch.set_num_threads(args.threads)
    model = sl.load_model()
    log = work / "times.jsonl"
    done = (
        {json.loads(line)["prompt"] for line in log.read_text().splitlines()}
        if log.exists()
        else set()
    )
    names = ["exact", *(f"k{k}" for k in args.k)]
    for i, tokens in enumerate(short_prompts(model, args.prompts, args.length)):
        if i in done:
            continue
        row: dict[str, float | int] = {"prompt": i, "load_before": load()}
        grams = {}
        for j in range(len(names)):
            name = names[(i + j) % len(names)]
            samples = None if name == "exact" else int(name[1:])
            wall, cpu = time.perf_counter(), time.process_time()
            (metric,) = sl.expected_metric(
                model, [tokens], args.site, samples=samples, seed=i, progress=False
            ).values()
            grams[name] = metric.matrix().float().contiguous()
            row[f"{name}_s"] = time.perf_counter() - wall
            row[f"{name}_cpu_s"] = time.process_time() - cpu
        row["load_after"] = load()
        torch.save(grams, work / f"{i:05d}.pt")
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def analyze(args: argparse.Namespace, work: Path, meta: dict) -> None:
    times = pd.DataFrame([json.loads(s) for s in (work / "times.jsonl").read_text().splitlines()])
    times = times.sort_values("prompt").drop_duplicates("prompt").reset_index(drop=True)
    names = ["exact", *(f"k{k}" for k in meta["k"])]
    n = len(times)
    half = n // 2
    gen = np.random.default_rng(0)
    orders = [gen.permutation(half) for _ in range(args.orders)]
    checkpoints = sorted({int(c) for c in np.geomspace(1, half, 14)})
    var, errors = {}, {}
    ref = None
    for name in names:  # one estimator's n × d² matrices in memory at a time
        x = torch.stack([torch.load(work / f"{i:05d}.pt")[name].flatten() for i in times["prompt"]])
        mean = x.double().mean(0)
        # reference-free spread: σ² = E‖X − G‖², the unbiased sample estimate
        var[name] = sum(float((row.double() - mean).pow(2).sum()) for row in x) / (n - 1)
        if name == "exact":
            g2 = float(mean.pow(2).sum()) - var[name] / n  # ‖G‖², unbiased
            ref = x[half:].double().mean(0)  # the reference: exact over the second half
            d = int(round(x.shape[1] ** 0.5))
            traces = x.view(n, d, d).diagonal(dim1=1, dim2=2).sum(-1).double()
            # participation ratio (tr G)² / ‖G‖²_F: per prompt, and of the mean
            pr_each = float((traces**2 / x.double().pow(2).sum(1)).median())
            pr_mean = float(mean.view(d, d).trace() ** 2 / mean.pow(2).sum())
        assert ref is not None
        errs = np.zeros((len(orders), len(checkpoints)))
        for o, order in enumerate(orders):  # running means of the first half in random orders
            total, at = torch.zeros_like(ref), 0
            for c_i, c in enumerate(checkpoints):
                total += x[order[at:c]].double().sum(0)
                at = c
                errs[o, c_i] = float((total / c - ref).norm() / ref.norm())
        errors[name] = np.sqrt(np.mean(errs**2, axis=0))
        del x
    ref_err = (var["exact"] / (n - half) / g2) ** 0.5
    rows = []
    for name in names:
        wall = float(times[f"{name}_s"].mean())
        cpu = float(times[f"{name}_cpu_s"].mean())
        for c_i, c in enumerate(checkpoints):
            rows.append(
                {
                    "estimator": name,
                    "prompts": c,
                    "seconds": c * wall,
                    "cpu_seconds": c * cpu,
                    "error_vs_reference": float(errors[name][c_i]),
                    "predicted": ((var[name] / c + var["exact"] / (n - half)) / g2) ** 0.5,
                }
            )
    curve = pd.DataFrame(rows)
    summary = []
    for name in names:
        wall = float(times[f"{name}_s"].mean())
        cpu = float(times[f"{name}_cpu_s"].mean())
        n5 = var[name] / (TARGET**2 * g2)
        reached = curve[(curve.estimator == name) & (curve.error_vs_reference <= TARGET)]
        summary.append(
            {
                "estimator": name,
                "s_per_prompt": wall,
                "cpu_s_per_prompt": cpu,
                "rel_sd_per_prompt": (var[name] / g2) ** 0.5,
                "prompts_to_5pct": n5,
                "seconds_to_5pct": n5 * wall,
                "cpu_seconds_to_5pct": n5 * cpu,
                "measured_seconds_to_5pct": float(reached.seconds.min()) if len(reached) else None,
            }
        )
    table = pd.DataFrame(summary)
    exact = table.iloc[0]
    table["speedup"] = exact.seconds_to_5pct / table.seconds_to_5pct
    table["cpu_speedup"] = exact.cpu_seconds_to_5pct / table.cpu_seconds_to_5pct
    best = table.iloc[1:].sort_values("speedup", ascending=False).iloc[0]
    ks = np.array(meta["k"], dtype=float)
    floor = float(np.polyfit(ks, table.s_per_prompt.iloc[1:].to_numpy(), 1)[1])
    frame = curve.merge(table[["estimator", "speedup"]], on="estimator")
    lines = [
        *header("Sampled vs exact expected metric: error against compute time"),
        "",
        f"Collected with `.venv/bin/python {meta['command']}`.",
        "",
        f"{meta['date']}, {machine('cpu', meta['threads'])}, torch {torch.__version__}; default "
        f"model ({meta['model']}), site {meta['site']}, {n} prompts of {meta['length']} tokens "
        f"(State of the Union sentences), samples k in {meta['k']}. The machine was shared with "
        f"other developers' runs (2 cores): load average {times.load_before.iloc[0]:.1f} at the "
        f"first prompt, {times.load_after.iloc[-1]:.1f} at the last, mean "
        f"{times.load_before.mean():.1f}. Every estimator ran on the same prompts, interleaved, "
        "so the load hit them alike; CPU seconds are the process's own and less disturbed.",
        "",
        f"**Reference: the exact estimator over {n - half} prompts, not the issue's 2,000.** A "
        "2,000-prompt exact reference did not fit this machine (the exact metric costs "
        f"{exact.s_per_prompt:.1f} s a prompt here). The reference's own relative error, "
        f"√(σ²_exact / {n - half}) / ‖G‖, is about {ref_err:.1%}: the curve against it cannot "
        f"fall below that floor, and 5% is read from the per-prompt spread instead. (Even the "
        f"issue's 2,000-prompt reference would be off by about "
        f"{(var['exact'] / 2000 / g2) ** 0.5:.0%} on these prompts.)",
        "",
        f"Why the spread is large: one prompt's metric here is concentrated in a few directions "
        f"(median participation ratio (tr G)²/‖G‖²_F {pr_each:.1f} of d = {d}), and those "
        f"directions differ from prompt to prompt, so the mean spreads over many more "
        f"({pr_mean:.0f}), and a relative Frobenius error of 5% takes "
        f"{exact.prompts_to_5pct:,.0f} prompts of the exact estimator. That estimator uses "
        "`vocab='auto'` (dropped mass 1e-4, a lower bound); the sampled one is unbiased for the "
        "full-vocabulary metric; the difference is far below these errors.",
        "",
        "## Time to 5% relative Frobenius error",
        "",
        f"From the per-prompt spread over all {n} prompts: a mean over n prompts has relative "
        "error √(σ²/n)/‖G‖_F, σ² = E‖X − G‖²_F per prompt (the prompt-to-prompt spread of the "
        "metric, plus for the sampled estimator the draws' own variance). `rel_sd_per_prompt` is "
        "σ/‖G‖_F; `prompts_to_5pct` = σ²/(0.05²‖G‖²_F); seconds are that times the mean time per "
        "prompt. `measured_seconds_to_5pct`: the first checkpoint where the curve against the "
        "reference is below 5% (empty: not reached).",
        "",
        table.to_markdown(index=False, floatfmt=".4g"),
        "",
        f"**Goal (≥ 5× sooner): {'met' if best.speedup >= 5 else 'not met'}.** The best sampled "
        f"estimator, {best.estimator}, reaches 5% {best.speedup:.2f}× sooner in elapsed time "
        f"({best.cpu_speedup:.2f}× in CPU time). A sampled prompt's time barely grows with k: "
        f"a line through the k's gives {floor:.2f} s at k = 0 (the forward pass and the fixed "
        f"cost of each block's pullback), so even with no sampling noise at all the speed-up "
        f"would be at most {exact.s_per_prompt / floor:.1f}× here. {best.estimator}'s draws add "
        f"{(best.rel_sd_per_prompt / exact.rel_sd_per_prompt) ** 2 - 1:.0%} to the per-prompt "
        "variance, which the prompt-to-prompt spread dominates.",
        "",
        "## Error against the reference, by prompts and seconds",
        "",
        f"RMS over {args.orders} random orders of the first {half} prompts; `predicted` is "
        "√((σ²/n + σ²_exact/n_ref)/‖G‖²_F), the spread law plus the reference's own error.",
        "",
        curve.pivot_table(index="prompts", columns="estimator", values="error_vs_reference")
        .reset_index()
        .to_markdown(index=False, floatfmt=".4g"),
        "",
        "Predicted:",
        "",
        curve.pivot_table(index="prompts", columns="estimator", values="predicted")
        .reset_index()
        .to_markdown(index=False, floatfmt=".4g"),
    ]
    save(args.out, lines, frame)
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=800)
    parser.add_argument("--length", type=int, default=12)
    parser.add_argument("--site", default="resid_post.15")
    parser.add_argument("--k", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--orders", type=int, default=50)
    parser.add_argument("--work", default="/tmp/steerlens-bench-sampled")
    parser.add_argument("--analyze", action="store_true", help="only rewrite the results")
    parser.add_argument("--out", default="sampled", help="results file stem")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    meta_path = work / "meta.json"
    if not args.analyze:
        command = " ".join([f"bench/{Path(sys.argv[0]).name}", *sys.argv[1:]])
        meta = {
            "command": command,
            "date": f"{datetime.now(UTC):%Y-%m-%d}",
            "threads": args.threads,
            "model": DEFAULT_MODEL,
            "site": args.site,
            "length": args.length,
            "k": args.k,
            "pid": os.getpid(),
        }
        if meta_path.exists():
            old = json.loads(meta_path.read_text())
            same = ("site", "length", "k", "threads")
            if any(old[key] != meta[key] for key in same):
                raise SystemExit(f"{work} holds a run with other settings: {old}")
            meta["date"] = old["date"]
        meta_path.write_text(json.dumps(meta))
        collect(args, work)
    analyze(args, work, json.loads(meta_path.read_text()))


if __name__ == "__main__":
    main()
