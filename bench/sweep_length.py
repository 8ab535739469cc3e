"""Benchmark: the all-site sweep against prompt length, with the block decomposition off, by the
reverse-mode reference, and by the forward-mode pass that the sweep now uses.

    .venv/bin/python bench/sweep_length.py --threads 2  # bench/results/sweep_length.{md,csv}

On the default model, every site of every layer (``SWEEP_KINDS``), one prompt cut to each length.
Three variants of ``pullback_sweep``:

- ``off``: ``decompose=False``, the factor rows alone;
- ``old``: ``decompose=True`` with the decomposition as it was before issue 19, one VJP per
  (row, path) through the attention half of each block: (1 + n_heads) × n_rows cotangents
  (copied here, :func:`decompose_by_vjp`, and swapped in for these runs);
- ``new``: ``decompose=True`` as shipped, one forward-mode pass of the n_rows rows of B_pre
  (:func:`steerlens.metric.blockmap.attention_pushforward`).

Runs are interleaved (each repeat times every length and variant in turn) so that a change in the
machine's load hits all of them alike; each cell is the median of ``--repeats``, in elapsed
seconds and in the process's CPU seconds (less disturbed by other processes on shared cores). The
load average is recorded before and after, and the largest difference between the old and new
share tables.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from datetime import UTC, datetime
from unittest import mock

import pandas as pd
import torch
from common import header, machine, save, sync

import steerlens as sl
from steerlens.metric import recursion
from steerlens.metric.autodiff import pullback_rows
from steerlens.metric.blockmap import block_map
from steerlens.metric.pullback import SWEEP_KINDS
from steerlens.prompts import as_prompts
from steerlens.sites import all_sites

TEXT = (
    "The old lighthouse keeper climbed the spiral stairs each evening, counting the steps out of "
    "habit, though he had long since learned there were one hundred and twelve. At the top he "
    "trimmed the wick, polished the great lens with a soft cloth, and watched the fishing boats "
    "turn for home across the grey water. His daughter, who taught at the village school, wrote "
    "to him every week about her pupils: the boy who could recite every king of England, the "
    "twins who argued about whether whales were fish, the quiet girl who drew maps of countries "
    "that did not exist. He kept the letters in a tin box beside his bed and read them again on "
    "stormy nights, when the wind shook the windows and the beam swept round and round above the "
    "rocks. In spring the council sent a man to talk about an automatic lamp that would need no "
    "keeper at all, and the old man listened politely, made him a cup of tea, and asked whether "
    "the machine would also notice when a boat was in trouble, or know which families to visit "
    "when one did not come back. The man from the council had no answer, and went away promising "
    "to write. Summer came and went, and the letter never arrived, and the lamp still burned. "
    "When autumn storms returned, the keeper's daughter came home for a week, and together they "
    "carried the tin box of letters up the stairs and read the best of them aloud at the top."
)

VARIANTS = ("off", "old", "new")


def decompose_by_vjp(model, state, layer, out, fast) -> None:
    """The decomposition before issue 19: cotangent B_post at ``hook_attn_out`` and, for each
    head h, the rows at ``hook_z`` with every other head zeroed, all in one vmapped VJP."""
    b_pre, b_post, b_mid = out.rows["resid_pre"], out.rows["resid_post"], out.rows["resid_mid"]
    b_z = out.rows["z"]
    x = state.resid[layer].to(b_pre.dtype)
    n_rows, n_heads = b_z.shape[0], b_z.shape[1]
    eye = torch.eye(n_heads, dtype=b_z.dtype, device=b_z.device)
    per_head = (b_z.unsqueeze(0) * eye.view(n_heads, 1, n_heads, 1)).flatten(0, 1)
    cot_attn = torch.cat([b_post, torch.zeros_like(b_post).repeat(n_heads, 1)])
    cot_z = torch.cat([torch.zeros_like(b_z), per_head])
    with block_map(model, layer, state, (), ("attn_out", "z"), dtype=x.dtype, fast=fast) as fn:
        grads = pullback_rows(lambda y: fn(y)[1:], (x,), (cot_attn, cot_z))[0]
    direct = grads[:n_rows]
    heads = grads[n_rows:].view(n_heads, n_rows, -1)
    total = b_pre.pow(2).sum()
    attn = (direct * b_pre).sum()
    shares = {
        "skip": (b_post * b_pre).sum(),
        "mlp": ((b_mid - b_post) * b_pre).sum(),
        "attn": attn,
        "attn_mlp": ((b_pre - b_mid) * b_pre).sum() - attn,
    }
    out.shares = {k: float(v / total) for k, v in shares.items()}
    out.head_shares = ((heads * b_pre.unsqueeze(0)).sum((1, 2)) / total).tolist()


def run(model, tokens, sites, variant: str):
    if variant == "off":
        return sl.pullback_sweep(model, tokens, sites, decompose=False)
    if variant == "old":
        with mock.patch.object(recursion, "_decompose", decompose_by_vjp):
            return sl.pullback_sweep(model, tokens, sites, decompose=True)
    return sl.pullback_sweep(model, tokens, sites, decompose=True)


def timed(fn) -> tuple[float, float, object]:
    """(wall seconds, this process's CPU seconds, result) of one call."""
    sync()
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    sync()
    return time.perf_counter() - start, time.process_time() - cpu, out


def share_diff(a, b) -> float:
    paths = (a.shares["share"] - b.shares["share"]).abs().max()
    heads = (a.head_shares["share"] - b.head_shares["share"]).abs().max()
    return float(max(paths, heads))


def load() -> str:
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", default="sweep_length", help="results file stem")
    parser.add_argument("--note", default="", help="a line about the machine's state")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = sl.load_model(device=args.device)
    sites = all_sites(model, SWEEP_KINDS)
    text_tokens = as_prompts(model, TEXT)[0]
    if text_tokens.shape[0] < max(args.lengths):
        raise SystemExit(f"the text has {text_tokens.shape[0]} tokens, under {max(args.lengths)}")
    prompts = {n: text_tokens[:n] for n in args.lengths}
    load_before = load()
    for variant in VARIANTS:  # warm up every path once, at the shortest length
        run(model, prompts[min(args.lengths)], sites, variant)
    walls: dict[tuple[int, str], list[float]] = {}
    cpus: dict[tuple[int, str], list[float]] = {}
    diffs: dict[int, float] = {}
    for _ in range(args.repeats):
        for n in args.lengths:
            outs = {}
            for variant in VARIANTS:
                wall, cpu, outs[variant] = timed(
                    lambda n=n, v=variant: run(model, prompts[n], sites, v)
                )
                walls.setdefault((n, variant), []).append(wall)
                cpus.setdefault((n, variant), []).append(cpu)
            diffs[n] = max(diffs.get(n, 0.0), share_diff(outs["old"], outs["new"]))
    load_after = load()

    records = []
    for n in args.lengths:
        wall = {v: statistics.median(walls[(n, v)]) for v in VARIANTS}
        cpu = {v: statistics.median(cpus[(n, v)]) for v in VARIANTS}
        records.append(
            {
                "prompt_tokens": n,
                **{f"{v}_wall_s": wall[v] for v in VARIANTS},
                **{f"{v}_cpu_s": cpu[v] for v in VARIANTS},
                **{f"{v}_min_wall_s": min(walls[(n, v)]) for v in VARIANTS},
                "old_over_new_wall": wall["old"] / wall["new"],
                "old_over_new_cpu": cpu["old"] / cpu["new"],
                "old_over_new_min_wall": min(walls[(n, "old")]) / min(walls[(n, "new")]),
                "max_abs_share_diff_old_new": diffs[n],
                **{
                    f"{v}_wall_runs_s": " ".join(f"{t:.2f}" for t in walls[(n, v)])
                    for v in VARIANTS
                },
                **{f"{v}_cpu_runs_s": " ".join(f"{t:.2f}" for t in cpus[(n, v)]) for v in VARIANTS},
            }
        )
    frame = pd.DataFrame(records)
    short, long = min(args.lengths), max(args.lengths)
    by_n = frame.set_index("prompt_tokens")

    def growth(measure: str) -> dict[str, float]:
        return {
            v: by_n.loc[long, f"{v}_{measure}_s"] / by_n.loc[short, f"{v}_{measure}_s"]
            for v in VARIANTS
        }

    lines = [
        *header("Sweep time against prompt length"),
        "",
        f"{datetime.now(UTC).strftime('%Y-%m-%d')}, {machine(args.device, args.threads)}, torch "
        f"{torch.__version__}; default model, {len(sites)} sites, one prompt per length; "
        f"{args.repeats} interleaved repeats (every run in the `_runs_s` columns of the CSV). "
        "Wall: elapsed seconds, median and fastest of the repeats; CPU: this process's CPU "
        "seconds over its threads (median), which on shared cores also counts its threads' "
        "spin-waits.",
        "",
        f"{args.note + ' ' if args.note else ''}Load average (1 / 5 / 15 min, as `uptime` "
        f"shows it) before: {load_before}; after: {load_after}.",
        "",
        "| tokens | variant | median wall (s) | fastest wall (s) | median CPU (s) |",
        "|---|---|---|---|---|",
    ]
    for r in records:
        for v in VARIANTS:
            lines.append(
                f"| {r['prompt_tokens']} | {v} | {r[f'{v}_wall_s']:.2f} "
                f"| {r[f'{v}_min_wall_s']:.2f} | {r[f'{v}_cpu_s']:.2f} |"
            )
    lines += [
        "",
        "| tokens | old / new, median wall | old / new, fastest wall | old / new, median CPU "
        "| max abs share diff old vs new |",
        "|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['prompt_tokens']} | {r['old_over_new_wall']:.2f} "
            f"| {r['old_over_new_min_wall']:.2f} | {r['old_over_new_cpu']:.2f} "
            f"| {r['max_abs_share_diff_old_new']:.1e} |"
        )
    lines.append("")
    for measure, label in (("wall", "median wall"), ("min_wall", "fastest wall"), ("cpu", "CPU")):
        g = growth(measure)
        met = "met" if g["new"] <= 2 else "not met"
        lines.append(
            f"- {label}: sweep at {long} tokens over the sweep at {short}: "
            + ", ".join(f"{v} {g[v]:.2f}×" for v in VARIANTS)
            + f". Goal (issue 19), the sweep with its decomposition at {long} tokens within 2× "
            f"of the sweep at {short}: **{met}** ({g['new']:.2f}×)."
        )
    save(args.out, lines, frame)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
