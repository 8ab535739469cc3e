"""Control models (random-init and shuffled twins) and the named geometry figures, against
TransformerLens's own initialisation and hand-computed references."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch

from steerlens._tl import HookedTransformer
from steerlens.diagnostics.controls import (
    control_model,
    random_from_config,
    random_like,
    shuffled,
)
from steerlens.diagnostics.geometry import (
    DEFINITIONS,
    GeometryRow,
    control_table,
    geometry_figures,
    geometry_rows,
    rows_frame,
)
from steerlens.errors import InputError, MetricError
from steerlens.metric import pullback_metric
from steerlens.testing import tiny_config
from tests.conftest import (
    Case,
    assert_untouched,
    raises_and_leaves_untouched,
    unchecked,
    weights_snapshot,
)

KINDS = ["random_init", "shuffled"]


def _state(model: HookedTransformer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a: HookedTransformer, b: HookedTransformer) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("kind", KINDS)
def test_same_shapes_dtype_device_and_config(model, kind):
    twin = control_model(model, kind, seed=3)
    real, fake = model.state_dict(), twin.state_dict()
    assert set(real) == set(fake)
    for name, value in real.items():
        assert fake[name].shape == value.shape, name
        assert fake[name].dtype == value.dtype, name
        assert fake[name].device == value.device, name
    for field in ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "act_fn"):
        assert getattr(twin.cfg, field) == getattr(model.cfg, field), field
    assert not twin.training
    assert twin.tokenizer is model.tokenizer


@pytest.mark.parametrize("kind", KINDS)
def test_original_and_global_random_state_left_as_found(model, kind):
    before = weights_snapshot(model)
    rng = torch.get_rng_state()
    control_model(model, kind, seed=5)
    assert torch.equal(torch.get_rng_state(), rng)
    assert_untouched(model, before)


@pytest.mark.parametrize("kind", KINDS)
def test_seed_deterministic(model, kind):
    a, b = control_model(model, kind, seed=7), control_model(model, kind, seed=7)
    c = control_model(model, kind, seed=8)
    assert _same_state(a, b)
    assert not _same_state(a, c)


def test_random_like_is_transformerlens_init(model):
    twin = random_like(model, seed=11)
    # TransformerLens's own seeded construction: its config seed reseeds, then init_weights
    cfg = copy.deepcopy(model.cfg)
    cfg.seed, cfg.init_weights, cfg.device = 11, True, "cpu"
    reference = HookedTransformer(cfg)
    state = twin.state_dict()
    for name, value in reference.state_dict().items():
        assert torch.equal(state[name].cpu(), value), name
    # and it is not the real model: every weight matrix differs, at TL's initializer scale
    real = model.state_dict()
    for name, value in state.items():
        if "W_" in name:
            assert not torch.equal(value, real[name]), name
            assert float(value.std()) == pytest.approx(model.cfg.initializer_range, rel=0.25)


def test_shuffled_permutes_block_parameters_only(model):
    twin = shuffled(model, seed=2)
    real, fake = model.state_dict(), twin.state_dict()
    parameters = {n for n, _ in model.named_parameters()}
    moved = 0
    for name, value in real.items():
        if name.startswith("blocks.") and name in parameters:
            # the same multiset of entries ...
            assert torch.equal(value.flatten().sort().values, fake[name].flatten().sort().values)
            # ... in another arrangement (a constant tensor, e.g. norm weights of one, cannot move)
            if value.unique().numel() > 1:
                assert not torch.equal(value, fake[name]), name
                moved += 1
        else:
            assert torch.equal(value, fake[name]), name
    assert moved >= 4 * model.cfg.n_layers


@pytest.mark.parametrize("kind", KINDS)
def test_controls_change_outputs_and_geometry(model, tokens, kind):
    twin = control_model(model, kind, seed=0)
    with torch.no_grad():
        assert torch.isfinite(twin(tokens)).all()
        assert not torch.allclose(twin(tokens), model(tokens))
    real = pullback_metric(model, tokens, "resid_post.0").spectrum()
    fake = pullback_metric(twin, tokens, "resid_post.0").spectrum()
    assert not torch.allclose(real, fake)


def test_random_from_config_needs_no_tokenizer():
    cfg = tiny_config("llama", d_vocab=40)
    twin = random_from_config(cfg, seed=4)
    assert twin.tokenizer is None and twin.cfg.d_vocab == 40
    assert _same_state(twin, random_from_config(cfg, seed=4))
    with torch.no_grad():
        assert twin(torch.tensor([[1, 2, 3]])).shape == (1, 3, 40)


# ------------------------------------------------------------------ definitions


def _rotated(evals: list[float]) -> torch.Tensor:
    n = len(evals)
    q = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))[0]
    return q @ torch.diag(torch.tensor(evals, dtype=torch.float64)) @ q.T


def test_definitions_match_hand_computed_reference():
    # G = Q diag(3, 1, 0, 0) Qᵀ: ḡ = 1, ‖G − I‖₂ = 2, ‖G‖₂ = 3, ‖G − I‖_F = √6, ‖G‖_F = √10,
    # PR = 16/10, two directions hold all of the trace, the top one 3/4 of it
    g = _rotated([3.0, 1.0, 0.0, 0.0])
    figures = geometry_figures(torch.linalg.eigvalsh(g))
    assert figures == pytest.approx(
        {
            "deviation_spectral": 2 / 3,
            "deviation_frobenius": math.sqrt(6 / 10),
            "participation_fraction": 1.6 / 4,
            "rank_90_fraction": 0.5,
            "rank_95_fraction": 0.5,
            "rank_99_fraction": 0.5,
            "top_share": 0.75,
        }
    )
    assert list(figures) == list(DEFINITIONS)


def test_definitions_match_matrix_norms_directly():
    g = _rotated([5.0, 2.0, 1.0, 0.5, 0.25, 0.0])
    d = g.shape[0]
    off = g - torch.trace(g) / d * torch.eye(d, dtype=g.dtype)
    figures = geometry_figures(torch.linalg.eigvalsh(g))
    spectral = torch.linalg.matrix_norm(off, 2) / torch.linalg.matrix_norm(g, 2)
    frobenius = torch.linalg.matrix_norm(off) / torch.linalg.matrix_norm(g)
    pr = torch.trace(g) ** 2 / torch.trace(g @ g)
    assert figures["deviation_spectral"] == pytest.approx(float(spectral))
    assert figures["deviation_frobenius"] == pytest.approx(float(frobenius))
    assert figures["participation_fraction"] == pytest.approx(float(pr) / d)
    # traces 5/8.75 = 0.57, 7/8.75 = 0.8, 8/8.75 = 0.914, 8.5/8.75 = 0.971, 8.75/8.75 = 1
    assert figures["rank_90_fraction"] == pytest.approx(3 / 6)
    assert figures["rank_95_fraction"] == pytest.approx(4 / 6)
    assert figures["rank_99_fraction"] == pytest.approx(5 / 6)


def test_identity_is_euclidean():
    figures = geometry_figures(torch.ones(5, dtype=torch.float64))
    assert figures["deviation_spectral"] == 0.0 and figures["deviation_frobenius"] == 0.0
    assert figures["participation_fraction"] == pytest.approx(1.0)


def test_deviation_is_made_of_the_top_share():
    for _ in range(20):
        evals = torch.rand(50, dtype=torch.float64) ** 8
        f = geometry_figures(evals)
        if f["top_share"] >= 2 / 50:
            assert f["deviation_spectral"] == pytest.approx(1 - 1 / (50 * f["top_share"]))
        assert f["deviation_frobenius"] == pytest.approx(math.sqrt(1 - f["participation_fraction"]))
    # every singular metric is at least half-way from Euclidean on the spectral reading
    singular = geometry_figures(torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64))
    assert singular["deviation_spectral"] >= 0.5


def test_control_table_ranges_and_names():
    rows = [
        GeometryRow("real", None, "a", "top_share", 0.2),
        GeometryRow("real", None, "b", "top_share", 0.6),
        GeometryRow("shuffled", 0, "a", "top_share", 0.1),
        GeometryRow("shuffled", 1, "a", "top_share", 0.3),
        GeometryRow("shuffled", 1, "b", "top_share", 0.5),
        *geometry_rows(torch.tensor([2.0, 1.0], dtype=torch.float64), "real", "a"),
    ]
    table = control_table(rows)
    assert list(table["definition"].unique()) == list(DEFINITIONS)
    top = table[table["definition"] == "top_share"].set_index("model")
    assert top.loc["shuffled", ["min", "median", "max"]].tolist() == pytest.approx([0.1, 0.3, 0.5])
    assert top.loc["shuffled", ["seeds", "sites"]].tolist() == [2, 2]
    assert top.loc["real", ["min", "max"]].tolist() == pytest.approx([0.2, 2 / 3])
    assert all(table["formula"].str.len() > 0)
    assert all(table["source"].str.len() > 0)
    assert str(rows_frame(rows)["seed"].dtype) == "Int64"


# ------------------------------------------------------------------ bad input

NOT_INT: Any = 1.5
BAD = [
    Case("kind", lambda m, _: control_model(m, "permuted"), InputError, "valid controls"),
    Case("seed", lambda m, _: random_like(m, seed=-1), InputError, "non-negative integer"),
    Case("seed type", lambda m, _: shuffled(m, seed=NOT_INT), InputError, "non-negative integer"),
    Case("not a model", lambda m, _: shuffled(m.cfg), InputError, "HookedTransformer"),
    Case("not a config", lambda m, _: random_from_config(m), InputError, "HookedTransformerConfig"),
]


@pytest.mark.parametrize("case", BAD, ids=lambda c: c.id)
def test_bad_input(case, model, tmp_path):
    with unchecked():
        raises_and_leaves_untouched(case, model, tmp_path)


def test_bad_figures_input():
    evals = torch.tensor([1.0, 0.5], dtype=torch.float64)
    with pytest.raises(InputError, match="valid"):
        geometry_figures(evals, ["deviation"])
    with pytest.raises(InputError, match="non-empty vector"):
        geometry_figures(torch.zeros(0, dtype=torch.float64))
    with pytest.raises(MetricError, match="zero"):
        geometry_figures(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(InputError, match="no geometry rows"):
        control_table([])
    with pytest.raises(InputError, match="unknown geometry definition"):
        control_table([GeometryRow("real", None, "a", "deviation", 1.0)])
