"""Benchmark: time and peak memory of the sweep, the dataset metric and a FishBack run against
prompt length, batch size and model.

    .venv/bin/python bench/scale.py          # writes bench/results/scale.{md,csv}
    .venv/bin/python bench/scale.py --models default gpt2-small-shaped --note "..."

Models: the default (SmolLM2-135M), gemma-3-270m (its 262k vocabulary; needs
``steerlens[gemma]``) and a GPT-2-small-shaped random model (12 layers, d_model 768, 12 heads,
d_mlp 3072, vocabulary 50,257) built from a ``HookedTransformerConfig``, all float32. Cells, one
factor at a time: prompt length 16 / 64 / 256 at batch 1, and batch 1 / 8 / 32 at length 64
(batch rows are windows of one text at different offsets). Operations:

- ``sweep``: ``pullback_sweep`` (every site of every layer, with the block decomposition), and
  its matmul floor (``floor_s``: the VJP FLOPs of each prompt's factor rows through every block,
  over this machine's measured float32 matmul rate, as in ``bench/metric_sweep.py``);
- ``dataset``: ``expected_metric`` at ``resid_post`` of the middle layer;
- ``fishback``: ``steer_batch`` with FishBack at the middle layer toward each prompt's
  tenth most likely next token at probability 0.5, at most 4 steps (a fixed budget: the
  time per step is what scales).

Each (model, operation) runs in its own process, its cells in increasing size. ``peak_mb`` is
the process's peak resident memory during the cell (reset before it through
``/proc/self/clear_refs``) minus its resident memory after loading the model: an upper bound
where an earlier cell's freed memory stays with the process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import torch
from common import header, machine, save, sync
from metric_sweep import floor_flops, matmul_gflops
from sweep_length import TEXT

import steerlens as sl
from steerlens import _tl
from steerlens.concepts import TokenSet
from steerlens.methods import FishBackConfig, steer_batch
from steerlens.metric.pullback import MetricOptions, lens_rows
from steerlens.metric.state import prompt_state

MODELS = ("default", "gemma-3-270m", "gpt2-small-shaped")
OPERATIONS = ("sweep", "dataset", "fishback")
#: (prompt length, batch size), in increasing size
CELLS = ((16, 1), (64, 1), (256, 1), (64, 8), (64, 32))
#: every record so far, rewritten after each (model, operation)
RECORDS = Path(__file__).parent / "results" / "scale_records.json"


def load(name: str):
    if name == "default":
        return sl.load_model()
    if name == "gemma-3-270m":
        return sl.load_model("gemma-3-270m")
    cfg = _tl.HookedTransformerConfig(
        n_layers=12,
        d_model=768,
        n_heads=12,
        d_head=64,
        d_mlp=3072,
        d_vocab=50257,
        n_ctx=1024,
        act_fn="gelu_new",
        normalization_type="LN",
        seed=0,
    )
    return _tl.HookedTransformer(cfg).eval()


def text_tokens(model) -> torch.Tensor:
    """The sweep-length bench's text, twice over, as token ids."""
    text = TEXT
    if model.tokenizer is not None:
        ids = model.to_tokens(text, prepend_bos=False)[0]
    else:  # the random model: the default model's tokenizer's ids are all in its vocabulary
        ids = sl.load_model().to_tokens(text, prepend_bos=False)[0]
    return torch.cat([ids, ids])


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def targets(model, prompts: list[torch.Tensor]) -> list[TokenSet]:
    out = []
    with torch.no_grad():
        for p in prompts:
            logits = model(p[None])[0, -1]
            out.append(
                TokenSet.from_ids(
                    [int(logits.argsort(descending=True)[9])], d_vocab=model.cfg.d_vocab
                )
            )
    return out


def operate(model, operation: str, prompts: list, concepts: list, middle: int):
    if operation == "sweep":
        return sl.pullback_sweep(model, prompts)
    if operation == "dataset":
        return sl.expected_metric(model, prompts, f"resid_post.{middle}", progress=False)
    cfg = FishBackConfig(f"resid_post.{middle}", 0.5, step=1.0, max_steps=4)
    return steer_batch(model, cfg, concepts, prompts)


def worker(name: str, operation: str, cells: list[tuple[int, int]]) -> None:
    model = load(name)
    ids = text_tokens(model)
    middle = model.cfg.n_layers // 2
    baseline = rss_mb("VmRSS")
    for length, batch in cells:
        prompts = [ids[i : i + length] for i in range(batch)]
        extra: dict = {}
        concepts = targets(model, prompts) if operation == "fishback" else []
        if operation == "sweep":
            rows = [
                lens_rows(model, prompt_state(model, p).resid[-1], MetricOptions())[0].shape[0]
                for p in prompts
            ]
            rate = matmul_gflops(model.cfg.d_model, model.cfg.d_mlp, max(rows), "cpu") * 1e9
            extra["floor_s"] = sum(floor_flops(model, r, length) for r in rows) / rate
        reset_peak()
        before = rss_mb("VmRSS")
        sync()
        start = time.perf_counter()
        out = operate(model, operation, prompts, concepts, middle)
        sync()
        seconds = time.perf_counter() - start
        peak = rss_mb("VmHWM")
        if operation == "fishback":
            extra["steps"] = sum(r.steps for r in out)
            extra["seconds_per_step"] = seconds / max(extra["steps"], 1)
        if "floor_s" in extra:
            extra["over_floor"] = seconds / extra["floor_s"]
        del out
        record = {
            "model": name,
            "operation": operation,
            "length": length,
            "batch": batch,
            "seconds": seconds,
            "peak_mb": peak - baseline,
            "rss_before_mb": before - baseline,
            "model_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
            **extra,
        }
        print("RECORD " + json.dumps(record), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--operations", nargs="+", default=list(OPERATIONS), choices=OPERATIONS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--note", default="", help="a line about the machine's state")
    parser.add_argument(
        "--cells", nargs="+", default=[f"{n}:{b}" for n, b in CELLS], help="length:batch, ..."
    )
    parser.add_argument(
        "--render", action="store_true", help="rebuild the page from scale_records.json"
    )
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "OPERATION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cells = [(int(c.split(":")[0]), int(c.split(":")[1])) for c in args.cells]
    if args.worker:
        worker(*args.worker, cells)
        return
    started = time.perf_counter()
    records = [] if not args.render else json.loads(RECORDS.read_text())
    for name in [] if args.render else args.models:
        for operation in args.operations:
            command = [sys.executable, __file__, "--threads", str(args.threads), "--cells"]
            command += args.cells
            done = subprocess.run(
                [*command, "--worker", name, operation], capture_output=True, text=True
            )
            found = [
                json.loads(line[7:])
                for line in done.stdout.splitlines()
                if line.startswith("RECORD ")
            ]
            if done.returncode != 0:
                tail = done.stderr.strip().splitlines()[-1:] or ["(no message)"]
                print(f"{name} {operation} failed: {tail[0]}", flush=True)
                records.append({"model": name, "operation": operation, "failed": tail[0]})
            records += found
            for r in found:
                print(r, flush=True)
            RECORDS.parent.mkdir(exist_ok=True)
            RECORDS.write_text(json.dumps(records, indent=1) + "\n")  # what is done so far
    frame = pd.DataFrame(records)
    wall = (time.perf_counter() - started) / 60
    timing = "rebuilt from scale_records.json" if args.render else f"wall time {wall:.1f} min"
    columns = ["length", "batch", "seconds", "peak_mb"]
    lines = [
        *header("Scale: time and peak memory against prompt length, batch size and model"),
        "",
        f"{datetime.now(UTC):%Y-%m-%d}, {machine('cpu', args.threads)}, torch "
        f"{torch.__version__}; {timing}. One timing per cell.",
        *(["", args.note] if args.note else []),
    ]
    for (name, operation), part in frame.groupby(["model", "operation"], sort=False):
        failed = part["failed"].dropna() if "failed" in part else pd.Series(dtype=object)
        part = part[part["length"].notna()] if "length" in part else part.iloc[:0]
        if part.empty:
            lines += ["", f"## {name}, {operation}: failed", "", str(failed.iloc[0])]
            continue
        shown = columns + [
            c
            for c in ("floor_s", "over_floor", "steps", "seconds_per_step")
            if c in part and part[c].notna().any()
        ]
        lines += [
            "",
            f"## {name}, {operation} (model {part.model_mb.iloc[0]:.0f} MB)",
            "",
            part[shown]
            .astype({"length": int, "batch": int})
            .to_markdown(index=False, floatfmt=".3g"),
        ]
        if len(failed):
            lines += ["", f"Partial: {failed.iloc[0]}."]
    save("scale", lines, frame)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
