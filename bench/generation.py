"""Benchmark: generation with a steering vector applied against the same generation without one.

    .venv/bin/python bench/generation.py                 # writes bench/results/generation.{md,csv}
    .venv/bin/python bench/generation.py --device cuda --out generation_cuda

On the default model, greedy generation (TransformerLens ``generate`` with its key-value cache) of
``--new-tokens`` tokens from each of a few prompts, once plain and once inside
``Intervention.apply`` with a CAA-style vector added at every position of one residual site. The
two are interleaved prompt by prompt and repeat by repeat, so drift in the machine's speed falls on
both; the overhead is the median over (prompt, repeat) of steered / plain wall time. Target ≤ 1.1×.
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

PROMPTS = [
    "Yesterday the committee",
    "The history of the city begins",
    "In the morning she walked to the",
    "Our economy is strong because",
]


def generate(model, tokens: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    sync()
    start = time.perf_counter()
    out = model.generate(
        tokens,
        max_new_tokens=new_tokens,
        do_sample=False,
        use_past_kv_cache=True,
        verbose=False,
        stop_at_eos=False,
    )
    sync()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", default="resid_post.15@all")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", default="generation", help="results file stem")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = sl.load_model(device=args.device)
    site = sl.Site.parse(args.site)
    # a fixed random direction at the scale of the site's activations: the hook's cost does not
    # depend on which vector it adds
    vector = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    steering = sl.Intervention("caa", {site.name: vector / vector.norm()}, scale=40.0)
    rows = []
    changed = 0
    for prompt in PROMPTS:
        tokens = model.to_tokens(prompt)
        generate(model, tokens, 4)  # warm up
        for repeat in range(args.repeats):
            plain_s, plain = generate(model, tokens, args.new_tokens)
            with steering.apply(model):
                steered_s, steered = generate(model, tokens, args.new_tokens)
            changed += int(not torch.equal(plain, steered))
            rows.append(
                {
                    "prompt": prompt,
                    "repeat": repeat,
                    "plain_s": plain_s,
                    "steered_s": steered_s,
                    "ratio": steered_s / plain_s,
                }
            )
    frame = pd.DataFrame(rows)
    ratio = statistics.median(frame["ratio"])
    per_token_ms = 1e3 * statistics.median(frame["plain_s"]) / args.new_tokens
    lines = [
        *header("Generation with a steering vector vs without"),
        "",
        f"{datetime.now(UTC):%Y-%m-%d}, {machine(args.device, args.threads)}, "
        f"torch {torch.__version__}; "
        f"{args.new_tokens} new tokens, greedy, KV cache; vector at {site.name}.",
        "",
        f"- steered / plain wall time: median {ratio:.3f}× (range "
        f"{frame['ratio'].min():.3f}–{frame['ratio'].max():.3f}×) over {len(frame)} runs; "
        f"target ≤ 1.1×",
        f"- plain generation: {per_token_ms:.1f} ms per token (median)",
        f"- the steered continuation differed from the plain one in {changed} of {len(frame)} "
        "runs (the vector is applied, not skipped)",
        "",
        frame.to_markdown(index=False, floatfmt=".4g"),
    ]
    save(args.out, lines, frame)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
