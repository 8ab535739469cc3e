"""The opening of ``reproduction.md``: the FishBack paper's claims beside the study's results, on
every measure the study records, and where FishBack loses, for each model's study folder.

Per method: its cost over FishBack's on paired runs (same concept, layer, context and target,
both reached), pooled over layers with the paired bootstrap interval over contexts and the range
of the per-layer geometric means, on each KL and on the clean model's perplexity of the steered
continuations; and the difference from FishBack in how often the steered continuation's next word
is the target. The paper states a ratio only for Euclidean ascent and CAA; the other rows have
none to stand beside.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from steerlens.errors import InputError
from steerlens.evaluation import (
    DIFFERENCE_MEASURES,
    KL_MEASURES,
    RATIO_MEASURES,
    paired_differences,
    paired_ratios,
)

#: the paper's stated cost ratio to FishBack (GPT-2 small; no measure is named beside it)
PAPER_RATIOS = {"euclidean": "1.3–2.5", "caa": "≈ 1.5"}

#: the study folders under a results directory, in the order the report shows them
STUDY_FOLDERS = ("study", "study_gemma")

#: the measures the claims table shows: ratios first, then the one difference
_RATIOS = [*KL_MEASURES, *RATIO_MEASURES]
_DIFFERENCE = "target_first_sampled"


def _rows(frame: Any) -> list[dict[str, Any]]:
    return frame.to_dict("records")


def _ratio_cell(pooled: dict[str, Any] | None, layers: list[float]) -> str:
    if pooled is None:
        return "—"
    ci = (
        f" [{pooled['ratio_ci_low']:.3g}, {pooled['ratio_ci_high']:.3g}]"
        if math.isfinite(pooled["ratio_ci_low"])
        else " (1 context)"
    )
    low, high = (f"{v:.2g}" for v in (min(layers, default=0), max(layers, default=0)))
    spread = f"; per layer {low}–{high}×" if len(layers) > 1 and low != high else ""
    return f"{pooled['ratio']:.3g}×{ci}{spread}"


def _difference_cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "—"
    ci = (
        f" [{row['difference_ci_low']:+.2f}, {row['difference_ci_high']:+.2f}]"
        if math.isfinite(row["difference_ci_low"])
        else " (1 context)"
    )
    return f"{row['difference']:+.2f}{ci}"


def claims_table(records: pd.DataFrame, baseline: str = "fishback") -> pd.DataFrame:
    """One row per method: the paper's ratio (where it states one) and, per measure, the pooled
    ratio to ``baseline`` with its interval and the range over layers; the last column is the
    pooled difference in the fraction of sampled continuations whose next word is the
    target."""
    frame: Any = records
    ratio_measures = [m for m in _RATIOS if m in frame]
    if not ratio_measures:
        raise InputError(f"the records have none of the measures {_RATIOS}")
    pooled = paired_ratios(records, baseline, measures=ratio_measures, by=("method",))
    if pooled.empty:
        raise InputError(f"no method's reached run pairs with a reached {baseline} run")
    by_layer = paired_ratios(records, baseline, measures=ratio_measures, by=("method", "layer"))
    diffs = (
        paired_differences(records, baseline, measures=[_DIFFERENCE])
        if _DIFFERENCE in frame
        else pd.DataFrame(columns=["method"])
    )
    names = KL_MEASURES | RATIO_MEASURES
    order = [*PAPER_RATIOS, *sorted(set(pooled["method"]) - set(PAPER_RATIOS))]
    rows = []
    for method in [m for m in order if m in set(pooled["method"])]:
        row: dict[str, str] = {
            "method / FishBack": method,
            "paper (GPT-2 small)": PAPER_RATIOS.get(method, "—"),
        }
        for measure in ratio_measures:
            sel = pooled[(pooled["method"] == method) & (pooled["measure"] == measure)]
            layers = by_layer[(by_layer["method"] == method) & (by_layer["measure"] == measure)]
            row[names[measure]] = _ratio_cell(
                _rows(sel)[0] if len(sel) else None, layers["ratio"].tolist()
            )
        diff = diffs[diffs["method"] == method]
        if _DIFFERENCE in frame:
            row[f"{DIFFERENCE_MEASURES[_DIFFERENCE]}: − FishBack"] = _difference_cell(
                _rows(diff)[0] if len(diff) else None
            )
        rows.append(row)
    return pd.DataFrame(rows)


def losses(records: pd.DataFrame, baseline: str = "fishback") -> list[str]:
    """One line per (method, measure) where the method beats ``baseline`` at some layer (its
    per-layer geometric mean ratio below 1: less KL, or a lower perplexity): the layers, the
    ratios, and the ratio pooled over all layers with whether its interval lies wholly below
    1; ``[]`` where FishBack pays less everywhere, or where no run pairs with FishBack's."""
    frame: Any = records
    measures = [m for m in _RATIOS if m in frame]
    by_layer = paired_ratios(records, baseline, measures=measures, by=("method", "layer"))
    pooled = paired_ratios(records, baseline, measures=measures, by=("method",))
    names = KL_MEASURES | RATIO_MEASURES
    lines: list[str] = []
    lost: Any = by_layer[by_layer["ratio"] < 1]
    lost = lost.assign(_order=lost["measure"].map(measures.index)).sort_values(
        ["method", "_order", "layer"]
    )
    for (method, measure), group in lost.groupby(["method", "measure"], sort=False):
        whole = _rows(pooled[(pooled["method"] == method) & (pooled["measure"] == measure)])[0]
        layers = ", ".join(str(v) for v in group["layer"])
        low, high = group["ratio"].min(), group["ratio"].max()
        spread = f"{low:.2g}×" if f"{low:.2g}" == f"{high:.2g}" else f"{low:.2g}–{high:.2g}×"
        clear = (
            "its interval pooled over all layers lies below 1"
            if whole["ratio_ci_high"] < 1
            else "no interval over contexts"
            if not math.isfinite(whole["ratio_ci_high"])
            else "its interval pooled over all layers reaches 1 or above"
        )
        lines.append(
            f"- **{method}** beats FishBack on the {names[measure]} at layer(s) "
            f"{layers} ({spread}; pooled over all layers {whole['ratio']:.3g}×, "
            f"{clear})."
        )
    return lines


def study_opening(results_dir: Path) -> list[str]:
    """The markdown lines that open ``reproduction.md``: per study folder under
    ``results_dir`` (:data:`STUDY_FOLDERS`) that has records, its model, its size, the claims
    table and where FishBack loses; a line saying so where no study has run."""
    from steerlens.experiments.study_report import _wide_lines, study_records
    from steerlens.experiments.wide import wide_records

    lines = [
        "## The study: the paper's claims beside ours, on every measure",
        "",
        "From `steerlens study` (many held-out contexts, every measure, the fair baselines; "
        "protocol and tables in each folder's `study.md`). Each cell: the method's cost over "
        "FishBack's on paired runs (same concept, layer, context and target, both reached), "
        "pooled over layers, with its bootstrap 95% interval over independent contexts and the "
        "range of the per-layer geometric means; above 1 FishBack pays less. The complement KL "
        "is the divergence FishBack descends; the others it does not. The last column: the "
        "method's fraction of sampled continuations whose next word is the target, minus "
        "FishBack's. The paper names no measure beside its ratios.",
        "",
    ]
    found = False
    for name in STUDY_FOLDERS:
        folder = results_dir / name
        if not (folder / "manifest.json").is_file():
            continue
        try:
            records, manifest, partial = study_records(folder)
        except InputError:
            continue
        found = True
        frame: Any = records
        try:
            table = claims_table(records).to_markdown(index=False)
        except InputError as err:
            table = f"No claims table yet: {err}."
        units = frame[["concept", "context_index", "layer"]].drop_duplicates().shape[0]
        planned = len(manifest.get("units", [])) or units
        contexts = frame.drop_duplicates(["concept", "context"])
        status = f"**partial: {units} of {planned} units**" if partial else f"{units} units"
        lines += [
            f"### {manifest.get('model')} (`{folder.name}/`; {status})",
            "",
            f"{len(contexts)} test contexts ({contexts['verb'].nunique()} verbs), layers "
            f"{', '.join(str(v) for v in sorted(set(frame['layer'])))}, {len(frame)} records.",
            "",
            *_wide_lines(frame, wide[1] if (wide := wide_records(folder)) else None),
            table,
            "",
            "Where FishBack loses:",
            "",
            *(losses(records) or ["- Nowhere it is measured (see the table)."]),
            "",
        ]
    if not found:
        lines += ["No study has run here yet (`steerlens study`).", ""]
    return lines
