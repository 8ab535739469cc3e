"""Effective dimension, rank-at-trace and deviation from Euclidean, against direct definitions."""

from __future__ import annotations

import pytest
import torch

from steerlens.diagnostics import diagnostics_table, metric_diagnostics
from steerlens.errors import MetricError
from steerlens.metric import Metric, pullback_sweep


def test_known_spectrum():
    evals = torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    q = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))[0]
    g = q @ torch.diag(evals) @ q.T
    d = metric_diagnostics(Metric(None, "x", gram=g))
    assert d.participation_ratio == pytest.approx(64 / 22)
    assert d.rank_90 == 4 and d.rank_95 == 4 and d.rank_99 == 4
    # ‖G − 2I‖₂ / ‖G‖₂ = max(|4−2|, |1−2|) / 4
    assert d.deviation_from_euclidean == pytest.approx(0.5)
    assert d.trace == pytest.approx(8.0)


def test_rank_one_metric():
    v = torch.tensor([[1.0, 2.0, 0.0]], dtype=torch.float64)
    d = metric_diagnostics(Metric(v, "x"))
    assert d.participation_ratio == pytest.approx(1.0)
    assert d.rank_99 == 1
    assert d.deviation_from_euclidean == pytest.approx(1 - 1 / 3)


def test_zero_metric_raises():
    with pytest.raises(MetricError, match="zero"):
        metric_diagnostics(Metric(torch.zeros(1, 3, dtype=torch.float64), "x"))


def test_table_on_sweep(model, tokens):
    sweep = pullback_sweep(model, tokens, decompose=False)
    table = diagnostics_table(sweep)
    assert len(table) == len(sweep)
    assert (table["participation_fraction"] <= 1 + 1e-12).all()
    assert (
        (table["deviation_from_euclidean"] >= 0) & (table["deviation_from_euclidean"] <= 1)
    ).all()
    assert set(table["kind"]) >= {"resid_pre", "z", "mlp_pre"}
