"""The documentation site as a reader meets it: built with ``mkdocs build --strict`` into a
temporary folder, served over HTTP and opened page by page in headless Chromium. Every page
must render (a heading, text, no JavaScript exception, no failed request), every image must
load from a file of the built site, every internal link must reach a page (and its anchor) of
the site, the API pages must show the real signatures of the main functions, and the notebook
pages their rich displays and figures.

Needs the ``docs`` extra (``scripts/setup.sh`` installs it) and Debian's ``chromium`` for the
browser part; either missing is a skip that names it. ``STEERLENS_DOCS_SCREENSHOTS=DIR`` keeps
the screenshots the test takes.
"""

from __future__ import annotations

import functools
import http.server
import importlib.util
import inspect
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
from matplotlib.image import imread

import steerlens as sl
from steerlens.auditing import audit
from steerlens.methods.registry import fit
from steerlens.metric.pullback import pullback_metric, pullback_sweep
from tests.docs.browser import PACKAGE, Browser, chromium

ROOT = Path(__file__).resolve().parents[2]
DOCS_PACKAGES = {
    "mkdocs": "mkdocs",
    "material": "mkdocs-material",
    "mkdocstrings_handlers.python": "mkdocstrings[python]",
    "mkdocs_jupyter": "mkdocs-jupyter",
}
#: pages whose screenshots the test takes (and a reader should look at)
SCREENSHOTS = {
    "index.html": "home",
    "api/metric/index.html": "api_metric",
    "notebooks/05_auditing/index.html": "notebook_audit",
    "study/index.html": "study",
    "methods/index.html": "methods",
}
#: (API page, function): the functions whose signatures the API reference must show
SIGNATURES = [
    ("api/metric/index.html", pullback_metric),
    ("api/metric/index.html", pullback_sweep),
    ("api/steering/index.html", fit),
    ("api/audit/index.html", audit),
]

COLLECT = """(() => {
  const article = document.querySelector("article") || document.body;
  const h1 = article.querySelector("h1");
  return {
    title: document.title,
    h1: h1 ? h1.innerText : "",
    text: article.innerText,
    images: [...document.images].map(i => ({
      src: i.getAttribute("src"), url: i.currentSrc || i.src,
      complete: i.complete, width: i.naturalWidth})),
    links: [...document.querySelectorAll("a[href]")].map(a => a.href),
    signatures: [...document.querySelectorAll(".doc-signature")].map(s => s.innerText),
    outputs: [...document.querySelectorAll(".jp-OutputArea-output")].map(o => ({
      html: o.classList.contains("jp-RenderedHTMLCommon") ? o.innerText : null,
      images: [...o.querySelectorAll("img")].map(i => i.naturalWidth)})),
  };
})()"""


def _missing_docs_packages() -> list[str]:
    missing = []
    for module, package in DOCS_PACKAGES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(package)
    return missing


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    missing = _missing_docs_packages()
    if missing:
        pytest.skip(
            f"the docs extra is not installed (missing: {', '.join(missing)}); "
            "pip install -e '.[docs]', as scripts/setup.sh does"
        )
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-6000:]}"
    assert "WARNING" not in result.stderr, result.stderr
    return out


def _pages(site: Path) -> list[str]:
    return sorted(
        str(p.relative_to(site))
        for p in site.rglob("*.html")
        if p.name == "index.html" and "assets" not in p.parts
    )


def test_the_site_has_a_page_for_every_part(site):
    pages = set(_pages(site))
    for part in [
        "index.html",
        "concepts/index.html",
        "concepts/rho/index.html",
        "tutorials/index.html",
        "methods/index.html",
        "api/index.html",
        "study/index.html",
        "study/reproduction/index.html",
        "benchmarks/index.html",
        "changelog/index.html",
        "citation/index.html",
        "cli/index.html",
    ]:
        assert part in pages, part
    notebooks = {p.stem for p in (ROOT / "notebooks").glob("*.ipynb")}
    assert notebooks and {f"notebooks/{n}/index.html" for n in notebooks} <= pages
    benches = {p.stem for p in (ROOT / "bench/results").glob("*.md")}
    assert benches and {f"benchmarks/{b}/index.html" for b in benches} <= pages
    methods = {p.stem for p in (ROOT / "docs/methods").glob("*.md")}
    assert methods and {f"methods/{m}/index.html" for m in methods} <= pages


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture(scope="module")
def server(site) -> Iterator[str]:
    handler = functools.partial(_Quiet, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture(scope="module")
def visited(site, server, tmp_path_factory) -> dict[str, dict]:
    """Every page of the site, opened in the browser: what it showed and what went wrong."""
    executable = chromium()
    if executable is None:
        pytest.skip(
            f"Debian package '{PACKAGE}' is not installed: apt-get install -y {PACKAGE} "
            "(scripts/setup.sh does, where it runs as root)"
        )
    shots = Path(os.environ.get("STEERLENS_DOCS_SCREENSHOTS") or tmp_path_factory.mktemp("shots"))
    shots.mkdir(parents=True, exist_ok=True)
    seen: dict[str, dict] = {}
    with Browser(executable) as browser:
        for page in _pages(site):
            url = server + page.removesuffix("index.html")
            problems = browser.visit(url)
            seen[page] = {**browser.evaluate(COLLECT), **problems, "url": url}
            if page in SCREENSHOTS:
                path = browser.screenshot(shots / f"{SCREENSHOTS[page]}.png")
                seen[page]["screenshot"] = str(path)
    return seen


def test_every_page_renders(visited):
    bad = []
    for page, seen in visited.items():
        if seen["exceptions"]:
            bad.append(f"{page}: JavaScript exceptions {seen['exceptions']}")
        if seen["failed"]:
            bad.append(f"{page}: failed requests {seen['failed']}")
        if not seen["h1"].strip():
            bad.append(f"{page}: no heading")
        if len(seen["text"]) < 200:
            bad.append(f"{page}: only {len(seen['text'])} characters of text")
        if not seen["title"].endswith("steerlens"):
            bad.append(f"{page}: title {seen['title']!r}")
    assert not bad, "\n".join(bad)
    assert len(visited) >= 60


def _site_file(site: Path, server: str, url: str) -> Path | None:
    """The file of the built site that a same-origin URL serves, or None for another origin."""
    if not url.startswith(server):
        return None
    path = unquote(urlsplit(url).path).lstrip("/")
    target = site / path
    return target / "index.html" if path.endswith("/") or target.is_dir() else target


def test_every_image_loads_from_the_site(visited, site, server):
    bad, local = [], 0
    for page, seen in visited.items():
        for image in seen["images"]:
            if not image["complete"] or image["width"] == 0:
                bad.append(f"{page}: broken image {image['src'][:80]}")
            if image["src"].startswith("data:"):
                continue
            target = _site_file(site, server, image["url"])
            if target is None or not target.is_file():
                bad.append(f"{page}: image {image['src']} is not a file of the site")
            local += 1
    assert not bad, "\n".join(bad)
    assert local >= 10  # the study's figures and the audit heatmap at least


@functools.cache
def _ids(path: Path) -> frozenset[str]:
    return frozenset(re.findall(r'\bid="([^"]+)"', path.read_text(encoding="utf-8")))


def test_every_internal_link_resolves(visited, site, server):
    bad, checked = [], 0
    for page, seen in visited.items():
        for link in seen["links"]:
            target = _site_file(site, server, link)
            if target is None:
                continue
            checked += 1
            if not target.is_file():
                bad.append(f"{page}: link {link} reaches no page")
                continue
            anchor = unquote(urlsplit(link).fragment)
            if anchor and target.suffix == ".html" and anchor not in _ids(target):
                bad.append(f"{page}: link {link}: no anchor #{anchor} there")
    assert not bad, "\n".join(sorted(set(bad)))
    assert checked > 1000


@pytest.mark.parametrize(("page", "function"), SIGNATURES, ids=lambda x: getattr(x, "__name__", x))
def test_api_pages_show_the_signatures(visited, page, function):
    name = function.__name__
    shown = [s for s in visited[page]["signatures"] if s.startswith(f"{name}(")]
    assert len(shown) == 1, f"{page} shows {len(shown)} signatures of {name}"
    params = list(inspect.signature(function).parameters)
    flat = " ".join(shown[0].replace("(", "( ").split())
    found = re.findall(r"[(,] \**(\w+) ?[:=,)]", flat)
    assert found == params, f"{name}: the page shows {found}, the function has {params}"


def test_notebook_pages_show_their_rich_displays_and_figures(visited):
    # what each notebook displays: the HTML of Metric, Intervention, Sweep and Audit, and figures
    want = {
        "01_quickstart": ["Metric('blocks.12.hook_resid_post'", "Intervention('fishback'"],
        "02_geometry": ["Sweep: 30 sites over 30 layers"],
        "05_auditing": ["Audit(methods=['fishback', 'caa']", "the five components it moves most"],
    }
    for name, texts in want.items():
        outputs = visited[f"notebooks/{name}/index.html"]["outputs"]
        html = "\n".join(o["html"] for o in outputs if o["html"])
        for text in texts:
            assert text in html, f"{name}: no rendered HTML output with {text!r}"
    for name in ("02_geometry", "03_diagnosing_methods", "05_auditing"):
        outputs = visited[f"notebooks/{name}/index.html"]["outputs"]
        widths = [w for o in outputs for w in o["images"]]
        assert len(widths) >= 3 and min(widths) > 0, f"{name}: figures {widths}"


def test_the_audit_heatmap_is_shown(visited):
    images = visited["concepts/audit/index.html"]["images"]
    heatmap = [i for i in images if i["src"].endswith("05_audit_change.png")]
    assert len(heatmap) == 1 and heatmap[0]["width"] > 300


@pytest.mark.parametrize("page", ["index.html", "study/index.html"])
def test_the_results_state_both_kl_measures(visited, page):
    # the README's results table, included from the README itself
    text = visited[page]["text"]
    for fact in ["complement KL", "pair-merge KL", "perplexity", "Where FishBack loses", "ActAdd"]:
        assert fact in text, f"{page}: {fact!r}"
    row = next(line for line in text.splitlines() if line.startswith("pair-merge KL"))
    assert row.split("\t")[1:] == [
        "9.61×", "12.9×", "12.5×", "4.34×", "9.05× [7.39, 11.2] (687 of 720)"
    ]  # fmt: skip


def test_screenshots_show_a_rendered_page(visited):
    for page in SCREENSHOTS:
        path = Path(visited[page]["screenshot"])
        pixels = imread(path)
        assert pixels.shape[:2] == (900, 1280)
        # a rendered page has text and a header: far from one flat colour
        assert float(np.std(pixels[..., :3])) > 0.05, f"{page}: the screenshot is blank"


def test_the_methods_page_lists_the_registry(visited):
    index = visited["methods/index.html"]
    linked = {link.rstrip("/").rsplit("/", 1)[-1] for link in index["links"]}
    documented = {p.stem for p in (ROOT / "docs/methods").glob("*.md")}
    assert documented <= linked
    assert documented <= set(sl.list_methods()["name"])
