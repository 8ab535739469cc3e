"""Paired ratios to FishBack on both off-target measures, and the reproduction's report rebuilt
from saved results."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from steerlens import errors, plot
from steerlens.cli import main
from steerlens.evaluation import paired_ratios, ratio_table
from steerlens.experiments.reproduce import rebuild_report


def _records() -> pd.DataFrame:
    """Two contexts × two concepts at two layers. At layer 6 Euclidean pays 4× FishBack's
    complement KL in context a and 1× in b, 2× the pair-merge KL in both; at layer 18 it pays
    half of FishBack's pair-merge KL. One Euclidean run is unreached (its KL must not count)."""
    rows = []
    for layer, merged_ratio in ((6, 2.0), (18, 0.5)):
        for context, comp_ratio in (("a", 4.0), ("b", 1.0)):
            for concept in ("past", "ing"):
                common = dict(
                    concept=concept,
                    layer=layer,
                    context=context,
                    target_probability=0.5,
                    rho=1.0,
                    path_length=0.5,
                    probability=0.5,
                )
                rows.append(
                    dict(common, method="fishback", reached=True, off_target_kl=0.1,
                         off_target_kl_merged=0.2)
                )  # fmt: skip
                rows.append(
                    dict(common, method="euclidean", reached=True, off_target_kl=0.1 * comp_ratio,
                         off_target_kl_merged=0.2 * merged_ratio, rho=3.0, path_length=1.0)
                )  # fmt: skip
    rows.append(
        dict(rows[-1], concept="third", reached=False, off_target_kl=1e6, off_target_kl_merged=1e6)
    )
    rows.append(dict(rows[-1], method="fishback", reached=True, off_target_kl=0.1))
    return pd.DataFrame(rows)


def test_paired_ratios_by_hand():
    out = paired_ratios(_records()).set_index(["layer", "measure"])
    comp = out.loc[(6, "off_target_kl")]
    # per-run ratios 4, 4, 1, 1: geometric mean 2; FishBack lower in the 2 runs of context a
    assert comp["ratio"] == pytest.approx(2.0) and comp["median_ratio"] == pytest.approx(2.0)
    assert comp["runs"] == 4 and comp["contexts"] == 2
    assert comp["baseline_ahead"] == pytest.approx(0.5)
    # contexts resampled whole: bootstrap means of the logs are 0, log 2 or log 4
    assert comp["ratio_ci_low"] == pytest.approx(1.0) and comp["ratio_ci_high"] == pytest.approx(
        4.0
    )
    merged = out.loc[(18, "off_target_kl_merged")]
    assert merged["ratio"] == pytest.approx(0.5) and merged["baseline_ahead"] == 0.0
    # the unreached run (KL 1e6) is left out, not averaged in
    assert out.loc[(18, "off_target_kl"), "runs"] == 4


def test_paired_ratios_one_context_has_no_interval():
    one = _records().query("context == 'a'")
    row = paired_ratios(one, measures=["off_target_kl"], by=["method"]).iloc[0]
    assert row["contexts"] == 1 and math.isnan(row["ratio_ci_low"])
    assert row["ratio"] == pytest.approx(4.0) and row["runs"] == 4
    table = ratio_table(paired_ratios(one, by=["method"]), by=["method"])
    assert table.loc[0, "complement KL 95% CI"] == "n/a (1 context)"
    assert table.loc[0, "complement KL: fishback lower"] == "4 of 4"
    assert table.loc[0, "pair-merge KL: fishback lower"] == "2 of 4"


def test_paired_ratios_refuses_what_it_cannot_compute():
    with pytest.raises(errors.InputError, match="no column"):
        paired_ratios(_records(), measures=["kl_full"])
    with pytest.raises(errors.InputError, match="level"):
        paired_ratios(_records(), level=1.5)


def test_ratio_figure_draws_both_measures():
    fig = plot.ratio_by_layer(paired_ratios(_records()))
    titles = [ax.get_title() for ax in fig.axes]
    assert any("complement" in t for t in titles) and any("pair-merge" in t for t in titles)
    (bars,) = fig.axes[1].containers  # one method: its points and interval bars
    assert np.asarray(bars.lines[0].get_ydata()).tolist() == pytest.approx([2.0, 0.5])


def test_ratio_figure_lays_its_panels_out_three_to_a_row():
    records = _records().assign(perplexity_greedy=lambda f: f["off_target_kl"] + 1.0)
    measures = ["off_target_kl", "off_target_kl_merged", "perplexity_greedy"]
    ratios = paired_ratios(records, measures=measures)
    fig = plot.ratio_by_layer(ratios)
    assert [ax.get_title() for ax in fig.axes][-1] == "greedy continuation's perplexity"
    assert len(fig.axes) == 3 and fig.texts[0].get_text().startswith("Each measure over")
    four = pd.concat([ratios, ratios[ratios.measure == "off_target_kl"].assign(measure="x")])
    fig = plot.ratio_by_layer(four)
    visible = [ax.get_visible() for ax in fig.axes]
    assert len(visible) == 6 and visible.count(False) == 2
    assert fig.axes[3].get_ylabel().startswith("method / fishback")


def _saved(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    _records().to_csv(results / "records.csv", index=False)
    geometry = pd.DataFrame(
        dict(
            layer=[6, 18],
            deviation_from_euclidean=[0.99, 0.98],
            participation_fraction=[0.01, 0.02],
        )
    )
    geometry.to_csv(results / "geometry.csv", index=False)
    (results / "run.json").write_text(json.dumps({"config": {"contexts": 2}, "seconds": 12.0}))
    return results


def test_report_rebuilt_from_saved_results(tmp_path):
    results, figures = _saved(tmp_path), tmp_path / "figures"
    paths = rebuild_report(results, figures)
    report = (results / "reproduction.md").read_text()
    first = report.index("## Read this first")
    assert first < report.index("## Off-target KL over FishBack's") < report.index("Paper claims")
    assert "**2 distinct test context(s)**" in report
    assert "euclidean at layer 18 on the pair-merge KL (0.5×)" in report
    assert "pair-merge KL 1× (FishBack lower in 4 of 8 runs)" in report
    assert "ActAdd is mis-set" in report
    for name in ("kl_ratio_by_layer", "kl_vs_probability", "kl_merged_vs_probability"):
        assert (figures / f"{name}.png").stat().st_size > 10_000
    assert results / "summary.csv" in paths
    assert "off_target_kl_merged" in pd.read_csv(results / "summary.csv")
    assert not list(results.glob(".*partial"))


def test_report_command(tmp_path, capsys):
    results = _saved(tmp_path)
    assert main(["report", "--results", str(results), "--figures", str(tmp_path / "f")]) == 0
    assert "reproduction.md" in capsys.readouterr().out
    (results / "run.json").unlink()
    assert main(["report", "--results", str(results), "--figures", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and "run.json" in err and "steerlens reproduce" in err


def test_the_geometry_controls_are_kept_when_the_report_is_rebuilt(tmp_path):
    results = _saved(tmp_path)
    rebuild_report(results, tmp_path / "figures")
    assert (
        "Controls for the geometry rows: not run here" in (results / "reproduction.md").read_text()
    )
    (results / "geometry_controls.md").write_text("### Controls for the geometry rows\n\n| a |\n")
    rebuild_report(results, tmp_path / "figures")
    report = (results / "reproduction.md").read_text()
    assert report.index("Paper claims") < report.index("| a |") < report.index("Off-target KL at")
    assert "not run here" not in report.split("Predicting the measured")[0]
    assert "The cost-ratio forecast: not run here" in report
    (results / "forecast").mkdir()
    (results / "forecast" / "held_out.md").write_text("### The cost-ratio forecast\n\n| f |\n")
    rebuild_report(results, tmp_path / "figures")
    report = (results / "reproduction.md").read_text()
    assert report.index("Predicting the measured") < report.index("| f |")


def test_a_run_json_without_its_time_is_refused(tmp_path):
    results = _saved(tmp_path)
    (results / "run.json").write_text(json.dumps({"config": {"contexts": 2}}))
    with pytest.raises(errors.InputError, match="run.json must hold a config and seconds"):
        rebuild_report(results, tmp_path / "figures")
    assert not (results / "reproduction.md").exists()


def test_public_api_and_the_moved_tiny_model():
    import steerlens as sl
    from steerlens.testing import tiny_model

    for name in ("spectral_cost_ratio", "kantorovich_bound", "bias_edit", "MetricOptions"):
        assert name in sl.__all__ and getattr(sl, name) is not None
    assert "tiny_model" not in sl.__all__
    with pytest.warns(DeprecationWarning, match="steerlens.testing.tiny_model"):
        assert sl.tiny_model is tiny_model
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        _ = sl.nonsense
