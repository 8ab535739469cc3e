"""Long experiments that survive: units of work whose records are appended as each unit
finishes, resumed after a kill without redoing or duplicating a unit, and sharded over
processes (``torchrun``: each rank a share of the units, rank 0 merges).

A run lives in one folder:

- ``manifest.json``: what the run is (its configuration, the steerlens version, the unit keys);
  a folder written for another manifest is refused rather than mixed;
- ``records.rank{r}.jsonl``: one line per finished unit of rank r, ``{"unit": key, "records":
  [...]}``, flushed and synced before the next unit starts. A kill can leave at most one
  unfinished last line; resuming cuts it off, so the file is valid after every append;
- ``records.csv``: every unit's records in unit order, written (atomically) once all units are
  done.

>>> import tempfile
>>> folder = tempfile.mkdtemp()
>>> work = lambda key: [{"unit": key, "value": len(key)}]
>>> run_units(folder, {"config": 1}, ["a", "bb"], work).to_dict("records")
[{'unit': 'a', 'value': 1}, {'unit': 'bb', 'value': 2}]
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from steerlens.atomic import atomic_write
from steerlens.errors import InputError

MANIFEST = "manifest.json"
MERGED = "records.csv"


def _rank_file(folder: Path, rank: int) -> Path:
    return folder / f"records.rank{rank}.jsonl"


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) under an initialized ``torch.distributed`` group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def check_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest`` into a new folder, or check that an existing folder was written for
    the same one (:class:`InputError` naming the first field that differs)."""
    path = folder / MANIFEST
    if not path.exists():
        if any(folder.glob("records.*")):
            raise InputError(f"{folder} holds records but no {MANIFEST}: use an empty folder")
        atomic_write(path, json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
        return
    found = json.loads(path.read_text())
    wanted = json.loads(json.dumps(manifest, sort_keys=True, default=str))
    if found != wanted:
        keys = sorted(set(found) | set(wanted))
        differs = next(k for k in keys if found.get(k) != wanted.get(k))
        raise InputError(
            f"{folder} was written by another run ({differs!r}: {found.get(differs)!r} there, "
            f"{wanted.get(differs)!r} here); resume with the same configuration and version, "
            "or write to a new folder"
        )


def read_done(path: Path, *, repair: bool = True) -> dict[str, list[dict[str, Any]]]:
    """The finished units of one rank file, key → records. An unfinished last line (a kill
    mid-append) is cut off the file (``repair``, for the rank's own file) or ignored (another
    rank's, which that rank repairs); a bad line before the last is an error."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if repair and keep < len(data):
        with path.open("r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    done: dict[str, list[dict[str, Any]]] = {}
    for number, line in enumerate(data[:keep].decode().splitlines(), 1):
        try:
            entry = json.loads(line)
            done[entry["unit"]] = entry["records"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise InputError(f"{path} line {number} is not a finished unit: {exc}") from exc
    return done


def read_all_done(
    folder: Path, units: Sequence[str], own: Path | None = None
) -> dict[str, list[dict[str, Any]]]:
    """The finished units of every rank file in ``folder`` (whatever world size wrote them),
    key → records; :class:`InputError` for a unit that is not one of ``units`` or that two
    files both hold. Only ``own`` is repaired (:func:`read_done`)."""
    known = set(units)
    found: dict[str, list[dict[str, Any]]] = {}
    where: dict[str, Path] = {}
    for path in sorted(folder.glob("records.rank*.jsonl")):
        for key, records in read_done(path, repair=path == own).items():
            if key not in known:
                raise InputError(f"{path} holds unit {key!r}, which is not a unit of this run")
            if key in found:
                raise InputError(f"unit {key!r} is in both {where[key]} and {path}")
            found[key], where[key] = records, path
    return found


def _append(path: Path, key: str, records: list[dict[str, Any]]) -> None:
    line = json.dumps({"unit": key, "records": records}, allow_nan=True, default=str) + "\n"
    with path.open("a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def run_units(
    folder: str | Path,
    manifest: dict[str, Any],
    units: Sequence[str],
    work: Callable[[str], list[dict[str, Any]]],
    *,
    rank: int | None = None,
    world: int | None = None,
    progress: Callable[[str], None] | None = None,
    ready: Callable[[str], bool] | None = None,
) -> pd.DataFrame | None:
    """Run ``work(key)`` for every unit key this rank owns (every ``world``-th from ``rank``)
    that no rank file of the folder already holds (so a run resumes under another world size),
    appending each unit's records to this rank's file as it finishes; then (after a barrier
    under ``torch.distributed``) rank 0 merges every rank's records in unit order into
    ``records.csv`` and returns them (other ranks return None). ``rank`` and ``world`` default
    to the ``torch.distributed`` group's (else 0 and 1). ``progress`` is called with each
    finished key. ``ready``: a unit for which it is False is not run now but left for a later
    run (one whose input is not there yet); while any is left, nothing is merged and every
    rank returns None."""
    folder = Path(folder)
    if rank is None or world is None:
        rank, world = distributed_rank()
    if not units:
        raise InputError("no units of work given")
    if len(set(units)) != len(units):
        raise InputError("unit keys must be distinct")
    if world > len(units):
        raise InputError(f"{world} shards for {len(units)} units: use at most {len(units)}")
    if not 0 <= rank < world:
        raise InputError(f"rank {rank} is outside a world of {world}")
    folder.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        check_manifest(folder, {**manifest, "units": list(units)})
    _barrier()
    if rank != 0:
        check_manifest(folder, {**manifest, "units": list(units)})
    path = _rank_file(folder, rank)
    read_done(path)  # repair this rank's own file before any rank reads it
    _barrier()
    done = read_all_done(folder, units, own=path)
    _barrier()  # every rank has read the files before any appends
    for key in list(units)[rank::world]:
        if key in done or (ready is not None and not ready(key)):
            continue
        _append(path, key, work(key))
        if progress is not None:
            progress(key)
    _barrier()
    if rank != 0:
        return None
    if ready is not None and len(read_all_done(folder, units)) < len(units):
        return None
    return merge_records(folder, units)


def merge_records(folder: Path, units: Sequence[str]) -> pd.DataFrame:
    """Every rank file's records (whatever world size wrote them) in unit order, written to
    ``records.csv``; an :class:`InputError` if a unit is missing (a rank did not finish)."""
    found = read_all_done(folder, units)
    missing = [k for k in units if k not in found]
    if missing:
        raise InputError(f"{len(missing)} units unfinished (first: {missing[0]!r}): run again")
    frame = pd.DataFrame([rec for key in units for rec in found[key]])
    atomic_write(folder / MERGED, frame.to_csv(index=False))
    return frame
