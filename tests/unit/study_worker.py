"""A small resumable steering job on a tiny model, run as its own process by test_study.py:
``python study_worker.py FOLDER SECONDS_PER_UNIT`` (or under torchrun). Each unit steers one
synthetic context at one layer with FishBack and Euclidean ascent."""

from __future__ import annotations

import os
import sys
import time

import torch

from steerlens.datasets import VerbContext
from steerlens.experiments.matched import MatchedSettings, context_records
from steerlens.experiments.runner import run_units
from steerlens.testing import tiny_model

UNITS = [f"{i}/{layer}" for i in range(5) for layer in (0, 1)]
SETTINGS = MatchedSettings(targets=(0.5,), methods=("fishback", "euclidean"), step=0.5)


def context(i: int) -> VerbContext:
    ids = tuple(
        int(t) for t in torch.randint(5, 40, (6,), generator=torch.Generator().manual_seed(i))
    )
    return VerbContext(f"context {i}", ids, 2 + i, 42 - i, f"▁b{i}", f"▁t{i}", i)


def main(folder: str, pause: float) -> None:
    torch.set_num_threads(1)
    if "RANK" in os.environ:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    model = tiny_model("gpt2")

    def work(key: str) -> list[dict]:
        i, layer = (int(x) for x in key.split("/"))
        time.sleep(pause)
        ctx = context(i)
        common = {"concept": "synthetic", "unit": key}
        return context_records(
            model, ctx, layer, SETTINGS, {}, {ctx.base_id: ctx.target_id}, common
        )

    run_units(folder, {"job": "tiny steering"}, UNITS, work)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
