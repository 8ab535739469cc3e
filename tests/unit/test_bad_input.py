"""The bad-input suite: distinct bad inputs across the public API.

Each case names what it feeds, the steerlens exception it must raise (one hierarchy,
``steerlens.errors``) and a phrase the message must contain; after every case the model has no
hooks and bit-identical weights. These cases run on the tiny float64 GPT-2-like model; the cases
that need a real tokenizer, and the command line, are in
``tests/integration/test_bad_input_default.py``.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from sae_lens import StandardSAE

import steerlens as sl
from steerlens import errors
from steerlens.concepts import PairConcept
from steerlens.concepts.pairs import ContrastPairs
from steerlens.diagnostics import spectral_cost_ratio
from steerlens.methods.vector import probe_intervention, sae_intervention
from steerlens.metric.outcomes import OffTarget
from tests.conftest import Case, raises_and_leaves_untouched, tiny_sae, unchecked

TOKENS = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
D = 16  # the tiny model's d_model


def _vec(*values: float) -> torch.Tensor:
    v = torch.ones(D, dtype=torch.float64)
    v[: len(values)] = torch.tensor(values, dtype=torch.float64)
    return v


def _steer(model, site: str, vector: torch.Tensor, scale: float = 1.0) -> None:
    with sl.add_vector(model, site, vector, scale):
        model(TOKENS[None])


def _steer_ill_typed(model, site: str, vector: torch.Tensor) -> None:
    """A vector that is not ``Float[Tensor, "dim"]``: steerlens's error, not the type checker's."""
    with unchecked():
        _steer(model, site, vector)


def _probe(site: str = "resid_post.0", width: int = D, weight: float = 1.0) -> sl.LinearProbe:
    return sl.LinearProbe(site=site, weight=torch.full((width,), weight), bias=0.0, name="p")


def _sae(width: int = D, hook: str = "blocks.0.hook_resid_post") -> StandardSAE:
    return tiny_sae(width, hook)


def _saved(tmp_path: Path) -> Path:
    iv = sl.Intervention("caa", {"resid_post.0@all": _vec()}, 1.0)
    return iv.save(tmp_path / "iv")


def _truncate(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    data = (folder / "tensors.safetensors").read_bytes()
    (folder / "tensors.safetensors").write_bytes(data[: len(data) // 2])
    sl.load_intervention(folder)


def _tamper(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    data = bytearray((folder / "tensors.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "tensors.safetensors").write_bytes(bytes(data))
    sl.load_intervention(folder)


def _pickle(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    torch.save({"v0": _vec()}, folder / "tensors.safetensors")  # a pickle, under the right name
    meta = json.loads((folder / "meta.json").read_text())
    meta["tensors_sha256"] = (
        __import__("hashlib").sha256((folder / "tensors.safetensors").read_bytes()).hexdigest()
    )  # even with a matching checksum it must not be unpickled
    (folder / "meta.json").write_text(json.dumps(meta))
    sl.load_intervention(folder)


def _plain_pickle(tmp_path: Path) -> None:
    path = tmp_path / "steering.pkl"
    path.write_bytes(pickle.dumps({"v": [1.0, 2.0]}))
    sl.load_intervention(path)


def _edit_meta(tmp_path: Path, **changes) -> None:
    folder = _saved(tmp_path)
    meta = json.loads((folder / "meta.json").read_text())
    meta.update(changes)
    (folder / "meta.json").write_text(json.dumps(meta))
    sl.load_intervention(folder)


def _bad_json(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    (folder / "meta.json").write_text("{not json")
    sl.load_intervention(folder)


def _probe_as_intervention(tmp_path: Path) -> None:
    folder = _probe().save(tmp_path / "probe")
    sl.load_intervention(folder)


def _metric(model):
    return sl.pullback_metric(model, TOKENS, "resid_post.0", vocab="full")


API_CASES = [
    # sites
    Case("unknown hook", lambda m, t: sl.pullback_metric(m, TOKENS, "blocks.0.hook_nonsense"),
         errors.SiteError, "unknown"),
    Case("malformed site", lambda m, t: sl.pullback_metric(m, TOKENS, "resid_post.x"),
         errors.SiteError, "resid_post.x"),
    Case("layer out of range", lambda m, t: sl.pullback_metric(m, TOKENS, "resid_post.7"),
         errors.SiteError, "out of range"),
    Case("head out of range", lambda m, t: sl.pullback_metric(m, TOKENS, "z.0:9"),
         errors.SiteError, "head"),
    Case("head on a residual site", lambda m, t: sl.pullback_metric(m, TOKENS, "resid_post.0:1"),
         errors.SiteError, "head"),
    Case("position past the prompt",
         lambda m, t: sl.pullback_metric(m, TOKENS, "resid_post.0@50"),
         errors.SiteError, "position"),
    Case("unknown position rule", lambda m, t: sl.Site.parse("resid_post.0@first"),
         errors.SiteError, "first"),
    Case("site of an unknown kind", lambda m, t: sl.Site("resid_sideways", 0),
         errors.SiteError, "resid_sideways"),
    # prompts
    Case("prompt past n_ctx", lambda m, t: sl.pullback_metric(m, torch.ones(40, dtype=torch.long),
                                                              "resid_post.0"),
         errors.InputError, "n_ctx"),
    Case("empty prompt", lambda m, t: sl.pullback_metric(m, torch.ones(0, dtype=torch.long),
                                                         "resid_post.0"),
         errors.InputError, "no tokens"),
    Case("token id outside the vocabulary",
         lambda m, t: sl.pullback_metric(m, torch.tensor([1, 999]), "resid_post.0"),
         errors.InputError, "999"),
    Case("3-D token tensor", lambda m, t: sl.pullback_metric(m, torch.ones(1, 1, 4).long(),
                                                             "resid_post.0"),
         errors.InputError, "shape"),
    Case("float tokens", lambda m, t: sl.pullback_metric(m, [torch.ones(4)], "resid_post.0"),
         errors.InputError, "integer"),
    Case("one string as a dataset", lambda m, t: sl.expected_metric(m, "a prompt", "resid_post.0"),
         errors.InputError, "not one string"),
    Case("empty dataset", lambda m, t: sl.expected_metric(m, [], "resid_post.0", progress=False),
         errors.InputError, "empty"),
    Case("text prompt for a model without a tokenizer",
         lambda m, t: sl.pullback_metric(m, "hello", "resid_post.0"),
         errors.InputError, "tokenizer"),
    # vectors
    Case("NaN vector", lambda m, t: _steer(m, "resid_post.0", _vec(float("nan"))),
         errors.NonFiniteError, "NaN"),
    Case("inf vector", lambda m, t: _steer(m, "resid_post.0", _vec(float("inf"))),
         errors.NonFiniteError, "inf"),
    Case("strength that overflows", lambda m, t: _steer(m, "resid_post.0", _vec(1e300), 1e300),
         errors.NonFiniteError, "overflows"),
    Case("vector of the wrong width", lambda m, t: _steer(m, "resid_post.0", torch.ones(15)),
         errors.InputError, "(16,)"),
    Case("2-D vector", lambda m, t: _steer_ill_typed(m, "resid_post.0", torch.ones(1, D)),
         errors.InputError, "shape"),
    Case("integer vector",
         lambda m, t: _steer_ill_typed(m, "resid_post.0", torch.ones(D, dtype=torch.long)),
         errors.InputError, "floating-point"),
    Case("vector on the meta device",
         lambda m, t: _steer(m, "resid_post.0", torch.ones(D, device="meta")),
         errors.InputError, "meta device"),
    Case("zero direction for rho", lambda m, t: spectral_cost_ratio(
        _metric(m), torch.zeros(D, dtype=torch.float64), _vec()),
         errors.InputError, "zero direction"),
    Case("direction orthogonal to the gradient", lambda m, t: spectral_cost_ratio(
        _metric(m), _vec(1.0, -1.0) * torch.tensor([1.0, 1.0] + [0.0] * (D - 2)).double(),
        _vec()),
         errors.InputError, "orthogonal"),
    Case("vector of the wrong width for solve", lambda m, t: _metric(m).solve(torch.ones(5)),
         errors.InputError, "5"),
    Case("negative damping", lambda m, t: _metric(m).solve(_vec(), damping=-1.0),
         errors.InputError, "damping must be a finite number >= 0"),
    # concepts
    Case("empty token set", lambda m, t: sl.TokenSet.from_ids([]),
         errors.ConceptError, "empty"),
    Case("token id outside the vocabulary in a concept",
         lambda m, t: sl.TokenSet.from_ids([3, 4000], d_vocab=m.cfg.d_vocab),
         errors.InputError, "[4000] are out of range"),
    Case("pair mapping a token to itself", lambda m, t: sl.PairMapping.from_ids({3: 3}),
         errors.ConceptError, "3"),
    Case("empty contrast pairs", lambda m, t: ContrastPairs.from_pairs([]),
         errors.ConceptError, "empty"),
    Case("contrast pair that is not a pair",
         lambda m, t: ContrastPairs.from_pairs([("only plus",)]),
         errors.ConceptError, "not a (plus, minus) pair"),
    Case("complement of every token",
         lambda m, t: sl.pullback_metric(m, TOKENS, "resid_post.0",
                                         off_target=OffTarget.complement(range(m.cfg.d_vocab))),
         errors.ConceptError, "excludes the whole vocabulary"),
    # probes and SAEs
    Case("probe of another width", lambda m, t: probe_intervention(m, _probe(width=12)),
         errors.ConceptError, "width 12"),
    Case("probe for another site",
         lambda m, t: probe_intervention(m, _probe(), site="resid_post.1"),
         errors.ConceptError, "trained at"),
    Case("probe with a NaN weight", lambda m, t: _probe(weight=float("nan")),
         errors.NonFiniteError, "NaN"),
    Case("probe with a zero weight", lambda m, t: _probe(weight=0.0),
         errors.ConceptError, "zero weight"),
    Case("SAE of another width", lambda m, t: sae_intervention(m, sl.sae_feature(_sae(12), 0)),
         errors.ConceptError, "width 12"),
    Case("SAE for another site",
         lambda m, t: sae_intervention(m, sl.sae_feature(_sae(), 0), site="resid_post.1"),
         errors.ConceptError, "trained at"),
    Case("SAE feature index out of range", lambda m, t: sl.sae_feature(_sae(), 99),
         errors.ConceptError, "99"),
    # methods and options
    Case("unknown method", lambda m, t: sl.fit(m, "telepathy"),
         errors.MethodError, "registered methods"),
    Case("iterative method without a concept",
         lambda m, t: sl.fit(m, "fishback", site="resid_post.0", prompt=TOKENS),
         errors.InputError, "concept="),
    Case("target probability above 1",
         lambda m, t: sl.fit(m, "fishback", site="resid_post.0", prompt=TOKENS,
                             concept=PairConcept(3, 4), target_probability=1.5),
         errors.SteerlensError, "1.5"),
    Case("unknown vocab mode",
         lambda m, t: sl.pullback_metric(m, TOKENS, "resid_post.0", vocab="most"),
         errors.InputError, "most"),
    Case("dropped mass of 1.5",
         lambda m, t: sl.pullback_metric(m, TOKENS, "resid_post.0", dropped_mass=1.5),
         errors.InputError, "dropped_mass"),
    Case("intervention with nothing in it", lambda m, t: sl.Intervention("x", {}),
         errors.InputError, "no vectors"),
    Case("intervention with a NaN scale",
         lambda m, t: sl.Intervention("x", {"resid_post.0": _vec()}, float("nan")),
         errors.NonFiniteError, "scale"),
    Case("intervention fitted for a wider model",
         lambda m, t: sl.Intervention("x", {"resid_post.0": torch.ones(32)}).apply(m).__enter__(),
         errors.InputError, "(16,)"),
    Case("n_ctx of zero", lambda m, t: sl.load_model(n_ctx=0),
         errors.InputError, "n_ctx"),
    Case("model not available offline", lambda m, t: sl.load_model("no-such-model-xyz"),
         errors.ModelLoadError, "no-such-model-xyz"),
    # artifacts
    Case("artifact folder that does not exist", lambda m, t: sl.load_intervention(t / "nothing"),
         errors.ArtifactError, "not an artifact folder"),
    Case("truncated tensor file", lambda m, t: _truncate(t),
         errors.ArtifactError, "truncated or tampered"),
    Case("tampered tensor file", lambda m, t: _tamper(t),
         errors.ArtifactError, "truncated or tampered"),
    Case("pickle where safetensors is expected", lambda m, t: _pickle(t),
         errors.ArtifactError, "not a valid safetensors file"),
    Case("a pickle file instead of an artifact folder", lambda m, t: _plain_pickle(t),
         errors.ArtifactError, "not an artifact folder"),
    Case("artifact from a future format", lambda m, t: _edit_meta(t, format_version=99),
         errors.ArtifactError, "format version 99"),
    Case("artifact of another kind", lambda m, t: _probe_as_intervention(t),
         errors.ArtifactError, "'probe' artifact"),
    Case("metadata that is not JSON", lambda m, t: _bad_json(t),
         errors.ArtifactError, "not valid JSON"),
    Case("metadata naming a dtype that does not exist",
         lambda m, t: _edit_meta(t, dtypes={"v0": "torch.float99"}),
         errors.ArtifactError, "float99"),
]  # fmt: skip


@pytest.mark.parametrize("case", API_CASES, ids=lambda c: c.id)
def test_api_bad_input(case, gpt2_model, tmp_path):
    raises_and_leaves_untouched(case, gpt2_model, tmp_path)


def test_every_error_is_a_steerlens_error_and_its_builtin():
    for cls in vars(errors).values():
        if isinstance(cls, type) and issubclass(cls, Exception) and cls is not Exception:
            assert issubclass(cls, errors.SteerlensError)
            if cls is not errors.SteerlensError:
                assert len(cls.__mro__) > 3, f"{cls.__name__} refines no builtin"
