"""Shared pieces of the ``steerlens`` command line: common options and output."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from steerlens.atomic import atomic_path


def add_command(sub: Any, name: str, help_text: str, examples: str) -> argparse.ArgumentParser:
    """A subcommand with its examples under ``--help`` and the common options."""
    parser = sub.add_parser(
        name,
        help=help_text,
        epilog=examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common(parser)
    return parser


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model name (default: smollm2-135m-instruct)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def jsonable(value: Any) -> Any:
    """NaN and infinities as null (strict JSON), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def print_result(obj: dict[str, Any], tables: dict[str, pd.DataFrame], as_json: bool) -> None:
    if as_json:
        out = dict(obj)
        out.update({k: v.to_dict(orient="records") for k, v in tables.items()})
        print(json.dumps(jsonable(out), indent=2, default=str, allow_nan=False))
        return
    for key, value in obj.items():
        print(f"{key}: {value}")
    with pd.option_context("display.width", 160, "display.max_rows", 500, "display.precision", 4):
        for name, table in tables.items():
            print(f"\n{name}:")
            print(table.to_string(index=False))


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    """Through a temporary file renamed into place: no half-written CSV is left behind."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
