"""A griffe extension for the API pages, for two reStructuredText habits of steerlens docstrings
that Markdown would print as they stand: Sphinx roles (``:func:`steerlens.audit```,
``:class:`~steerlens.metric.Metric```) become inline code of the name (``~`` keeps its last
part, as Sphinx shows it), and a doctest paragraph (lines from ``>>>`` to the next blank line)
becomes a fenced ``pycon`` block."""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj|const):`(~?)([^`]+)`")


def _plain(match: re.Match[str]) -> str:
    tilde, name = match.groups()
    return f"`{name.rsplit('.', 1)[-1] if tilde else name}`"


def strip_roles(text: str) -> str:
    return ROLE.sub(_plain, text)


def fence_doctests(text: str) -> str:
    out: list[str] = []
    inside = False
    for line in text.split("\n"):
        if not inside and line.lstrip().startswith(">>>"):
            indent = line[: len(line) - len(line.lstrip())]
            out.append(f"{indent}```pycon")
            inside = True
        elif inside and not line.strip():
            out.append(f"{indent}```")
            inside = False
        out.append(line)
    if inside:
        out.append(f"{indent}```")
    return "\n".join(out)


class SphinxRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = fence_doctests(strip_roles(obj.docstring.value))
