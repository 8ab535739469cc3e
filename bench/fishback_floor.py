"""Benchmark: where a FishBack step's time goes, against what this machine can do at best.

    .venv/bin/python bench/fishback_floor.py     # writes bench/results/fishback_floor.{md,csv}
    .venv/bin/python bench/fishback_floor.py --threads 1 --note "measured under load"

On the default model, past-tense test contexts, at resid_post of layers 6, 15 and 24: the time of
one concept evaluation (the logits and the gradient at the site: what a Euclidean step costs,
plus its step-size search), of the output factor at the final residual (float32 and float64 top-K
Gram), and of pulling its rows back through the remaining blocks, by the fast block map's
hand-written reverse pass (``pullback_s``, the default) and by the vmapped ``torch.func.vjp``
it replaced (``pullback_vjp_s``), timed in turn; the vjp route's matmul FLOPs over this
machine's measured float32 matmul rate (``pullback_floor_s``: the hand-written pass forms
weight products once and does fewer FLOPs than that). Then whole runs to a pair share of 0.5
(1 nat per step), timed in turn: Euclidean, FishBack, and FishBack on the vjp route, with
each run's off-target KL. Also how many rows the metric needs: eigenvalues of the output metric
above 1e-2 of its mean, and of G at the site above the damping λ = 1e-2·tr G/d (directions a
rank-reduced factor would leave at λ).
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from datetime import UTC, datetime

import pandas as pd
import torch
from common import header, machine, save, sync

import steerlens as sl
from steerlens.concepts import PairConcept
from steerlens.datasets import load_corpus, train_test_contexts, verb_concept, verb_contexts
from steerlens.evaluation import next_logprobs, outcome_measures
from steerlens.methods import EuclideanConfig, FishBackConfig, steer_iteratively
from steerlens.methods.loop import evaluate as _evaluate
from steerlens.metric import local
from steerlens.metric.core import Metric
from steerlens.metric.local import LocalPath
from steerlens.metric.pullback import MetricOptions, lens_rows
from steerlens.metric.recursion import pull_block


def best_of(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def best_in_turn(
    fns: dict[str, Callable[[], object]], repeats: int, warm: bool = True
) -> dict[str, float]:
    """Each function's best time of ``repeats`` (after one untimed call each where ``warm``),
    the functions called in turn each round so that a machine's changing load falls on all of
    them alike."""
    for fn in fns.values() if warm else ():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


@contextmanager
def vjp_route():
    """LocalPath pulls its rows back by the vmapped vjp (the route the hand pass replaced)."""
    original = local.pull_block
    local.pull_block = functools.partial(pull_block, vmap=True)
    try:
        yield
    finally:
        local.pull_block = original


def matmul_rate(d: int, d_mlp: int, device: str) -> float:
    """FLOP/s of a [d, d] × [d, d_mlp] float32 matmul, the pull-back's commonest shape."""
    a = torch.randn(d, d, device=device)
    b = torch.randn(d, d_mlp, device=device)
    seconds = best_of(lambda: a @ b, repeats=20)
    return 2 * d * d * d_mlp / seconds


def pull_flops(model, n_rows: int, n_blocks: int) -> float:
    """Matmul FLOPs of pulling ``n_rows`` rows back through ``n_blocks`` blocks at one position
    (2 per weight per row; attention over the past positions is left out)."""
    cfg = model.cfg
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    weights = 2 * cfg.d_model * cfg.n_heads * cfg.d_head  # W_Q, W_O
    weights += 2 * cfg.d_model * n_kv * cfg.d_head  # W_K, W_V
    weights += (3 if cfg.gated_mlp else 2) * cfg.d_model * cfg.d_mlp
    return 2.0 * weights * n_rows * n_blocks


def measure(model, tokens, concept: PairConcept, layer: int, rate: float, repeats: int) -> dict:
    """The timings and eigenvalue counts of one FishBack step at ``resid_post.layer``."""
    cfg = model.cfg
    with LocalPath(model, tokens, f"resid_post.{layer}") as path:
        x = path.x0
        with torch.no_grad():
            resid = path.residuals(x)
        state = replace(path.state, resid=path.state.resid[: path.entry] + resid)
        timed = {}
        options = {
            p: MetricOptions(off_target=concept.off_target(), precision=p)
            for p in ("float32", "float64")
        }
        final = resid[-1]
        for precision, option in options.items():
            timed[f"factor_{precision}_s"] = best_of(lambda o=option: lens_rows(model, final, o))
        factor, _ = lens_rows(model, resid[-1], options["float32"])

        def pull(vmap: bool) -> torch.Tensor:
            r = factor
            for block in range(cfg.n_layers - 1, path.entry - 1, -1):
                r = pull_block(model, state, block, r, set(), vmap=vmap).rows["resid_pre"]
            return r

        pulls = {"pullback_vjp_s": lambda: pull(True), "pullback_s": lambda: pull(False)}
        timed |= best_in_turn(pulls, repeats)
        timed["evaluate_s"] = best_of(lambda: _evaluate(path, concept, concept, x))
        n_blocks = cfg.n_layers - path.entry
        lens = Metric(factor, "lens").spectrum().double()
        site = path.metric(x, options["float64"]).spectrum().double()
    lam = 1e-2 * float(site.sum()) / cfg.d_model
    return {
        "layer": layer,
        "blocks": n_blocks,
        "factor_rows": factor.shape[0],
        **timed,
        "pullback_floor_s": pull_flops(model, factor.shape[0], n_blocks) / rate,
        "lens_eigs_above_1e-2_mean": int((lens > 1e-2 * lens.mean()).sum()),
        "site_eigs_above_damping": int((site > lam).sum()),
    }


def runs(model, tokens, ctx, layer: int, repeats: int) -> dict:
    """Whole runs at ``resid_post.layer`` timed in turn: Euclidean, FishBack, FishBack on the
    vjp route; their steps and off-target KL."""
    site, concept = f"resid_post.{layer}", PairConcept(ctx.base_id, ctx.target_id)
    clean = next_logprobs(model, tokens)
    configs = {
        "euclidean": EuclideanConfig(site, 0.5, step=1.0),
        "fishback": FishBackConfig(site, 0.5, step=1.0),
    }
    done = {}

    def run(name: str, vjp: bool = False) -> None:
        cfg = configs[name]
        with vjp_route() if vjp else nullcontext():
            done[name + ("_vjp" if vjp else "")] = steer_iteratively(model, cfg, concept, tokens)

    fns = {
        "euclidean": lambda: run("euclidean"),
        "fishback": lambda: run("fishback"),
        "fishback_vjp": lambda: run("fishback", vjp=True),
    }
    seconds = best_in_turn(fns, repeats, warm=False)
    out: dict = {}
    for name, result in done.items():
        steered = next_logprobs(model, tokens, result.intervention)
        kl = outcome_measures(clean, steered, ctx.target_id, base=ctx.base_id).off_target_kl
        out |= {f"{name}_run_s": seconds[name], f"{name}_steps": result.steps}
        out[f"{name}_off_target_kl"] = kl
    out["fishback_over_euclidean"] = out["fishback_run_s"] / out["euclidean_run_s"]
    out["fishback_vjp_over_euclidean"] = out["fishback_vjp_run_s"] / out["euclidean_run_s"]
    out["fishback_kl_rel_diff"] = abs(
        out["fishback_off_target_kl"] / out["fishback_vjp_off_target_kl"] - 1
    )
    return out


#: the columns of the first table: the pull-back by both routes and the runs they make
PULL_COLUMNS = (
    "pullback_vjp_s",
    "pullback_s",
    "pullback_floor_s",
    "euclidean_run_s",
    "fishback_run_s",
    "fishback_vjp_run_s",
    "fishback_over_euclidean",
    "fishback_vjp_over_euclidean",
    "fishback_kl_rel_diff",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, default=2)
    parser.add_argument("--layers", type=int, nargs="+", default=[6, 15, 24])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3, help="best of this many")
    parser.add_argument("--run-repeats", type=int, default=2, help="whole runs: best of")
    parser.add_argument("--note", default="", help="a line about the machine's state")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = sl.load_model(device=args.device)
    cfg = model.cfg
    rate = matmul_rate(cfg.d_model, cfg.d_mlp, args.device)
    mapping = verb_concept(model, "past")
    found = verb_contexts(model, mapping, load_corpus("sotu")[:20000], 200, max_per_verb=3)
    test = train_test_contexts(found, mapping).test[: args.contexts]
    rows = []
    for ctx in test:
        tokens = torch.tensor(ctx.token_ids, device=cfg.device)
        concept = PairConcept(ctx.base_id, ctx.target_id)
        for layer in args.layers:
            row = {"context": ctx.text[-30:], "n_pos": len(ctx.token_ids)}
            row |= measure(model, tokens, concept, layer, rate, args.repeats)
            row |= runs(model, tokens, ctx, layer, args.run_repeats)
            rows.append(row)
            print(rows[-1], flush=True)
    frame = pd.DataFrame(rows)
    med = frame.groupby("layer").median(numeric_only=True)
    lines = [
        *header("Where a FishBack step's time goes"),
        "",
        f"{datetime.now(UTC):%Y-%m-%d}, {machine(args.device, args.threads)}, "
        f"torch {torch.__version__}; float32 matmul rate {rate / 1e9:.0f} GFLOP/s "
        f"([{cfg.d_model}, {cfg.d_model}] × [{cfg.d_model}, {cfg.d_mlp}]). Seconds are the best "
        f"of {args.repeats} (whole runs: of {args.run_repeats}), the routes timed in turn.",
        *(["", args.note] if args.note else []),
        "",
        "Median per layer, the pull-back and whole runs:",
        "",
        med[list(PULL_COLUMNS)].to_markdown(floatfmt=".3g"),
        "",
        "Median per layer, the rest of a step:",
        "",
        med.drop(columns=list(PULL_COLUMNS)).to_markdown(floatfmt=".3g"),
        "",
        frame.to_markdown(index=False, floatfmt=".3g"),
    ]
    save(f"fishback_floor{'_cuda' if args.device.startswith('cuda') else ''}", lines, frame)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
