"""The bad-input suite on the default model: the cases that need a real tokenizer, and the
command line (which loads its own model). The API cases on the tiny model are in
``tests/unit/test_bad_input.py``; as there, every case names the steerlens exception it must raise
and a phrase of its message, and leaves the model with no hooks and bit-identical weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import steerlens as sl
from steerlens import errors
from steerlens.cli import main
from steerlens.datasets import verb_concept
from steerlens.methods.vector import sae_intervention
from tests.conftest import Case, raises_and_leaves_untouched, tiny_sae

REAL_CASES = [
    Case("multi-token target word",
         lambda m, t: sl.PairMapping.from_words(m, {"▁walk": "▁perambulated"}),
         errors.ConceptError, "perambulated"),
    Case("word concept with no single-token word",
         lambda m, t: sl.TokenSet.from_words(m, ["▁antidisestablishmentarianism"]),
         errors.ConceptError, "antidisestablishmentarianism"),
    Case("unknown verb concept", lambda m, t: verb_concept(m, "future"),
         errors.InputError, "unknown verb kind 'future'"),
    Case("SAE hooked at another layer of the real model",
         lambda m, t: sae_intervention(
             m, sl.sae_feature(tiny_sae(576, "blocks.3.hook_resid_post"), 0), site="resid_post.12"
         ),
         errors.ConceptError, "trained at"),
]  # fmt: skip


@pytest.mark.integration
@pytest.mark.parametrize("case", REAL_CASES, ids=lambda c: c.id)
def test_default_model_bad_input(case, default_model, tmp_path):
    raises_and_leaves_untouched(case, default_model, tmp_path)


def _concept_file(tmp_path: Path, content: str) -> str:
    path = tmp_path / "concept.json"
    path.write_text(content)
    return str(path)


def _contexts_file(tmp_path: Path, lines: list[str]) -> str:
    path = tmp_path / "contexts.txt"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


GOOD_PAIRS = json.dumps({"▁go": "▁went", "▁take": "▁took"})

CLI_CASES = [
    ("evaluate: multi-token word in the concept file",
     lambda t: ["evaluate", "--concept", _concept_file(t, json.dumps({"▁walk": "▁perambulated"})),
                "--contexts", _contexts_file(t, ["I want to"]), "--layers", "12"],
     "perambulated"),
    ("evaluate: concept file that is not JSON",
     lambda t: ["evaluate", "--concept", _concept_file(t, "{go: went"),
                "--contexts", _contexts_file(t, ["I want to"]), "--layers", "12"],
     "JSON"),
    ("evaluate: contexts file that does not exist",
     lambda t: ["evaluate", "--concept", _concept_file(t, GOOD_PAIRS),
                "--contexts", str(t / "missing.txt"), "--layers", "12"],
     "missing.txt"),
    ("evaluate: contexts file with no contexts",
     lambda t: ["evaluate", "--concept", _concept_file(t, GOOD_PAIRS),
                "--contexts", _contexts_file(t, ["", "   "]), "--layers", "12"],
     "has no non-empty lines"),
    ("evaluate: context longer than the model's context",
     lambda t: ["evaluate", "--concept", _concept_file(t, GOOD_PAIRS),
                "--contexts", _contexts_file(t, ["word " * 3000]), "--layers", "12"],
     "past the model's context"),
    ("evaluate: layer out of range",
     lambda t: ["evaluate", "--concept", _concept_file(t, GOOD_PAIRS),
                "--contexts", _contexts_file(t, ["I want to"]), "--layers", "30"],
     "out of range"),
    ("metric: unknown site", lambda t: ["metric", "--site", "blocks.3.hook_nonsense"],
     "unknown hook"),
    ("reproduce: target probability above 1", lambda t: ["reproduce", "--targets", "1.5",
                                                         "--results", str(t / "r")],
     "targets must be probabilities"),
]  # fmt: skip


@pytest.mark.integration
@pytest.mark.parametrize(
    ("argv", "message"), [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES]
)
def test_cli_bad_input(argv, message, default_model, tmp_path, capsys):
    """The command line loads its own model: exit status 2, the message, no results left."""
    assert main(argv(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "error" in err and message in err, err
    assert not list(tmp_path.glob("**/*.csv")), "no partial results may be left"
