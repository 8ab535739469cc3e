"""A KeyboardInterrupt in the middle of a metric sweep, an audit or a training loop leaves no
hook and no changed weight behind."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

import steerlens as sl
from steerlens.methods.scaling import scaling_intervention
from tests.conftest import assert_untouched, weights_snapshot


def _interrupt_after(module, calls: int):
    """Patch ``module.forward`` to raise KeyboardInterrupt on call number ``calls + 1``."""
    original = module.forward
    count = {"n": 0}

    def forward(*args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    return mock.patch.object(module, "forward", forward)


@pytest.mark.parametrize("calls", [0, 1, 3])
def test_interrupted_sweep(model, tokens, calls):
    before = weights_snapshot(model)
    prompts = [tokens, tokens[:5], tokens[:4], tokens[:6]]
    with _interrupt_after(model.ln_final, calls), pytest.raises(KeyboardInterrupt):
        sl.pullback_sweep(model, prompts)
    assert_untouched(model, before)


def test_interrupted_audit_and_scaling(model, tokens):
    before = weights_snapshot(model)
    v = torch.ones(model.cfg.d_model, dtype=torch.float64)
    with _interrupt_after(model.ln_final, 0), pytest.raises(KeyboardInterrupt):
        sl.audit(model, v, tokens, site="resid_pre.1")
    with _interrupt_after(model.ln_final, 1), pytest.raises(KeyboardInterrupt):
        sl.audit(model, v, tokens, site="resid_pre.1")
    with _interrupt_after(model.ln_final, 5), pytest.raises(KeyboardInterrupt):
        scaling_intervention(model, [tokens], [1], [2], steps=20)
    assert_untouched(model, before)
