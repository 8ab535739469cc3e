"""Turning words into token ids for one tokenizer, and saying so loudly when it goes wrong.

Words follow the convention of the Park et al. data: a leading ``"▁"`` (U+2581) stands for a
leading space, so ``"▁walk"`` is tokenized as ``" walk"``; any other string is taken literally.
Words are tokenized without a beginning-of-sequence token.

>>> from steerlens.testing import WhitespaceTokenizer
>>> encode_word(WhitespaceTokenizer(["<bos>", " walk", "ed"]), "▁walked")
(1, 2)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from steerlens.errors import ConceptError, InputError

SPACE_MARK = "\u2581"


@runtime_checkable
class TokenizerLike(Protocol):
    """The part of a Hugging Face tokenizer the concepts use."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


def tokenizer_of(model_or_tokenizer: Any) -> TokenizerLike:
    """The tokenizer of a HookedTransformer (its ``.tokenizer``), or the argument itself if it
    already has an ``encode`` method. Raises :class:`ConceptError` for a model without one.

    >>> from steerlens.testing import WhitespaceTokenizer
    >>> tok = WhitespaceTokenizer([" a"])
    >>> tokenizer_of(tok) is tok
    True
    """
    if hasattr(model_or_tokenizer, "cfg") and hasattr(model_or_tokenizer, "tokenizer"):
        tok = model_or_tokenizer.tokenizer
        if tok is None:
            raise ConceptError(
                "the model has no tokenizer, so words cannot be mapped to tokens: "
                "use TokenSet.from_ids / PairMapping.from_ids instead"
            )
        return tok
    if callable(getattr(model_or_tokenizer, "encode", None)):
        return model_or_tokenizer
    raise InputError(
        f"expected a HookedTransformer or a tokenizer with an encode method, got "
        f"{type(model_or_tokenizer).__name__}"
    )


def word_text(word: str) -> str:
    """The literal text of a word: a leading ``"▁"`` becomes a space.

    >>> word_text("▁walk"), word_text("walk")
    (' walk', 'walk')
    """
    if word.startswith(SPACE_MARK):
        return " " + word[len(SPACE_MARK) :]
    return word


def encode_word(tokenizer: TokenizerLike, word: str) -> tuple[int, ...]:
    """The token ids of one word (``"▁"`` = leading space), with no special tokens."""
    if not isinstance(word, str) or not word_text(word).strip():
        raise ConceptError(f"a concept word must be a non-empty string, got {word!r}")
    ids = [int(i) for i in tokenizer.encode(word_text(word), add_special_tokens=False)]
    # Some tokenizers prepend BOS regardless of add_special_tokens.
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and len(ids) > 1 and ids[0] == bos:
        ids = ids[1:]
    return tuple(ids)


def _pieces(tokenizer: TokenizerLike, ids: Sequence[int]) -> list[str]:
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    if callable(convert):
        pieces: Any = convert(list(ids))
        return [str(p) for p in pieces]
    return [str(i) for i in ids]


def describe_words(tokenizer: TokenizerLike, bad: Sequence[tuple[str, tuple[int, ...]]]) -> str:
    """Each (word, its token ids) as the word and its token pieces, for an error message."""
    shown = [f"{w!r} -> {_pieces(tokenizer, ids)}" for w, ids in bad[:20]]
    more = f" (and {len(bad) - 20} more)" if len(bad) > 20 else ""
    return "; ".join(shown) + more


def check_ids(ids: Sequence[int], d_vocab: int | None, what: str) -> tuple[int, ...]:
    """``ids`` as ints; :class:`InputError` naming ``what`` if one is outside ``[0, d_vocab)``."""
    out = tuple(int(i) for i in ids)
    bad = [i for i in out if i < 0 or (d_vocab is not None and i >= d_vocab)]
    if bad:
        valid = f"[0, {d_vocab})" if d_vocab is not None else "non-negative"
        raise InputError(f"{what}: token ids {bad[:10]} are out of range; valid ids are {valid}")
    return out
