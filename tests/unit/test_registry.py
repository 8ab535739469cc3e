"""The method registry: entries, configs, inputs and the typed run of an iterative method."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import steerlens as sl
from steerlens import errors
from steerlens.concepts import TokenSet
from steerlens.methods import (
    REGISTRY,
    CaaConfig,
    FishBackConfig,
    FitInputs,
    Intervention,
    MethodSpec,
    SteeringRun,
    method_config,
    method_spec,
    register_method,
    steer_iteratively,
)
from tests.conftest import unchecked

TARGET = 7
SITE = "resid_post.0"


def concept_for(model) -> TokenSet:
    return TokenSet.from_ids([TARGET], d_vocab=model.cfg.d_vocab)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_entry_has_a_frozen_config_and_valid_inputs(name):
    spec = method_spec(name)
    assert spec.name == name and dataclasses.is_dataclass(spec.config)
    assert spec.config.__dataclass_params__.frozen  # type: ignore[attr-defined]
    assert spec.needs and set(spec.needs) <= set(f.name for f in dataclasses.fields(FitInputs))
    assert spec.implicit_metric and spec.description
    row = sl.list_methods().set_index("name").loc[name]
    assert row["options"] == ", ".join(spec.options) and row["fits_on"] == spec.fits_on


def test_a_registered_method_is_fitted_through_its_entry(gpt2_model):
    @dataclasses.dataclass(frozen=True)
    class ShiftConfig:
        site: str
        size: float = 1.0

    seen = []

    def fit_shift(model, cfg, inputs):
        seen.append((cfg, inputs))
        v = torch.full((model.cfg.d_model,), cfg.size, dtype=torch.float64)
        return Intervention("shift", {cfg.site: v})

    register_method(MethodSpec("shift", ShiftConfig, fit_shift, ("prompt",), "I", "a test"))
    try:
        with pytest.raises(errors.MethodError, match="registered already"):
            register_method(MethodSpec("shift", ShiftConfig, fit_shift, ("prompt",), "I", "x"))
        iv = sl.fit(gpt2_model, "shift", prompt="a b", site=SITE, size=2.0)
        assert iv.method == "shift" and float(iv.vector()[0]) == 2.0
        assert seen[-1][0] == ShiftConfig(SITE, 2.0) and seen[-1][1].prompt == "a b"
        # a config object, with a field overridden by keyword
        sl.fit(gpt2_model, "shift", ShiftConfig(SITE), prompt="a", size=3.0)
        assert seen[-1][0] == ShiftConfig(SITE, 3.0)
        with pytest.raises(errors.InputError, match="takes a ShiftConfig config, got CaaConfig"):
            sl.fit(gpt2_model, "shift", CaaConfig(0), prompt="a")
        with pytest.raises(errors.InputError, match="does not use pairs="):
            sl.fit(gpt2_model, "shift", prompt="a", pairs=("x", "y"), site=SITE)
        with pytest.raises(
            errors.InputError, match=r"no options \['sizes'\]; its options: site, size"
        ):
            sl.fit(gpt2_model, "shift", prompt="a", site=SITE, sizes=1.0)
        with pytest.raises(errors.InputError, match="needs site="):
            sl.fit(gpt2_model, "shift", prompt="a")
        with pytest.raises(errors.InputError, match="needs prompt="):
            sl.fit(gpt2_model, "shift", site=SITE)
    finally:
        del REGISTRY["shift"]
    assert "shift" not in set(sl.list_methods()["name"])


def test_inputs_of_the_wrong_type_are_named(gpt2_model):
    with pytest.raises(errors.InputError, match="probe needs concept= a LinearProbe, got TokenSet"):
        sl.fit(gpt2_model, "probe", concept=concept_for(gpt2_model))
    with pytest.raises(errors.InputError, match="caa needs pairs= a ContrastPairs, got tuple"):
        sl.fit(gpt2_model, "caa", pairs=("a", "b"), layer=0)
    with unchecked(), pytest.raises(errors.InputError, match="CAA reads one layer"):
        sl.fit(  # layer= a list, not CaaConfig's int
            gpt2_model, "caa", pairs=sl.concepts.ContrastPairs("ab", (("a", "b"),)), layer=[0, 1]
        )
    with pytest.raises(errors.InputError, match=r"target_probability must be in \(0, 1\), got 2.0"):
        sl.fit(
            gpt2_model,
            "fishback",
            concept=concept_for(gpt2_model),
            prompt="a",
            site=SITE,
            target_probability=2.0,
        )


def test_method_config_is_the_entrys_config():
    cfg = method_config("fishback", site=SITE, damping=0.1)
    assert cfg == FishBackConfig(SITE, damping=0.1)
    with pytest.raises(errors.MethodError, match="registered methods"):
        method_config("telepathy")


def test_the_old_methods_table_warns_and_is_the_registry():
    import steerlens.methods as methods

    with pytest.warns(DeprecationWarning, match="REGISTRY"):
        old = methods.METHODS
    assert old is REGISTRY


def test_an_iterative_run_is_typed(gpt2_model, tokens):
    model, concept = gpt2_model, concept_for(gpt2_model)
    cfg = FishBackConfig(SITE, 0.99, step=0.3, max_steps=4)
    with sl.metric.local.LocalPath(model, tokens, SITE) as path:
        start = float(concept.value(path.x0, path.logits(path.x0).detach()))
    marks = [start - 1.0, start + 0.45]
    run = steer_iteratively(model, cfg, concept, tokens, checkpoints=marks[:2])
    assert isinstance(run, SteeringRun) and run.site == "blocks.0.hook_resid_post"
    assert run.steps == len(run.trajectory) - 1 == run.path.shape[0] - 1
    assert [s.step for s in run.trajectory] == list(range(run.steps + 1))
    assert run.trajectory[0].delta_norm == 0 and run.trajectory[1].top_k is not None
    assert torch.equal(run.delta, run.intervention.vector())
    assert math.isclose(run.start_value, start, rel_tol=1e-12)
    assert run.final_value == run.trajectory[-1].stop_value
    # passed at the clean point: δ = 0 and a path of one point
    first = run.checkpoint(marks[0])
    assert first is not None and first.step == 0 and float(first.delta.abs().max()) == 0
    assert run.path_to(marks[0]).shape[0] == 1
    second = run.checkpoint(marks[1])
    assert second is not None and 1 <= second.step <= run.steps
    below = run.path_to(marks[1])
    assert below.shape[0] == second.step + 1 and torch.equal(below[-1], second.delta)
    assert run.checkpoint(start + 10.0) is None and torch.equal(run.path_to(None), run.path)
    # the artifact's info is a JSON summary; the path and checkpoints live on the run
    info = run.intervention.info
    assert info["steps"] == run.steps and "path" not in info and "checkpoints" not in info
    with pytest.raises(errors.InputError, match="below the run's target value"):
        steer_iteratively(model, cfg, concept, tokens, checkpoints=[run.target_value])
    with pytest.raises(errors.InputError, match="one row per step"):
        dataclasses.replace(run, path=run.path[:-1])
