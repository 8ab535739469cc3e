"""The documentation's pages as sources: every registered method has a page that names its
implicit metric and renders its config, every method page's example runs (on the tiny models),
every ``>>>`` example in the docs holds, every benchmark page states its command, machine and
date, and the README keeps its shape (its set-up commands first and CI's own, at most ~100
lines, the results on both KL measures, one example block)."""

from __future__ import annotations

import doctest
import importlib.util
import re
from pathlib import Path

import pytest

import steerlens as sl
from steerlens.methods import REGISTRY

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
README = (ROOT / "README.md").read_text(encoding="utf-8")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
METHOD_PAGES = sorted((DOCS / "methods").glob("*.md"))


def _blocks(path: Path) -> list[tuple[str, str]]:
    """(language, code) of every fenced block of a Markdown file."""
    return FENCE.findall(path.read_text(encoding="utf-8"))


def test_every_registered_method_has_a_page():
    documented = {p.stem for p in METHOD_PAGES}
    missing = sorted(set(REGISTRY) - documented)
    assert not missing, (
        f"registered methods without a page: {missing}; write docs/methods/<name>.md "
        "(its paper, implicit metric, config and a runnable example), as the others are"
    )
    assert documented <= set(REGISTRY), sorted(documented - set(REGISTRY))


@pytest.mark.parametrize("page", METHOD_PAGES, ids=lambda p: p.stem)
def test_a_method_page_states_its_entry(page):
    spec = REGISTRY[page.stem]
    text = page.read_text(encoding="utf-8")
    assert text.startswith("# ") and f"`{spec.name}`" in text.splitlines()[0]
    for field in ("Paper", "Direction", "Implicit metric", "Fits on"):
        assert f"- **{field}**:" in text, f"{page.name}: no {field}"
    line = next(ln for ln in text.splitlines() if ln.startswith("- **Implicit metric**:"))
    assert spec.implicit_metric in line, f"{page.name}: the registry says {spec.implicit_metric!r}"
    assert f"::: {spec.config.__module__}.{spec.config.__qualname__}" in text
    examples = [code for lang, code in _blocks(page) if lang == "python"]
    assert len(examples) == 1, f"{page.name}: one example, not {len(examples)}"
    assert f'"{spec.name}"' in examples[0], f"{page.name}: the example does not fit {spec.name}"


@pytest.mark.parametrize("page", METHOD_PAGES, ids=lambda p: p.stem)
def test_a_method_pages_example_runs(page):
    (code,) = [code for lang, code in _blocks(page) if lang == "python"]
    namespace: dict = {"__name__": f"docs_example_{page.stem}"}
    exec(compile(code, str(page), "exec"), namespace)  # its own asserts check what it claims
    iv = next(v for v in namespace.values() if isinstance(v, sl.Intervention))
    assert iv.method.startswith(page.stem.split("_")[0])


def _doctest_pages() -> list[Path]:
    return [
        path
        for path in sorted(DOCS.rglob("*.md"))
        if any(code.lstrip().startswith(">>>") for _, code in _blocks(path))
    ]


@pytest.mark.parametrize("path", _doctest_pages(), ids=lambda p: str(p.relative_to(DOCS)))
def test_doc_examples_hold(path):
    # a page's >>> blocks run in order with one namespace, as a reader goes down the page
    globs: dict = {}
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    parser = doctest.DocTestParser()
    for i, (_, code) in enumerate(_blocks(path)):
        if code.lstrip().startswith(">>>"):
            test = parser.get_doctest(code, globs, f"{path.name}[{i}]", str(path), 0)
            runner.run(test, clear_globs=False)
            globs = test.globs  # a DocTest runs on a copy
    assert runner.failures == 0 and runner.tries > 0, f"{path}: {runner.failures} failed"


def _hooks():
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("the docs extra is not installed: pip install -e '.[docs]'")
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "page", sorted((ROOT / "bench/results").glob("*.md")), ids=lambda p: p.stem
)
def test_every_benchmark_page_states_command_machine_and_date(page):
    facts = _hooks().bench_facts(page.read_text(encoding="utf-8"))
    assert facts["command"].startswith(".venv/bin/python bench/"), facts
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", facts["date"]), facts
    assert facts["machine"] and facts["title"], facts


def test_bench_facts_read_both_heads():
    hooks = _hooks()
    command = "Command: `.venv/bin/python bench/x.py`"
    table = f"# T\n\n{command}\n\n| date | 2026-01-02 |\n| machine | m |\n"
    line = "# T\n\nCommand: `.venv/bin/python bench/x.py --a`\n\n2026-01-03, x86_64, 2 threads; y\n"
    assert hooks.bench_facts(table) == {
        "title": "T",
        "command": ".venv/bin/python bench/x.py",
        "machine": "m",
        "date": "2026-01-02",
    }
    assert hooks.bench_facts(line)["machine"] == "x86_64, 2 threads"
    assert hooks.bench_facts("# T\n")["date"] == ""


def test_the_readme_keeps_its_shape():
    lines = README.splitlines()
    assert len(lines) <= 100
    # the two set-up commands, first, and the second is exactly what CI runs
    fence = lines.index("```bash")
    assert lines[fence + 1] == "bash scripts/setup.sh && .venv/bin/steerlens reproduce"
    assert lines[fence + 2] == "bash scripts/setup.sh && .venv/bin/python -m pytest"
    assert all(not ln.strip() or ln.startswith("# ") for ln in lines[:fence])
    ci = (ROOT / ".ci/run").read_text(encoding="utf-8").strip().splitlines()
    assert ci[-1] == lines[fence + 2]
    # the study's results on every measure, where FishBack loses, and what is not in yet
    facts = ["complement KL", "pair-merge KL", "whole-distribution KL", "perplexity",
             "Where FishBack loses", "ActAdd", "0.54×", "687 of 720", "gemma-3-270m"]  # fmt: skip
    for fact in facts:
        assert fact in README, fact
    assert [lang for lang, _ in FENCE.findall(README)].count("python") == 1
    # no timings outside links: nothing like "17 min" or "3.2 s"
    assert not re.search(r"\d+(\.\d+)? ?(s|min|ms|seconds|minutes|hours)\b", README)


def test_readme_links_reach_files():
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README):
        if "://" not in target:
            assert (ROOT / target).exists(), target
