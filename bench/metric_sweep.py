"""Benchmark: the recursive metric sweep against per-site whole-graph autodiff and the FLOP floor.

    .venv/bin/python bench/metric_sweep.py            # writes bench/results/metric_sweep.{md,csv}

On the default model, one 16-token prompt, every resid/attn/mlp site of all layers (residual
pre/mid/post, attn_out, per-head hook_z, mlp_out, mlp hook_pre/hook_post), it reports side by side:

- the sweep's wall time in both vocabulary modes (median of ``--repeats``);
- the per-site baseline: the same factor rows pulled back by VJPs through the whole graph, one
  site at a time; a sample of sites is timed and the total extrapolated linearly in depth;
- the floor: FLOPs of pushing the rows (at most d) back through every block at the prediction
  position, divided by this machine's float32 matmul throughput measured in the same run;
- each mode's relative Frobenius error against the exact metric, and the exact mode's error against
  whole-graph autodiff; the process's peak resident memory after each phase.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from datetime import UTC, datetime

import pandas as pd
import torch
from common import header, machine, save, sync

import steerlens as sl
from steerlens.metric.direct import direct_rows
from steerlens.metric.pullback import SWEEP_KINDS, MetricOptions, lens_rows
from steerlens.metric.state import prompt_state
from steerlens.prompts import as_prompts
from steerlens.sites import Site, all_sites

PROMPT = "The quick brown fox jumps over the lazy dog while the farmer watches from the old"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm up
    times, out = [], None
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def matmul_gflops(d: int, d_mlp: int, rows: int, device: str) -> float:
    a = torch.randn(rows, d, device=device)
    w = torch.randn(d, d_mlp, device=device)
    seconds, _ = timed(lambda: a @ w, 30)
    return 2 * rows * d * d_mlp / seconds / 1e9


def floor_flops(model, rows: int, n_pos: int) -> float:
    """VJP FLOPs of ``rows`` factor rows through every block at one position: two per
    multiply-add of each weight matrix, plus the scores and values over ``n_pos`` keys."""
    cfg = model.cfg
    per_block = sum(p.numel() for n, p in model.blocks[0].named_parameters() if p.dim() > 1)
    attn = 2 * 2 * cfg.n_heads * n_pos * cfg.d_head
    return rows * cfg.n_layers * (2 * per_block + attn)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--baseline-layers", type=int, nargs="+", default=[0, 10, 20, 29])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", default="metric_sweep", help="results file stem")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = sl.load_model(device=args.device)
    tokens = as_prompts(model, PROMPT)[0]
    sites = all_sites(model, SWEEP_KINDS)
    rss_load = peak_rss_mb()

    t_auto, sweep_auto = timed(
        lambda: sl.pullback_sweep(model, tokens, sites, decompose=False), args.repeats
    )
    rss_auto = peak_rss_mb()
    t_full, sweep_full = timed(
        lambda: sl.pullback_sweep(model, tokens, sites, vocab="full", decompose=False),
        args.repeats,
    )
    rss_full = peak_rss_mb()
    t_dec, _ = timed(lambda: sl.pullback_sweep(model, tokens, sites, decompose=True), 1)

    errs = [rel_err(sweep_auto[s].matrix(), sweep_full[s].matrix()) for s in sweep_full]

    # Per-site whole-graph baseline: same rows, VJPs through the whole graph for one site.
    state = prompt_state(model, tokens)
    n_layers = model.cfg.n_layers
    b_auto = lens_rows(model, state.resid[n_layers], MetricOptions())[0]
    b_full = lens_rows(model, state.resid[n_layers], MetricOptions(vocab="full"))[0]
    samples, exact_errs = [], []
    for layer in args.baseline_layers:
        site = Site("resid_pre", layer, position=tokens.shape[0] - 1)
        secs, _ = timed(lambda site=site: direct_rows(model, tokens, site, b_auto, n_layers), 1)
        samples.append((layer, secs))
        whole = direct_rows(model, tokens, site, b_full, n_layers)
        exact_errs.append(rel_err(sweep_full[Site("resid_pre", layer)].matrix(), whole.T @ whole))
    # linear fit in the number of blocks between the site and the output
    xs = [n_layers - layer for layer, _ in samples]
    ys = [s for _, s in samples]
    slope, intercept = statistics.linear_regression(xs, ys)
    baseline = sum(intercept + slope * (n_layers - s.layer) for s in sites)

    rows = b_auto.shape[0]
    gflops = matmul_gflops(model.cfg.d_model, model.cfg.d_mlp, rows, args.device)
    floor = floor_flops(model, rows, tokens.shape[0]) / (gflops * 1e9)
    record = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": machine(args.device, args.threads),
        "torch": torch.__version__,
        "prompt_tokens": int(tokens.shape[0]),
        "sites": len(sites),
        "factor_rows": rows,
        "top_k": sweep_auto.info.top_k,
        "dropped_mass": sweep_auto.info.dropped_mass,
        "sweep_auto_s": t_auto,
        "sweep_full_s": t_full,
        "sweep_auto_with_decomposition_s": t_dec,
        "baseline_per_site_s": dict(samples),
        "baseline_total_s (extrapolated)": baseline,
        "speedup_vs_baseline": baseline / t_auto,
        "matmul_gflops": gflops,
        "floor_s": floor,
        "sweep_over_floor": t_auto / floor,
        "auto_rel_err_max": max(errs),
        "auto_rel_err_median": statistics.median(errs),
        "full_vs_whole_graph_rel_err_max": max(exact_errs),
        "peak_rss_mb_after_load": rss_load,
        "peak_rss_mb_after_auto_sweep": rss_auto,
        "peak_rss_mb_after_full_sweep": rss_full,
    }
    lines = [
        *header("Metric sweep benchmark"),
        "",
        "| measure | value |",
        "|---|---|",
    ]
    for key, value in record.items():
        shown = f"{value:.4g}" if isinstance(value, float) else value
        lines.append(f"| {key} | {shown} |")
    save(args.out, lines, pd.DataFrame([{k: str(v) for k, v in record.items()}]))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
