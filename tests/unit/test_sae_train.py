"""Training an SAE with sae-lens's trainer on a tiny float64 model: the folded rescaling, the
saved float16 form, the quality report and the errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from sae_lens import SAE

from steerlens import errors
from steerlens.concepts.sae import SaeFeature, sae_report
from steerlens.sae_training import (
    REPORT_FILE,
    SaeTrainingConfig,
    harvest_tokens,
    sae_quality,
    save_sae,
    train_sae,
)
from steerlens.sites import Site
from tests.conftest import hook_count

CFG = SaeTrainingConfig(
    site="resid_post.0",
    d_sae=32,
    k=4,
    tokens=2048,
    window=16,
    batch_size=128,
    held_out_tokens=256,
    lr=3e-3,
)


@pytest.fixture(scope="module")
def trained(gpt2_model):
    gen = torch.Generator().manual_seed(0)
    windows = list(torch.randint(0, gpt2_model.cfg.d_vocab, (160, 16), generator=gen))
    sae, report = train_sae(gpt2_model, CFG, windows=windows, progress=False)
    return sae, report, windows


def test_trained_sae_reads_raw_activations(gpt2_model, trained):
    sae, report, windows = trained
    assert isinstance(sae, SAE) and sae.cfg.d_sae == 32 and sae.cfg.d_in == 16
    assert sae.cfg.metadata.hook_name == "blocks.0.hook_resid_post"
    n_held = math.ceil(CFG.held_out_tokens / (CFG.window - 1))
    held = harvest_tokens(gpt2_model, windows[-n_held:], Site.parse(CFG.site), progress=False)
    quality = sae_quality(sae, held)
    assert quality["fvu"] == pytest.approx(report["held_out"]["fvu"], rel=1e-6)
    assert quality["l0"] <= CFG.k
    # better than predicting the mean (FVU 1), on activations rescaled by ~1/scale: the scale
    # was folded into the weights, so raw activations go in
    assert report["held_out"]["fvu"] < 0.9
    assert report["scale"] > 0 and report["train_tokens"] == 2048
    assert hook_count(gpt2_model) == 0


def test_training_improves_on_the_initial_sae(gpt2_model):
    gen = torch.Generator().manual_seed(1)
    windows = list(torch.randint(0, gpt2_model.cfg.d_vocab, (160, 16), generator=gen))
    short = SaeTrainingConfig(**{**CFG.__dict__, "tokens": 128})
    _, few = train_sae(gpt2_model, short, windows=windows, progress=False)
    _, many = train_sae(gpt2_model, CFG, windows=windows, progress=False)
    assert many["held_out"]["fvu"] < few["held_out"]["fvu"]


def test_saved_half_precision_loads_with_sae_lens(tmp_path, trained):
    sae, report, _ = trained
    path = save_sae(sae, tmp_path / "sae", report)
    loaded = SAE.load_from_disk(path, dtype="float32")
    assert json.loads((path / "cfg.json").read_text())["dtype"] == "float16"
    torch.testing.assert_close(loaded.W_dec, sae.W_dec.float(), rtol=2e-3, atol=1e-3)
    assert sae_report(path)["held_out"] == report["held_out"]
    assert (path / REPORT_FILE).is_file() and not list(tmp_path.glob("*.partial"))
    assert sae.W_dec.dtype == torch.float32  # the caller's SAE is not cast
    feature = SaeFeature(loaded, 3, "resid_post.0")
    assert feature.direction.shape == (16,)


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"k": 64}, "exceeds d_sae"),
        ({"window": 1}, "window must be"),
        ({"lr": float("nan")}, "lr must be"),
        ({"tokens": 0}, "tokens must be"),
    ],
)
def test_bad_configs(overrides, error):
    with pytest.raises(errors.InputError, match=error):
        SaeTrainingConfig(**{**CFG.__dict__, **overrides})


def test_too_little_text_and_wrong_windows(gpt2_model):
    windows = list(torch.randint(0, gpt2_model.cfg.d_vocab, (4, 16)))
    with pytest.raises(errors.InputError, match="held out"):
        train_sae(gpt2_model, CFG, windows=windows, progress=False)
    with pytest.raises(errors.InputError, match="cfg.window"):
        train_sae(gpt2_model, CFG, windows=[torch.zeros(5, dtype=torch.long)] * 40, progress=False)
    with pytest.raises(errors.InputError, match="not both"):
        train_sae(gpt2_model, CFG, texts=["a"], windows=windows, progress=False)
