"""Atomic writes: a file, or a folder of files, is written under a temporary name beside its
destination and renamed into place, so a reader (or a resumed run) never sees it half-written.
Every writer in steerlens that must not leave half a result goes through this module.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "a" / "b.txt"
>>> atomic_write(path, "done\\n").read_text()
'done\\n'
>>> with atomic_dir(path.parent / "c") as folder:
...     _ = (folder / "d.txt").write_text("both or neither")
>>> sorted(p.name for p in path.parent.iterdir())
['b.txt', 'c']
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path to write ``path``'s content to; renamed onto ``path`` when the block
    exits normally, removed when it raises. Parent folders are made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
    return Path(path)


@contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A fresh temporary folder beside ``path`` to write ``path``'s files in; when the block exits
    normally it replaces ``path`` (a folder already there is moved aside, then deleted), when it
    raises it is removed. Parent folders are made.

    If another process publishes the same folder at the same moment, either copy wins; both are
    complete."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield staged
        _publish(staged, final)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _publish(staged: Path, final: Path) -> None:
    for attempt in range(3):
        _discard(final)
        try:
            os.replace(staged, final)
            return
        except OSError:  # a concurrent writer published between the discard and the replace
            if attempt == 2 and not final.is_dir():
                raise


def _discard(folder: Path) -> None:
    """Move ``folder`` (if any) out of the way in one rename, then delete it."""
    trash = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=folder.parent))
    try:
        os.replace(folder, trash / folder.name)
    except FileNotFoundError:
        pass
    finally:
        shutil.rmtree(trash, ignore_errors=True)
