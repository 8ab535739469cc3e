"""Result objects print as short summaries and render as tables in Jupyter, never as walls of
tensors."""

from __future__ import annotations

import pytest
import torch

import steerlens as sl
from steerlens.concepts import PairMapping, TokenSet


def _objects(model, tokens):
    metric = sl.pullback_metric(model, tokens, "resid_post.0")
    probe = sl.LinearProbe("resid_post.0", torch.ones(16, dtype=torch.float64), 0.5, "p")
    iv = sl.Intervention("x", {"resid_post.0": torch.ones(16, dtype=torch.float64)}, 2.0, {"k": 1})
    audit = sl.audit(model, iv, tokens)
    return {
        "metric": metric,
        "sweep": sl.pullback_sweep(model, tokens),
        "intervention": iv,
        "probe": probe,
        "token set": TokenSet.from_ids(list(range(40)), name="many"),
        "pair mapping": PairMapping.from_ids({i: i + 20 for i in range(20)}, name="pairs"),
        "audit": audit,
    }


def test_reprs_are_short_and_html_is_a_table(gpt2_model, tokens):
    for name, obj in _objects(gpt2_model, tokens).items():
        text = repr(obj)
        assert "tensor(" not in text and len(text) < 400, (name, text)
        html = obj._repr_html_()
        assert "<table" in html and "tensor(" not in html, name


def test_table_contents(gpt2_model, tokens):
    objects = _objects(gpt2_model, tokens)
    assert objects["intervention"].table()["scaled_norm"].item() == 8.0
    traces = objects["sweep"].traces()
    assert list(traces.index) == [0, 1] and "resid_post" in traces.columns
    metric = objects["metric"]
    # the sweep and the one-site metric unembed the prediction position by different paths:
    # the same trace to rounding
    assert traces.loc[0, "resid_post"] == pytest.approx(float(metric.trace()), rel=1e-12)
    assert "participation_ratio" in metric._repr_html_()
