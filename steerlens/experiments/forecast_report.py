"""The forecast's pages and files (:func:`write_forecast`, the ``steerlens forecast`` command):
``forecast.md`` (the chosen forecast's held-out scores first, then the site ranking and every
candidate), ``held_out.md`` (the part ``results/reproduction.md`` includes), ``scores.csv``,
``chosen.json`` and ``forecast_calibration.png``, from :func:`steerlens.experiments.forecast
.forecast` on a study folder's records.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from steerlens.atomic import atomic_path, atomic_write
from steerlens.experiments.forecast import DEV_LAYERS, Forecast, forecast, site_ranking

__all__ = ["forecast_report", "held_out_tables", "write_forecast"]

_SHOWN = ["predictor", "kind", "variant", "split", "runs", "contexts", "spearman"]
_SHOWN += ["spearman_ci_low", "spearman_ci_high", "pearson_log"]
_SHOWN += ["median_predicted_over_measured", "within_2x"]


def held_out_tables(result: Forecast) -> list[str]:
    """The chosen forecast's scores on every split, one markdown table per measure."""
    held = result.held_out()
    if held.empty:
        return ["No forecast could be chosen: too few development runs.", ""]
    lines: list[str] = []
    for measure, group in held.groupby("measure", sort=False):
        lines += [f"### {measure}", "", group[_SHOWN].to_markdown(index=False, floatfmt=".3g")]
        lines += [""]
    return lines


def forecast_report(result: Forecast, manifest: dict[str, Any], *, partial: bool) -> str:
    """The markdown page: the chosen forecast's held-out scores first, then every candidate."""
    title = "# The cost-ratio forecast" + (
        " (partial: the study is still running)" if partial else ""
    )
    lines = [
        title,
        "",
        f"Study `{manifest.get('model')}`, steerlens {manifest.get('steerlens')}. The split, the "
        "candidates and the selection rule are in `steerlens/experiments/forecast.py` and were "
        f"fixed before any score was seen: development = contexts whose SHA-1 is 0 mod 3, at "
        f"layers {list(DEV_LAYERS)}.",
        "",
        f"Runs by split: {result.runs['split'].value_counts().to_dict()}.",
        "",
        "## The chosen forecast, on every split",
        "",
        "Chosen per measure on the development runs alone (most runs within 2×, then Spearman); "
        "the held-out rows are its test. `rho_own`, `kl_quadratic_ratio` and `edit_norm_ratio` "
        "read the method's own run: they are accounts of the outcome, not forecasts.",
        "",
    ]
    lines += held_out_tables(result)
    lines += ["## The site ranking (`steerlens where`) as a forecast", ""]
    ranking = site_ranking(result.records) if result.records is not None else pd.DataFrame()
    if ranking.empty:
        lines += [
            "Not scored: these records carry no `kl_per_unit` (units run before it was recorded).",
            "",
        ]
    else:
        lines += [
            "FishBack's reached runs: `kl_per_unit`·Δc² against the measured KL, and the mean "
            "Spearman across layers of `kl_per_unit` with the measured KL per (concept, "
            "context, target).",
            "",
            ranking.to_markdown(index=False, floatfmt=".3g"),
            "",
        ]
    lines += ["## Every candidate on every split", ""]
    for measure, group in result.scores.groupby("measure", sort=False):
        ordered = group.sort_values(["split", "kind", "predictor", "variant"])
        lines += [f"### {measure}", "", ordered[_SHOWN].to_markdown(index=False, floatfmt=".3g")]
        lines += [""]
    return "\n".join(lines)


def write_forecast(
    study: str | Path, out: str | Path, second: str | Path | None = None
) -> list[Path]:
    """``forecast.md``, ``scores.csv`` and ``forecast_calibration.png`` under ``out`` from a
    study folder's records (partial ones too) and, optionally, a second model's study folder."""
    from steerlens import plot
    from steerlens.experiments.study_report import study_records

    records, manifest, partial = study_records(study)
    other = None
    if second is not None:
        other, _, second_partial = study_records(second)
        partial = partial or second_partial
    result = forecast(records, other)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [atomic_write(out / "forecast.md", forecast_report(result, manifest, partial=partial))]
    with atomic_path(out / "scores.csv") as tmp:
        result.scores.to_csv(tmp, index=False)
    paths.append(out / "scores.csv")
    fig = plot.forecast_calibration(result.runs, result.chosen)
    with atomic_path(out / "forecast_calibration.png") as tmp:
        fig.savefig(tmp, format="png")
    paths.append(out / "forecast_calibration.png")
    summary = [
        "### The cost-ratio forecast"
        + (" (partial: the study is still running)" if partial else ""),
        "",
        f"On the study's records (`{study}`"
        + (f" and `{second}`" if second is not None else "")
        + "): chosen and fitted on the development split alone, then scored once on the "
        "held-out runs (`steerlens forecast`; every candidate, the trivial predictors and the "
        f"accounts in `{out / 'forecast.md'}`; figure `{out / 'forecast_calibration.png'}`). "
        "`rho_own` reads each method's own run: it is an account of the outcome, not a forecast.",
        "",
        *held_out_tables(result),
    ]
    paths.append(atomic_write(out / "held_out.md", "\n".join(summary)))
    chosen = {m: list(pv) for m, pv in result.chosen.items()}
    paths.append(atomic_write(out / "chosen.json", json.dumps(chosen, indent=2) + "\n"))
    return paths
