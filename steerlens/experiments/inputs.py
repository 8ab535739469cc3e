"""A user's concept and contexts, from files, checked against the model.

A concept file is a JSON object mapping base words to target words, the format of
``../shared/data/verb_morphology`` (``"▁"`` marks a leading space), e.g.
``{"▁walk": "▁walked", "▁see": "▁saw"}``; every word must be one token of the model. A built-in
verb concept (``past``, ``third``, ``ing``) may be named instead of a file. A contexts file holds
one context per line: text whose next token should be a base form. Each context is paired with
the base form the model finds likeliest next, and steering moves it to that base's target.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from steerlens.concepts import PairMapping
from steerlens.datasets import VerbContext
from steerlens.datasets.verbs import VERB_KINDS, verb_concept
from steerlens.errors import InputError
from steerlens.evaluation import next_logprobs
from steerlens.experiments.matched import context_tokens

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer


def load_pair_file(model: HookedTransformer, spec: str | Path) -> PairMapping:
    """The pair mapping in JSON file ``spec`` (or the built-in verb concept of that name), every
    word a single token of ``model``'s tokenizer (else :class:`ConceptError` naming them)."""
    path = Path(spec)
    if not path.exists() and str(spec) in VERB_KINDS:
        return verb_concept(model, str(spec))
    if not path.is_file():
        raise InputError(
            f"concept file {spec} does not exist (give a JSON file of base → target words, or "
            f"a built-in concept: {', '.join(VERB_KINDS)})"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"concept file {path} is not JSON: {err}") from None
    if not isinstance(data, dict) or not data:
        raise InputError(
            f"concept file {path} must hold a non-empty JSON object of base word → target word, "
            'e.g. {"▁walk": "▁walked"}'
        )
    bad = [(k, v) for k, v in data.items() if not (isinstance(v, str) and k.strip() and v.strip())]
    if bad:
        raise InputError(f"concept file {path}: entries must map words to words; bad: {bad[:5]}")
    return PairMapping.from_words(model, data, name=path.stem, drop_multi_token=False)


def read_lines(path: str | Path, what: str = "contexts") -> list[str]:
    """The non-empty lines of a text file (InputError if missing or empty)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} file {path} does not exist")
    lines = [line.rstrip("\n") for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise InputError(f"{what} file {path} has no non-empty lines")
    return lines


def user_contexts(
    model: HookedTransformer, mapping: PairMapping, texts: Sequence[str]
) -> list[VerbContext]:
    """Each text as a context whose base is the mapping's likeliest base form after it."""
    if not texts:
        raise InputError("no contexts given")
    tok = model.tokenizer
    if tok is None:
        raise InputError("the model has no tokenizer; contexts are text")
    bos = 1 if model.cfg.default_prepend_bos and tok.bos_token_id is not None else 0
    bases = torch.tensor(mapping.bases, device=model.cfg.device)
    target_of = mapping.as_dict()
    word_of = dict(zip(mapping.bases, mapping.pairs_words, strict=True))
    out = []
    for i, text in enumerate(texts):
        ids = tuple(int(t) for t in tok.encode(text, add_special_tokens=False))
        if not ids:
            raise InputError(f"context {i + 1} is empty after tokenization: {text!r}")
        if len(ids) + bos > model.cfg.n_ctx:
            raise InputError(
                f"context {i + 1} has {len(ids) + bos} tokens, past the model's context of "
                f"{model.cfg.n_ctx}: {text[:60]!r}..."
            )
        ctx = VerbContext(text, ids, 0, 0, "", "", i)
        logp = next_logprobs(model, context_tokens(model, ctx))
        base = int(bases[int(logp[bases].argmax())])
        verb, target_word = word_of[base]
        out.append(VerbContext(text, ids, base, target_of[base], verb, target_word, i))
    return out
