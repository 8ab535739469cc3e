"""The package's shape: the layers import one way (read from the source with ast), and the old
module paths (``steerlens.cost``, ``steerlens.where``, ``steerlens.evaluate``) still resolve, with
a DeprecationWarning, to the very objects at their new homes."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import steerlens

PACKAGE = Path(steerlens.__file__).parent

#: package → the steerlens packages it must not import (the ones above it)
ABOVE = {
    "metric": ("diagnostics", "evaluation", "methods", "experiments"),
    "diagnostics": ("evaluation", "methods", "experiments"),
}


def _imports(path: Path, *, type_checking: bool) -> list[tuple[int, str]]:
    """(line, module) of every import in ``path``, function-local ones included; those under
    ``if TYPE_CHECKING:`` only with ``type_checking``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip: set[int] = set()
    if not type_checking:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            found += [(node.lineno, node.module)] + [(node.lineno, n) for n in names]
    return found


@pytest.mark.parametrize("package", sorted(ABOVE))
def test_lower_layers_never_import_upper_ones(package):
    # the metric not even lazily or for type checking: it sits under everything
    type_checking = package == "metric"
    files = sorted((PACKAGE / package).rglob("*.py"))
    assert files
    bad = [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}"
        for path in files
        for line, module in _imports(path, type_checking=type_checking)
        for above in ABOVE[package]
        if module == f"steerlens.{above}" or module.startswith(f"steerlens.{above}.")
    ]
    assert not bad, "\n".join(bad)


def test_the_layering_check_sees_lazy_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import steerlens.methods\n"
        "def f():\n    from steerlens.diagnostics import site_costs\n"
    )
    assert (5, "steerlens.diagnostics.site_costs") in _imports(source, type_checking=False)
    assert (3, "steerlens.methods") not in _imports(source, type_checking=False)
    assert (3, "steerlens.methods") in _imports(source, type_checking=True)


@pytest.mark.parametrize(
    ("old", "name", "new"),
    [
        ("steerlens.cost", "PathRho", "steerlens.diagnostics.cost"),
        ("steerlens.where", "site_costs", "steerlens.diagnostics.sites"),
        ("steerlens.evaluate", "path_length", "steerlens.diagnostics.path"),
    ],
)
def test_old_paths_warn_and_forward(old, name, new):
    module = importlib.import_module(old)
    with pytest.warns(DeprecationWarning, match=f"{old}.{name} moved to {new}.{name}"):
        found = getattr(module, name)
    assert found is getattr(importlib.import_module(new), name)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        module.nothing  # noqa: B018


def test_every_old_name_resolves():
    for old in ("steerlens.cost", "steerlens.where", "steerlens.evaluate"):
        module = importlib.import_module(old)
        for name, new in module._MOVED.items():
            with pytest.warns(DeprecationWarning):
                found = getattr(module, name)
            assert found is getattr(importlib.import_module(new), name), f"{old}.{name}"
