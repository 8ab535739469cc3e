"""The command line on the default model: `steerlens reproduce --quick` end to end (what CI runs
of the reproduction), and clear failures for bad arguments."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from steerlens.cli import main

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", autouse=True)
def _default_model_installed(default_model):
    """Fails clearly (through the shared fixture) if the default model is not installed."""


def test_reproduce_quick_writes_results_and_figures(tmp_path, capsys):
    results, figures = tmp_path / "results", tmp_path / "figures"
    code = main(
        ["reproduce", "--quick", "--json", "--results", str(results), "--figures", str(figures)]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "SmolLM2-135M-Instruct"
    records = pd.read_csv(results / "records.csv")
    needed = {
        "method",
        "layer",
        "context",
        "target_probability",
        "reached",
        "off_target_kl",
        "off_target_kl_merged",
        "rho",
        "kl_ratio",
    }
    assert needed <= set(records.columns)
    assert set(records.method) == {"fishback", "euclidean", "depth0", "caa", "actadd", "probe"}
    assert set(records.layer) == {8, 20}
    fish = records[records.method == "fishback"]
    assert fish.reached.all() and (fish.probability - 0.5).abs().max() < 1e-2
    assert (fish.rho - 1.0).abs().max() < 1e-4  # rho of the Fisher-optimal step (float32 model)
    for name in (
        "spectra",
        "geometry_vs_depth",
        "block_shares",
        "kl_vs_probability",
        "kl_merged_vs_probability",
        "kl_ratio_by_layer",
        "predicted_vs_measured",
    ):
        assert (figures / f"{name}.png").stat().st_size > 10_000
    report = (results / "reproduction.md").read_text()
    assert "paper (GPT-2 small)" in report and "deviation_from_euclidean" in report
    assert report.index("## Read this first") < report.index("pair-merge KL ×")
    assert json.loads((results / "run.json").read_text())["config"]["layers"] == [8, 20]
    assert not list(results.glob(".*partial"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["reproduce", "--layers", "99"], "layer 99 is out of range"),
        (["reproduce", "--targets", "1.5"], "targets must be probabilities"),
        (["reproduce", "--contexts", "0"], "contexts must be >= 1"),
        (["metric", "--site", "blocks.3.hook_nonsense"], "unknown hook"),
    ],
)
def test_bad_arguments_fail_clearly(argv, message, capsys, tmp_path):
    argv = argv + (
        ["--results", str(tmp_path / "r"), "--figures", str(tmp_path / "f")]
        if argv[0] == "reproduce"
        else []
    )
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_unknown_concept_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["reproduce", "--concepts", "future"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
