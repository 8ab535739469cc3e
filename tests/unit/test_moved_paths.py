"""The old import paths of issue 18's moves: each still gives the very same object for one
release, with a DeprecationWarning that names the new path; unknown names still fail."""

from __future__ import annotations

import importlib

import pytest

# (old module, a name, its new module)
MOVED = [
    ("steerlens.concepts.tokens", "TokenSet", "steerlens.concepts.token_set"),
    ("steerlens.concepts.tokens", "PairMapping", "steerlens.concepts.pair_mapping"),
    ("steerlens.concepts.tokens", "PairConcept", "steerlens.concepts.pair_concept"),
    ("steerlens.concepts.tokens", "encode_word", "steerlens.concepts.tokenization"),
    ("steerlens.concepts.tokens", "log_target", "steerlens.concepts.base"),
    ("steerlens.concepts.contexts", "verb_contexts", "steerlens.datasets.contexts"),
    ("steerlens.concepts.text", "load_corpus", "steerlens.datasets.text"),
    ("steerlens.concepts.text", "read_r_character_vectors", "steerlens.datasets.rdata"),
    ("steerlens.concepts.countries", "capital_facts", "steerlens.datasets.countries"),
    ("steerlens.concepts.verbs", "verb_concept", "steerlens.datasets.verbs"),
    ("steerlens.concepts.activations", "harvest", "steerlens.activations"),
    ("steerlens.concepts.sae_train", "train_sae", "steerlens.sae_training"),
    ("steerlens.concepts.pairs", "verb_contrast_pairs", "steerlens.datasets.contexts"),
    ("steerlens.concepts", "verb_concept", "steerlens.datasets"),
    ("steerlens.concepts", "VerbContext", "steerlens.datasets"),
    ("steerlens.tiny", "tiny_model", "steerlens.testing"),
]


@pytest.mark.parametrize(("old", "name", "new"), MOVED, ids=[f"{o}.{n}" for o, n, _ in MOVED])
def test_old_path_warns_and_gives_the_same_object(old: str, name: str, new: str) -> None:
    module = importlib.import_module(old)
    with pytest.warns(DeprecationWarning, match=rf"{old}\.{name} moved to {new}\.{name}"):
        value = getattr(module, name)
    assert value is getattr(importlib.import_module(new), name)


@pytest.mark.parametrize("old", sorted({o for o, _, _ in MOVED}))
def test_old_module_still_refuses_unknown_names(old: str) -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = importlib.import_module(old).no_such_name


def test_concepts_still_exports_concept_types_without_a_warning() -> None:
    import steerlens.concepts as concepts
    from steerlens.concepts.pair_mapping import PairMapping

    assert concepts.PairMapping is PairMapping
    assert "verb_concept" not in concepts.__all__
