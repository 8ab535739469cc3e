"""The paper's claims beside the study's, on every measure (``reproduction.md``'s opening), and
the paired differences behind its generation column."""

import json
import math

import pandas as pd
import pytest

from steerlens import errors
from steerlens.evaluation import difference_table, paired_differences, paired_ratios
from steerlens.experiments.study_claims import claims_table, losses, study_opening


def _records() -> pd.DataFrame:
    """Two layers × three contexts: Euclidean pays 4× FishBack's complement KL everywhere and
    half its pair-merge KL at layer 18; its continuations are half as perplexing and reach the
    target in one sampled continuation of four fewer."""
    rows = []
    for layer in (6, 18):
        for i, ctx in enumerate("abc"):
            base = dict(concept="past", context_index=i, layer=layer, context=ctx, verb="v" + ctx,
                        target_probability=0.5, reached=True, stratum="p_t < 1e-3",
                        reason="reached")  # fmt: skip
            merged = 0.5 if layer == 18 else 2.0
            rows.append(base | dict(method="fishback", off_target_kl=1.0,
                                    off_target_kl_merged=1.0, perplexity_greedy=4.0,
                                    target_first_sampled=0.75))  # fmt: skip
            rows.append(base | dict(method="euclidean", off_target_kl=4.0,
                                    off_target_kl_merged=merged, perplexity_greedy=2.0,
                                    target_first_sampled=0.5))  # fmt: skip
    return pd.DataFrame(rows)


def test_paired_differences_are_over_the_same_runs_with_an_interval_over_contexts():
    records = _records()
    out = paired_differences(records, measures=["target_first_sampled"], by=("method", "layer"))
    assert out["difference"].tolist() == [-0.25, -0.25]
    assert out["below"].tolist() == [1.0, 1.0] and out["above"].tolist() == [0.0, 0.0]
    assert (out["difference_ci_low"] == -0.25).all() and (out["difference_ci_high"] == -0.25).all()
    # an unreached baseline run leaves its pair out
    unreached = records.copy()
    unreached.loc[(unreached.method == "fishback") & (unreached.context == "a"), "reached"] = False
    one = paired_differences(unreached, measures=["target_first_sampled"])
    assert one["runs"].tolist() == [4] and one["contexts"].tolist() == [2]
    table = difference_table(one)
    assert table.iloc[0]["sampled next word is the target (fraction): above / below"] == (
        "0 / 4 of 4"
    )
    with pytest.raises(errors.InputError, match="level"):
        paired_differences(records, level=1.0)
    with pytest.raises(errors.InputError, match="no column"):
        paired_differences(records, by=("nope",))


def test_the_interval_resamples_contexts_with_all_their_runs():
    records = _records()
    # context a: Euclidean's sampled continuations reach the target as often as FishBack's at
    # both layers; b and c: a quarter less often
    records.loc[(records.method == "euclidean") & (records.context == "a"),
                "target_first_sampled"] = 0.75  # fmt: skip
    out = paired_differences(records, measures=["target_first_sampled"], n_boot=4000)
    row = out.iloc[0]
    assert row["difference"] == pytest.approx(-1 / 6) and row["contexts"] == 3
    # a resample of 3 contexts has 0, 1, 2 or 3 copies of a: mean −0.25 · (3 − k) / 3
    assert row["difference_ci_low"] == pytest.approx(-0.25)
    assert row["difference_ci_high"] == pytest.approx(0.0, abs=1e-12)
    assert row["below"] == pytest.approx(4 / 6) and row["above"] == 0.0


def test_a_single_context_has_no_interval():
    records = _records()
    one = records[records.context == "a"]
    out = paired_differences(one, measures=["target_first_sampled"])
    assert math.isnan(out["difference_ci_low"].iloc[0])
    assert difference_table(out).iloc[0]["sampled next word is the target (fraction) 95% CI"] == (
        "n/a (1 context)"
    )


def test_the_claims_table_puts_the_paper_beside_every_measure():
    table = claims_table(_records()).set_index("method / FishBack")
    row = table.loc["euclidean"]
    assert row["paper (GPT-2 small)"] == "1.3–2.5"
    assert row["complement KL"].startswith("4×")
    assert row["pair-merge KL"].startswith("1×") and "per layer 0.5–2×" in row["pair-merge KL"]
    assert row["greedy perplexity"].startswith("0.5×")
    assert row["sampled next word is the target (fraction): − FishBack"].startswith("-0.25")
    ratios = paired_ratios(_records(), measures=["perplexity_greedy"], by=("method",))
    assert ratios["ratio"].iloc[0] == pytest.approx(0.5)


def test_losses_name_every_measure_and_layer_where_fishback_loses():
    lines = losses(_records())
    assert lines == [
        "- **euclidean** beats FishBack on the pair-merge KL at layer(s) 18 (0.5×; pooled over "
        "all layers 1×, its interval pooled over all layers reaches 1 or above).",
        "- **euclidean** beats FishBack on the greedy perplexity at layer(s) 6, 18 (0.5×; pooled "
        "over all layers 0.5×, its interval pooled over all layers lies below 1).",
    ]
    fair = _records().assign(perplexity_greedy=4.0, off_target_kl_merged=1.0)
    assert losses(fair) == []
    unpaired = _records().assign(reached=lambda f: f["method"] != "fishback")
    assert losses(unpaired) == []
    with pytest.raises(errors.InputError, match="no method's reached run pairs"):
        claims_table(unpaired)


def _study_folder(path, records: pd.DataFrame, units: int) -> None:
    from steerlens.experiments.runner import MERGED

    path.mkdir()
    manifest = {"model": "tiny-model", "units": [f"u{i}" for i in range(units)]}
    (path / "manifest.json").write_text(json.dumps(manifest))
    records.to_csv(path / MERGED, index=False)


def test_the_opening_shows_each_study_folder_or_says_none_ran(tmp_path):
    assert "No study has run here yet" in "\n".join(study_opening(tmp_path))
    _study_folder(tmp_path / "study", _records(), units=6)
    text = "\n".join(study_opening(tmp_path))
    assert "### tiny-model (`study/`; 6 units)" in text
    assert "3 test contexts (3 verbs), layers 6, 18, 12 records." in text
    assert "| euclidean " in text and "Where FishBack loses:" in text
    assert "No study has run" not in text
