"""Natural contexts for a pair concept: text whose next token is a base form of the mapping.

This module owns finding, in a list of sentences, each position where the token is one of a
:class:`~steerlens.concepts.PairMapping`'s base ids, and keeping the text before it as a
prompt (``"... we must"`` before ``" act"``): the model would have written the base form there,
and steering should move it to the target form (``" acted"``). Contexts are token ids *without* a
beginning-of-sequence token; prepend the model's BOS (if it uses one) before running them. It
also splits contexts by verb, and makes contrast pairs of them for the contrastive methods
(:func:`verb_contrast_pairs`).

The base form is matched as a token, not parsed as a verb: ``" walk"`` in ``"a long walk"``
counts too. Tokens of the default model are word-initial, so the match is always a whole word
start.

>>> from steerlens.testing import WhitespaceTokenizer
>>> tok = WhitespaceTokenizer(["a", " b", " c", " walk", " walked", " .", "ed"])
>>> m = PairMapping.from_words(tok, {"▁walk": "▁walked"})
>>> [c.text for c in verb_contexts(tok, m, ["a b c walk ."], min_tokens=2)]
['a b c']
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd

from steerlens.concepts.pair_mapping import PairMapping
from steerlens.concepts.pairs import ContrastPairs
from steerlens.concepts.tokenization import TokenizerLike, tokenizer_of, word_text
from steerlens.datasets.verbs import split_by_verb
from steerlens.errors import ConceptError, InputError

_BATCH = 512


@dataclass(frozen=True)
class VerbContext:
    """One prompt whose natural next token is ``base_id`` (from the word ``verb``); steering
    should make it ``target_id`` (the word ``target_word``). ``token_ids`` has no BOS;
    ``text`` is its decoding; ``sentence`` is the index of the sentence it was cut from."""

    text: str
    token_ids: tuple[int, ...]
    base_id: int
    target_id: int
    verb: str
    target_word: str
    sentence: int


def _encode_batch(tok: TokenizerLike, batch: Sequence[str]) -> list[list[int]]:
    if callable(tok) and hasattr(tok, "batch_decode"):
        return [list(ids) for ids in tok(list(batch), add_special_tokens=False)["input_ids"]]
    return [list(tok.encode(s, add_special_tokens=False)) for s in batch]


def _decode(tok: TokenizerLike, ids: Sequence[int]) -> str:
    decode = getattr(tok, "decode", None)
    if not callable(decode):
        raise InputError("the tokenizer has no decode method, so contexts cannot be shown as text")
    return str(decode(list(ids)))


def verb_contexts(
    model_or_tokenizer: Any,
    mapping: PairMapping,
    sentences: Iterable[str],
    max_contexts: int = 500,
    *,
    min_tokens: int = 6,
    max_tokens: int = 64,
    max_per_verb: int | None = 20,
) -> list[VerbContext]:
    """Up to ``max_contexts`` distinct contexts (in sentence order) whose next token is a base
    form of ``mapping``.

    Each context is the sentence's tokens before the base token: at least ``min_tokens`` of them
    (shorter ones are skipped), and at most the last ``max_tokens``. ``max_per_verb`` caps the
    contexts per verb so that common verbs (" have", " make") do not crowd out the rest; shuffle
    ``sentences`` beforehand (``load_corpus`` does) to sample a whole corpus. Duplicate token
    prefixes are kept once.
    """
    if max_contexts < 1:
        raise InputError(f"max_contexts must be positive, got {max_contexts}")
    if min_tokens < 1 or max_tokens < min_tokens:
        raise InputError(f"need 1 <= min_tokens <= max_tokens, got {min_tokens}, {max_tokens}")
    if max_per_verb is not None and max_per_verb < 1:
        raise InputError(f"max_per_verb must be positive or None, got {max_per_verb}")
    tok = tokenizer_of(model_or_tokenizer)
    target_of = mapping.as_dict()
    word_of = dict(zip(mapping.bases, mapping.pairs_words, strict=True))
    per_verb: dict[int, int] = {}
    seen: set[tuple[int, ...]] = set()
    out: list[VerbContext] = []
    batch: list[str] = []
    start = 0

    def scan(batch: list[str], first: int) -> bool:
        for offset, ids in enumerate(_encode_batch(tok, batch)):
            for pos in range(min_tokens, len(ids)):
                base = ids[pos]
                if base not in target_of:
                    continue
                if max_per_verb is not None and per_verb.get(base, 0) >= max_per_verb:
                    continue
                prefix = tuple(ids[max(0, pos - max_tokens) : pos])
                if prefix in seen:
                    continue
                seen.add(prefix)
                per_verb[base] = per_verb.get(base, 0) + 1
                verb, target_word = word_of[base]
                out.append(
                    VerbContext(
                        text=_decode(tok, prefix),
                        token_ids=prefix,
                        base_id=base,
                        target_id=target_of[base],
                        verb=verb,
                        target_word=target_word,
                        sentence=first + offset,
                    )
                )
                if len(out) >= max_contexts:
                    return True
        return False

    for sentence in sentences:
        if not isinstance(sentence, str):
            raise InputError(f"sentences must be strings, got {type(sentence).__name__}")
        batch.append(sentence)
        if len(batch) == _BATCH:
            if scan(batch, start):
                return out
            start += len(batch)
            batch = []
    if batch:
        scan(batch, start)
    return out


def contexts_frame(contexts: Sequence[VerbContext]) -> pd.DataFrame:
    """The contexts as a table, one row each, columns as the :class:`VerbContext` fields plus
    ``n_tokens``."""
    frame = pd.DataFrame([asdict(c) for c in contexts], columns=list(VerbContext.__annotations__))
    frame["n_tokens"] = [len(c.token_ids) for c in contexts]
    return frame


@dataclass(frozen=True)
class ContextSplit:
    """Contexts split by verb: no verb (of ``mapping``) appears on both sides."""

    train: tuple[VerbContext, ...]
    test: tuple[VerbContext, ...]
    train_mapping: PairMapping
    test_mapping: PairMapping


def train_test_contexts(
    contexts: Sequence[VerbContext],
    mapping: PairMapping,
    test_fraction: float = 0.3,
    seed: int = 0,
) -> ContextSplit:
    """Split contexts by their verb with :func:`~steerlens.datasets.verbs.split_by_verb` on
    ``mapping`` (so a context lands where its verb does). Raises :class:`ConceptError` if there
    are no contexts or one side ends up with none.
    """
    if not contexts:
        raise ConceptError("no contexts to split")
    train_map, test_map = split_by_verb(mapping, test_fraction, seed)
    train_ids, test_ids = set(train_map.bases), set(test_map.bases)
    unknown = sorted({c.base_id for c in contexts} - train_ids - test_ids)
    if unknown:
        raise ConceptError(f"contexts with base tokens {unknown[:10]} not in {mapping.name!r}")
    train = tuple(c for c in contexts if c.base_id in train_ids)
    test = tuple(c for c in contexts if c.base_id in test_ids)
    if not train or not test:
        raise ConceptError(
            f"split by verb left {len(train)} train and {len(test)} test contexts: find more "
            "contexts (or verbs) before splitting"
        )
    return ContextSplit(train, test, train_map, test_map)


def verb_contrast_pairs(
    contexts: Sequence[VerbContext], *, name: str = "verb pairs"
) -> ContrastPairs:
    """One pair per context: the context followed by the target form (⁺) vs by the base form
    (⁻), e.g. ``"... they walked"`` vs ``"... they walk"``. Token ids are kept exactly
    (context ids + target id, context ids + base id); duplicate pairs are kept once.

    >>> ctx = VerbContext("Then they", (5, 6), 7, 8, "▁walk", "▁walked", 0)
    >>> verb_contrast_pairs([ctx]).pairs
    (('Then they walked', 'Then they walk'),)
    """
    if not contexts:
        raise ConceptError(f"contrast pairs {name!r}: no contexts given")
    pairs: dict[tuple[str, str], tuple[tuple[int, ...], tuple[int, ...]]] = {}
    for c in contexts:
        key = (c.text + word_text(c.target_word), c.text + word_text(c.verb))
        pairs.setdefault(key, (c.token_ids + (c.target_id,), c.token_ids + (c.base_id,)))
    return ContrastPairs(name=name, pairs=tuple(pairs), token_pairs=tuple(pairs.values()))
