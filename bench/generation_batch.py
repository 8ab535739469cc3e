"""Benchmark: the study's generation measures of many edits on one prompt, batched against one
edit at a time.

    .venv/bin/python bench/generation_batch.py   # bench/results/generation_batch.{md,csv}
    PYTHONPATH=<gemma extra> .venv/bin/python bench/generation_batch.py \
        --models smollm2-135m-instruct gemma-3-270m

What a study unit does after steering: for each of its records (about 22 a unit: every method
at two targets), `generation_measures` (1 greedy + 4 sampled continuations of 20 tokens under
the edit, and the clean model's perplexity of them). One edit at a time, each 20-token step reads
every weight of the model for 5 rows; `generation_measures_many` runs the steps of many edits as
one batch and the perplexities from one run of the prompt. Here: ``--edits`` random ``@last``
residual vectors (norm ``--norm``) at layers spread over the model on one State-of-the-Union
sentence, timed both ways in turn, with the largest difference between the two ways' measures
(they are the same continuations, up to the rounding of a batched matrix product).
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime

import pandas as pd
import torch
from common import header, machine, save

import steerlens as sl
from steerlens.evaluation import generation_measures_many

PROMPT = (
    "Some difficulties have occurred in organizing the Territorial governments of New Mexico "
    "and Utah, and when more accurate information"
)


def edits(model, n: int, norm: float) -> list[sl.Intervention]:
    gen = torch.Generator().manual_seed(0)
    layers = [round(i * (model.cfg.n_layers - 1) / max(n - 1, 1)) for i in range(n)]
    out = []
    for layer in layers:
        v = torch.randn(model.cfg.d_model, generator=gen)
        site = f"blocks.{layer}.hook_resid_post@last"
        out.append(sl.Intervention("random", {site: norm * v / v.norm()}))
    return out


def run(name: str, n_edits: int, norm: float, tokens: int, samples: int) -> dict:
    model = sl.load_model(name)
    prompt = model.to_tokens(PROMPT)[0]
    ivs = edits(model, n_edits, norm)
    kw = {"n_tokens": tokens, "samples": samples, "seed": 0}
    generation_measures_many(model, prompt, ivs[:1], 0, n_tokens=2, samples=1)  # warm up
    start = time.perf_counter()
    alone = [generation_measures_many(model, prompt, [iv], 0, **kw)[0] for iv in ivs]
    alone_s = time.perf_counter() - start
    start = time.perf_counter()
    together = generation_measures_many(model, prompt, ivs, 0, **kw)
    together_s = time.perf_counter() - start
    gap = max(
        abs(a.row()[k] - b.row()[k]) / max(abs(a.row()[k]), 1e-12)
        for a, b in zip(alone, together, strict=True)
        for k in a.row()
    )
    return {
        "model": model.cfg.model_name,
        "edits": n_edits,
        "rows": n_edits * (1 + samples),
        "one_at_a_time_s": alone_s,
        "batched_s": together_s,
        "speedup": alone_s / together_s,
        "largest_relative_difference": gap,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct"])
    parser.add_argument("--edits", type=int, default=22)
    parser.add_argument("--norm", type=float, default=60.0)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--note", default="", help="a line on the machine's state")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    frame = pd.DataFrame(
        [run(m, args.edits, args.norm, args.tokens, args.samples) for m in args.models]
    )
    lines = [
        *header("The study's generation measures: batched against one edit at a time"),
        "",
        f"{datetime.now(UTC):%Y-%m-%d}, {machine('cpu', args.threads)}, torch "
        f"{torch.__version__}; {args.edits} random `@last` residual edits of norm {args.norm:g}, "
        f"1 greedy + {args.samples} sampled continuations of {args.tokens} tokens each and "
        "their perplexities under the clean model." + (f" {args.note}" if args.note else ""),
        "",
        *[
            f"- {r['model']}: {r['one_at_a_time_s']:.1f} s one edit at a time, "
            f"{r['batched_s']:.1f} s batched ({r['speedup']:.2f}×); largest relative "
            f"difference between the two ways' measures {r['largest_relative_difference']:.1e}"
            for r in frame.to_dict("records")
        ],
        "",
        frame.to_markdown(index=False, floatfmt=".4g"),
    ]
    save("generation_batch", lines, frame)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
