"""What the benchmark scripts share: where results go, the machine line, timing on CUDA, and
writing a result as markdown (with the command that made it) plus CSV."""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import pandas as pd
import torch

OUT = Path(__file__).parent / "results"


def sync() -> None:
    """Wait for queued GPU work, so that wall-clock timings include it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def machine(device: str = "cpu", threads: int | None = None) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()}, {platform.machine()} host"
    threads = torch.get_num_threads() if threads is None else threads
    return f"{platform.processor() or platform.machine()}, {threads} torch threads"


def header(title: str) -> list[str]:
    """A result's first lines: its title and the command that made it."""
    command = " ".join([f"bench/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    return [f"# {title}", "", f"Command: `.venv/bin/python {command}`"]


def save(stem: str, lines: list[str], frame: pd.DataFrame) -> None:
    """``results/<stem>.md`` (the lines) and ``results/<stem>.csv`` (the frame)."""
    OUT.mkdir(exist_ok=True)
    frame.to_csv(OUT / f"{stem}.csv", index=False)
    (OUT / f"{stem}.md").write_text("\n".join(lines) + "\n")
