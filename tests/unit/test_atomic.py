"""The one atomic writer (``steerlens.atomic``): a file or a folder appears whole or not at all,
and nothing staged is left beside it."""

from __future__ import annotations

import pytest

from steerlens.atomic import atomic_dir, atomic_path, atomic_write


class _Boom(Exception):
    pass


def test_atomic_write_makes_parents_and_leaves_nothing_staged(tmp_path):
    path = atomic_write(tmp_path / "a" / "b.bin", b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert [p.name for p in path.parent.iterdir()] == ["b.bin"]


def test_atomic_path_keeps_the_old_file_when_the_write_raises(tmp_path):
    path = atomic_write(tmp_path / "b.txt", "old")
    with pytest.raises(_Boom), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise _Boom
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["b.txt"]


def test_atomic_dir_writes_a_new_folder(tmp_path):
    with atomic_dir(tmp_path / "x" / "out") as staged:
        assert staged.is_dir() and staged.parent == tmp_path / "x"
        (staged / "f.txt").write_text("1")
        (staged / "sub").mkdir()
        (staged / "sub" / "g.txt").write_text("2")
    out = tmp_path / "x" / "out"
    assert (out / "f.txt").read_text() == "1" and (out / "sub" / "g.txt").read_text() == "2"
    assert [p.name for p in out.parent.iterdir()] == ["out"]


def test_atomic_dir_replaces_a_previous_folder_whole(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as staged:
        (staged / "old-only.txt").write_text("old")
    with atomic_dir(out) as staged:
        (staged / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_keeps_the_previous_folder_when_the_block_raises(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as staged:
        (staged / "kept.txt").write_text("kept")
    with pytest.raises(_Boom), atomic_dir(out) as staged:
        (staged / "half.txt").write_text("half")
        raise _Boom
    assert sorted(p.name for p in out.iterdir()) == ["kept.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_replaces_a_file_in_its_place(tmp_path):
    out = atomic_write(tmp_path / "out", "a file, not a folder")
    with atomic_dir(out) as staged:
        (staged / "f.txt").write_text("1")
    assert out.is_dir() and (out / "f.txt").read_text() == "1"
