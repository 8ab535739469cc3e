"""The cost-ratio forecast: the split rule, the paired ratios, the scores against hand-computed
values, the fit on the development runs alone, and the written page."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from steerlens import errors
from steerlens.experiments.forecast import (
    DEV_LAYERS,
    forecast,
    is_development,
    paired_runs,
    score,
    site_ranking,
)
from steerlens.experiments.forecast_report import write_forecast


def _contexts(n: int) -> list[str]:
    return [f"context number {i} ends" for i in range(n)]


def _records(n_contexts: int = 12, slope: float = 1.0, held_out_slope: float | None = None):
    """Euclidean and CAA against FishBack: the measured complement ratio is 3·ρ^slope (on the
    held-out runs ρ^held_out_slope, if given), the merged one ρ alone."""
    rng = np.random.default_rng(0)
    rows = []
    for ci, ctx in enumerate(_contexts(n_contexts)):
        for layer in (6, 12, 18, 24):
            base = dict(concept="past", layer=layer, context=ctx, target_probability=0.5)
            rows.append(
                base
                | dict(
                    method="fishback",
                    reached=True,
                    off_target_kl=1e-3,
                    off_target_kl_merged=1e-3,
                    kl_full=1e-3,
                    rho=1.0,
                    rho_path=1.0,
                    path_length=0.1,
                    edit_norm=1.0,
                    grad_norm=3.0,
                    kantorovich=math.nan,
                )
            )
            for mi, method in enumerate(("euclidean", "caa")):
                rho = float(np.exp(rng.uniform(0.1, 3.0)))
                dev = is_development(ctx) and layer in DEV_LAYERS
                k = slope if dev or held_out_slope is None else held_out_slope
                rows.append(
                    base
                    | dict(
                        method=method,
                        reached=not (ci == 0 and mi == 1),  # one unreached run is dropped
                        off_target_kl=1e-3 * 3 * rho**k,
                        off_target_kl_merged=1e-3 * rho,
                        kl_full=1e-3 * rho,
                        rho=rho,
                        rho_path=rho * 1.5,
                        path_length=0.1 * math.sqrt(rho),
                        edit_norm=2.0,
                        grad_norm=3.0 + layer,
                        kantorovich=50.0,
                    )
                )
    return pd.DataFrame(rows)


def test_the_split_rule_is_fixed_by_the_text_alone():
    names = _contexts(300)
    picked = [is_development(c) for c in names]
    assert picked == [is_development(c) for c in names]
    assert 0.25 < sum(picked) / len(picked) < 0.42
    assert is_development("a") != is_development("b") or is_development("c") != is_development("a")


def test_paired_runs_take_reached_pairs_with_every_ratio():
    runs = paired_runs(_records())
    assert set(runs["method"]) == {"euclidean", "caa"}
    assert len(runs) == 12 * 4 * 2 - 4  # context 0's CAA runs never reached
    row = runs.iloc[0]
    assert row["ratio_off_target_kl_merged"] == pytest.approx(row["rho"])
    assert row["rho_own"] == pytest.approx(row["rho"])
    assert row["edit_norm_ratio"] == pytest.approx(4.0)
    dev = runs[runs["split"] == "dev"]
    assert all(dev["context"].map(is_development)) and set(dev["layer"]) <= set(DEV_LAYERS)
    assert set(runs["split"]) == {"dev", "new contexts", "new layers", "new both"}
    with pytest.raises(errors.InputError, match="no column"):
        paired_runs(_records().drop(columns=["reached"]))


def test_scores_match_hand_computed_values():
    s = score([1.0, 2.0, 4.0, 8.0], [1.0, 1.0, 8.0, 2.0], ["a", "a", "b", "c"])
    # over = [1, 2, 0.5, 4]: three within 2x, median 1.5; ranks (1,2,3,4) vs (1.5,1.5,4,3)
    assert s["within_2x"] == pytest.approx(0.75)
    assert s["median_predicted_over_measured"] == pytest.approx(1.5)
    want = np.corrcoef([1, 2, 3, 4], [1.5, 1.5, 4, 3])[0, 1]
    assert s["spearman"] == pytest.approx(want)
    assert s["pearson_log"] == pytest.approx(
        np.corrcoef(np.log([1, 2, 4, 8]), np.log([1, 1, 8, 2]))[0, 1]
    )
    assert s["runs"] == 4 and s["contexts"] == 3
    assert s["spearman_ci_low"] <= s["spearman"] <= s["spearman_ci_high"]
    two = score([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], ["a", "a", "b"])
    assert math.isnan(two["spearman_ci_low"]), "no interval over fewer than 3 contexts"
    with pytest.raises(errors.InputError, match="must be > 0"):
        score([1.0, -1.0], [1.0, 1.0], ["a", "b"])
    with pytest.raises(errors.InputError, match="one context per run"):
        score([1.0], [1.0], ["a", "b"])


def test_the_forecast_is_fitted_on_the_development_runs_alone():
    result = forecast(_records(n_contexts=30, held_out_slope=0.5))
    rho = result.scores[
        (result.scores["predictor"] == "rho")
        & (result.scores["variant"] == "fitted")
        & (result.scores["measure"] == "off_target_kl")
    ]
    a, b = rho["a"].iloc[0], rho["b"].iloc[0]
    assert a == pytest.approx(1.0, abs=1e-9) and b == pytest.approx(math.log(3.0), abs=1e-9)
    by = rho.set_index("split")
    assert by.loc["dev", "within_2x"] == 1.0
    assert by.loc["new both", "within_2x"] < 1.0, (
        "the held-out law differs; the fit must not see it"
    )
    assert result.chosen["off_target_kl"] == ("rho", "fitted")
    assert result.chosen["off_target_kl_merged"][0] == "rho"
    assert "rho_own" not in {p for p, _ in result.chosen.values()}, "an account is never chosen"
    held = result.held_out()
    assert set(held["split"]) == {"dev", "new contexts", "new layers", "new both"}


def test_a_second_model_is_its_own_split(tmp_path):
    result = forecast(_records(), _records(n_contexts=3))
    assert "second model" in set(result.runs["split"])
    assert "second model" in set(result.scores["split"])


def test_the_page_and_figure_are_written_from_a_study_folder(tmp_path):
    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"model": "tiny", "steerlens": "0"}))
    _records(n_contexts=15).to_csv(folder / "records.csv", index=False)
    paths = write_forecast(folder, tmp_path / "out")
    page = (tmp_path / "out" / "forecast.md").read_text()
    assert "(partial" not in page
    assert page.index("## The chosen forecast") < page.index("## Every candidate")
    assert "accounts of the outcome, not forecasts" in page
    assert (tmp_path / "out" / "forecast_calibration.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "out" / "chosen.json").read_text())["off_target_kl"][0] == "rho"
    assert len(paths) == 5
    held = (tmp_path / "out" / "held_out.md").read_text()
    assert "not a forecast" in held and "| rho " in held and "new contexts" in held
    with pytest.raises(errors.InputError, match="not a study folder"):
        write_forecast(tmp_path / "nowhere", tmp_path / "out")


def test_the_bootstrap_spearman_is_scipys_on_the_resampled_runs():
    from scipy.stats import spearmanr

    from steerlens.experiments.forecast import _weighted_spearman

    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 5, 20).astype(float), rng.normal(size=20)  # x has ties
    y[3] = y[4]
    weights = rng.integers(0, 3, (50, 20)).astype(float)
    got = _weighted_spearman(x, y, weights)
    want = [spearmanr(np.repeat(x, w.astype(int)), np.repeat(y, w.astype(int)))[0] for w in weights]
    assert np.allclose(got, want, atol=1e-12, equal_nan=True)


def test_the_site_ranking_is_scored_on_fishbacks_runs():
    rows = []
    for ctx in _contexts(6):
        for layer in (6, 12, 18, 24):
            kpu = 1e-3 * (1 + layer)
            rows.append(
                dict(
                    concept="past",
                    layer=layer,
                    context=ctx,
                    target_probability=0.5,
                    clean_probability=0.1,
                    method="fishback",
                    reached=True,
                    kl_per_unit=kpu,
                    off_target_kl=kpu * math.log(5.0) ** 2,  # exactly kl_per_unit·Δc²
                    kl_full=1.0 / (1 + layer),  # ranks the layers the other way
                )
            )
    table = site_ranking(pd.DataFrame(rows)).set_index(["measure", "split"])
    exact = table.loc[("off_target_kl", "all")]
    assert exact["within_2x"] == 1.0
    assert exact["median_predicted_over_measured"] == pytest.approx(1.0)
    assert exact["layer_spearman"] == pytest.approx(1.0) and exact["layer_groups"] == 6
    assert table.loc[("kl_full", "all"), "layer_spearman"] == pytest.approx(-1.0)
    assert site_ranking(pd.DataFrame(rows).drop(columns=["kl_per_unit"])).empty
