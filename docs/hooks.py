"""MkDocs hooks: the pages made from the repository's own files at build time, so the site shows
what is committed rather than a copy of it.

- ``notebooks/*.ipynb``: the notebooks, with their committed outputs (rendered by mkdocs-jupyter,
  never executed here), beside ``tutorials/index.md``;
- ``benchmarks/*.md``: each ``bench/results/*.md`` page and its CSV, and a table of them (command,
  machine, date) appended to ``benchmarks/index.md``;
- ``study/reproduction.md``: ``results/reproduction.md``; ``study/pilot.md``: the pilot's
  ``README.md`` and its report ``study.md``; ``figures/``: the committed PNG figures;
  ``study/full/``: the study's figure from ``results/study/``;
- ``changelog.md``: ``CHANGELOG.md``;
- ``cli.md``: every subcommand's ``--help``, from :func:`steerlens.cli.build_parser`;
- ``methods/index.md``: the method registry (:func:`steerlens.methods.list_methods`), each name
  linked to its page ``methods/<name>.md`` where one is written (the docs test fails, naming the
  page, for a registered method without one).

The Benchmarks and Methods entries of the nav gain one child per page.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent

#: (site folder, repository folder, glob) of files copied into the site as they are
COPIED = [
    ("benchmarks", "bench/results", "*.md"),
    ("benchmarks", "bench/results", "*.csv"),
    ("figures", "figures", "*.png"),
    ("figures/notebooks", "figures/notebooks", "*.png"),
    ("study", "results/study_pilot", "*.png"),
    ("study/full", "results/study", "*.png"),
]
#: site page ← repository file
RENAMED = {
    "study/reproduction.md": "results/reproduction.md",
    "changelog.md": "CHANGELOG.md",
}
PILOT = ROOT / "results/study_pilot"


def bench_pages() -> list[Path]:
    return sorted((ROOT / "bench/results").glob("*.md"))


def method_names() -> list[str]:
    """The registered methods that have a page in ``docs/methods/``."""
    from steerlens.methods import list_methods

    names = [str(n) for n in list_methods()["name"]]
    return [n for n in names if (ROOT / "docs/methods" / f"{n}.md").exists()]


def on_config(config: Any) -> Any:
    nav = config["nav"]
    for i, entry in enumerate(nav):
        if not isinstance(entry, dict):
            continue
        (title, value), *_ = entry.items()
        if value == "benchmarks/index.md":
            pages = [{p.stem: f"benchmarks/{p.name}"} for p in bench_pages()]
            nav[i] = {title: [value, *pages]}
        elif value == "methods/index.md":
            pages = [{n: f"methods/{n}.md"} for n in method_names()]
            nav[i] = {title: [value, *pages]}
    return config


@event_priority(100)  # before mkdocs-jupyter's on_files, which takes the .ipynb files
def on_files(files: Files, config: Any) -> Files:
    # the notebooks keep their repository path (notebooks/NAME.ipynb under the repository root):
    # mkdocs-jupyter reads a notebook's file through src_dir, which a generated file lacks
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        uri = f"notebooks/{path.name}"
        files.append(File(uri, str(ROOT), config["site_dir"], config["use_directory_urls"]))
    for dest, src, pattern in COPIED:
        for path in sorted((ROOT / src).glob(pattern)):
            files.append(File.generated(config, f"{dest}/{path.name}", abs_src_path=str(path)))
    for dest, src in RENAMED.items():
        files.append(File.generated(config, dest, abs_src_path=str(ROOT / src)))
    files.append(File.generated(config, "study/pilot.md", content=pilot_page()))
    files.append(File.generated(config, "methods/index.md", content=methods_index()))
    files.append(File.generated(config, "cli.md", content=cli_page()))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    src = page.file.src_uri
    if src == "benchmarks/index.md":
        return markdown + "\n" + benchmarks_table() + "\n"
    if src.startswith("benchmarks/") and src.endswith(".md"):
        name = Path(src).stem
        note = f"*From `bench/results/{name}.md`*"
        if (ROOT / "bench/results" / f"{name}.csv").exists():
            note += f"; every row in [{name}.csv]({name}.csv)"
        return _after_title(markdown, note + ".")
    if src in RENAMED:
        return _after_title(markdown, f"*From `{RENAMED[src]}`.*")
    if src == "study/pilot.md":
        source = "*From `results/study_pilot/`: its `README.md`, then its report `study.md`.*"
        return _after_title(markdown, source)
    return markdown


def _after_title(markdown: str, line: str) -> str:
    head, sep, rest = markdown.partition("\n")
    if head.startswith("# "):
        return f"{head}\n\n{line}\n{sep}{rest}"
    return f"{line}\n\n{markdown}"


# ------------------------------------------------------------------ benchmarks
DATE = re.compile(r"\b(\d{4}-\d{2}-\d{2})\b")


def bench_facts(text: str) -> dict[str, str]:
    """A ``bench/results`` page's title, command, machine and date, read from its head: the
    ``Command:`` line, then either a ``| date |`` / ``| machine |`` table or a line opening
    ``YYYY-MM-DD, machine, ...;``. Missing facts are empty strings."""
    lines = text.splitlines()
    facts = {"title": "", "command": "", "machine": "", "date": ""}
    for line in lines:
        if line.startswith("# ") and not facts["title"]:
            facts["title"] = line[2:].strip()
        elif line.startswith("Command:") and not facts["command"]:
            found = re.search(r"`([^`]+)`", line)
            facts["command"] = found.group(1) if found else line.split(":", 1)[1].strip()
        elif re.match(r"\|\s*date\s*\|", line) and not facts["date"]:
            facts["date"] = line.split("|")[2].strip()
        elif re.match(r"\|\s*machine\s*\|", line) and not facts["machine"]:
            facts["machine"] = line.split("|")[2].strip()
        elif DATE.match(line) and not facts["date"]:
            facts["date"] = DATE.match(line).group(1)  # type: ignore[union-attr]
            head = line.split(";", 1)[0]
            facts["machine"] = head[len(facts["date"]) :].strip(" ,")
    return facts


def benchmarks_table() -> str:
    rows = [
        "| page | what it measures | command | machine | date |",
        "|---|---|---|---|---|",
    ]
    for path in bench_pages():
        facts = bench_facts(path.read_text(encoding="utf-8"))
        command = facts["command"].replace("|", "\\|")
        rows.append(
            f"| [{path.stem}]({path.name}) | {facts['title']} | `{command}` | "
            f"{facts['machine']} | {facts['date']} |"
        )
    return "\n".join(rows)


def pilot_page() -> str:
    """The pilot's README, then its report with every heading one level down."""
    readme = (PILOT / "README.md").read_text(encoding="utf-8").rstrip()
    report = (PILOT / "study.md").read_text(encoding="utf-8")
    report = re.sub(r"^(#+) ", r"#\1 ", report, flags=re.M)
    figure = "![The pilot's KL ratio to FishBack by layer](kl_ratio_by_layer.png)"
    return f"{readme}\n\n{figure}\n\n{report}"


def cli_page() -> str:
    """``steerlens --help`` and each subcommand's, as argparse prints them at 80 columns."""
    import argparse
    import os
    from unittest import mock

    from steerlens.cli import build_parser

    parser = build_parser()
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    parts = [
        "# Command line",
        "",
        "`steerlens` (installed in `.venv/bin/`) parses its arguments and calls the library; every",
        "subcommand's help below is generated from the parser itself.",
    ]
    # argparse reads the width from COLUMNS when it formats
    with mock.patch.dict(os.environ, {"COLUMNS": "80"}):
        parts += ["", "```text", parser.format_help().rstrip(), "```"]
        for action in subparsers:
            for name, sub in action.choices.items():
                help_text = sub.format_help().rstrip()
                parts += ["", f"## `steerlens {name}`", "", "```text", help_text, "```"]
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------ methods
def methods_index() -> str:
    from steerlens.methods import list_methods

    table = list_methods()
    pages = set(method_names())
    lines = [
        "# Steering methods",
        "",
        "Every method registered in `steerlens.methods.REGISTRY`, as `steerlens.list_methods()`",
        "lists it. Each fits to an `Intervention` with `sl.fit(model, name, **inputs, **options)`;",
        "its options are its config's fields. The implicit metric is the geometry in which the",
        "method's direction is the steepest ascent of the concept (see [ρ](../concepts/rho.md)).",
        "",
        "| method | fits on | implicit metric | what it does |",
        "|---|---|---|---|",
    ]
    for row in table.itertuples():
        description = str(row.description).replace("|", "\\|")
        name = f"[`{row.name}`]({row.name}.md)" if row.name in pages else f"`{row.name}`"
        lines.append(f"| {name} | {row.fits_on} | {row.implicit_metric} | {description} |")
    return "\n".join(lines) + "\n"
