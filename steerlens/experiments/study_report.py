"""The study's report: ``study.md`` and its figure from the merged records of a run folder.

It opens with where FishBack loses: every (method, measure) where a method beats it at some
layer, on every divergence recorded and on the perplexity of the steered continuations
(:func:`~steerlens.experiments.study_claims.losses`). The first table is each method's cost
over FishBack's on every divergence recorded (complement, pair merge, whole distribution), by
layer, with paired bootstrap intervals over contexts and in how many runs FishBack paid less;
losses stand in it beside wins. Then the same pooled and by stratum of the clean target
probability, the generation measures (paired with FishBack's as well as per method), and which
runs reached the target (with the reason for every one that did not).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from steerlens.atomic import atomic_path, atomic_write
from steerlens.errors import InputError
from steerlens.evaluation import (
    KL_MEASURES,
    RATIO_MEASURES,
    difference_table,
    paired_differences,
    paired_ratios,
    ratio_table,
)
from steerlens.experiments.runner import MANIFEST, MERGED
from steerlens.experiments.study import generation_table, reached_table
from steerlens.experiments.study_claims import losses


def _rows(frame: Any) -> list[dict[str, Any]]:
    return frame.to_dict("records")


def _table(frame: pd.DataFrame) -> list[str]:
    if frame.empty:
        return ["(not run: the records have no FishBack variant beside Euclidean ascent)"]
    return [frame.to_markdown(index=False, floatfmt=".3g")]


#: the geometry each FishBack variant descends
DESCENDS = {
    "fishback": "off_target_kl",
    "fishback_merge": "off_target_kl_merged",
    "fishback_plain": "kl_full",
}


def optimize_evaluate(records: pd.DataFrame, against: str = "euclidean") -> pd.DataFrame:
    """The optimize × evaluate grid: per FishBack variant (the geometry it descends) and
    measure, ``against``'s KL over the variant's on paired runs, pooled over layers, and in how
    many runs the variant paid less; ``home`` marks the divergence the variant descends."""
    frame: Any = records
    rows = []
    for variant, home in DESCENDS.items():
        pair = frame[frame["method"].isin([variant, against])]
        if variant not in set(pair["method"]) or against not in set(pair["method"]):
            continue
        ratios = paired_ratios(pair, variant, by=("method",))
        for r in _rows(ratios):
            rows.append(
                {
                    "variant": variant,
                    "measure": KL_MEASURES.get(r["measure"], r["measure"]),
                    "home": "yes" if r["measure"] == home else "",
                    f"{against} / variant": r["ratio"],
                    "95% CI": (
                        f"[{r['ratio_ci_low']:.3g}, {r['ratio_ci_high']:.3g}]"
                        if r["contexts"] >= 2
                        else "n/a (1 context)"
                    ),
                    "variant lower": f"{round(r['baseline_ahead'] * r['runs'])} of {r['runs']}",
                }
            )
    return pd.DataFrame(rows)


def study_report(
    records: pd.DataFrame,
    manifest: dict[str, Any],
    *,
    partial: bool,
    wide_units: int | None = None,
) -> str:
    """The markdown report of the module docstring. ``wide_units``: how many units the
    wide-grid stage (:mod:`steerlens.experiments.wide`) has checked (None: not run)."""
    frame: Any = records
    by_layer = paired_ratios(records, by=("method", "layer"))
    pooled = paired_ratios(records, by=("method",))
    strata = paired_ratios(records, by=("method", "stratum"))
    contexts = frame.drop_duplicates(["concept", "context"])
    title = "# The study" + (" (partial: not every unit has finished)" if partial else "")
    lines = [
        title,
        "",
        f"Model `{manifest.get('model')}`, steerlens {manifest.get('steerlens')}; config "
        f"`{json.dumps(manifest.get('study'))}`.",
        "",
        f"{len(contexts)} test contexts ({contexts['context'].nunique()} distinct texts, "
        f"{contexts['verb'].nunique()} verbs) under {frame['concept'].nunique()} concepts, "
        f"{len(frame)} records.",
        "",
        *_wide_lines(frame, wide_units),
        "## Where FishBack wins and where it loses",
        "",
        *(losses(records) or ["- Nowhere: FishBack pays less on every measure and layer."]),
        "",
        "## Optimize × evaluate: each FishBack variant against Euclidean ascent, on every measure",
        "",
        "A variant's win on its home measure (the divergence it descends) is expected; the "
        "others are the test.",
        "",
        *_table(optimize_evaluate(records)),
        "",
        "## Each method's KL over FishBack's, by layer (paired runs; 95% CI over contexts)",
        "",
        ratio_table(by_layer).to_markdown(index=False, floatfmt=".3g"),
        "",
        "## Pooled over layers",
        "",
        ratio_table(pooled, by=("method",)).to_markdown(index=False, floatfmt=".3g"),
        "",
        "## By the clean target probability",
        "",
        ratio_table(strata, by=("method", "stratum")).to_markdown(index=False, floatfmt=".3g"),
        "",
        "## Generation (reached runs)",
        "",
        *_paired_generation(records),
    ]
    generation = generation_table(records)
    lines += [
        generation.to_markdown(index=False, floatfmt=".3g")
        if len(generation)
        else "No generation measures were recorded (`generation_tokens` was 0).",
        "",
        "## Reached, and why not",
        "",
        reached_table(records).to_markdown(index=False),
        "",
    ]
    return "\n".join(lines)


def _paired_generation(records: pd.DataFrame) -> list[str]:
    """Each method beside FishBack on the same runs, pooled over layers: the clean model's
    perplexity of the steered continuations as a ratio, and how often their next word is the
    target, and the pair mass, as differences (paired bootstrap intervals over contexts)."""
    frame: Any = records
    ratio_measures = [m for m in RATIO_MEASURES if m in frame]
    if not ratio_measures:
        return []
    ratios = paired_ratios(records, measures=ratio_measures, by=("method",))
    differences = paired_differences(records)
    return [
        "Each method beside FishBack on the same runs (pooled over layers; 95% CI over "
        "contexts): the clean model's perplexity of the steered continuations over FishBack's "
        "(below 1: more fluent than FishBack's), then the fraction of continuations whose next "
        "word is the target, and the pair mass p_b + p_t at the prediction position, minus "
        "FishBack's.",
        "",
        ratio_table(ratios, by=("method",)).to_markdown(index=False, floatfmt=".3g"),
        "",
        difference_table(differences).to_markdown(index=False, floatfmt=".3g"),
        "",
        "Per method (reached runs), unpaired:",
        "",
    ]


def _wide_lines(frame: Any, wide_units: int | None) -> list[str]:
    if wide_units is None:
        return []
    redone = frame[frame["stage"] == "wide grid"]
    reached = int(redone["reached"].astype(bool).sum())
    return [
        f"Wide-grid stage (`steerlens study --wide`): {wide_units} of "
        f"{frame[['concept', 'context_index', 'layer']].drop_duplicates().shape[0]} units "
        f"checked; {len(redone)} fixed-direction records that stopped at the grid's end were "
        f"searched again on the extended grid, {reached} of them now reached.",
        "",
    ]


def _main_records(folder: Path) -> tuple[pd.DataFrame, dict[str, Any], bool]:
    from steerlens.experiments.runner import read_all_done

    if not (folder / MANIFEST).is_file():
        raise InputError(f"{folder} is not a study folder: no {MANIFEST}")
    manifest = json.loads((folder / MANIFEST).read_text())
    partial = not (folder / MERGED).is_file()
    if not partial:
        return pd.read_csv(folder / MERGED), manifest, False
    units = manifest.get("units", [])
    done = read_all_done(folder, units)
    rows = [r for key in units if key in done for r in done[key]]
    if not rows:
        raise InputError(f"{folder} has no finished unit yet")
    return pd.DataFrame(rows), manifest, True


def study_records(folder: str | Path) -> tuple[pd.DataFrame, dict[str, Any], bool]:
    """A run folder's records, its manifest, and whether the run is partial: the merged
    ``records.csv`` once the run has finished, else the finished units of every rank file in
    unit order, read without touching them (a running rank may be appending). Where the
    wide-grid stage has run, its records replace the ones it redid
    (:func:`~steerlens.experiments.wide.apply_wide`)."""
    from steerlens.experiments.wide import apply_wide, wide_records

    folder = Path(folder)
    records, manifest, partial = _main_records(folder)
    wide = wide_records(folder)
    if wide is not None:
        records = apply_wide(records, wide[0])
    return records, manifest, partial


def write_study_report(folder: str | Path, figures: str | Path | None = None) -> list[Path]:
    """``study.md`` (and ``kl_ratio_by_layer.png`` under ``figures``, default the folder)
    from a run folder's merged ``records.csv``, or, while units are still running, from the
    finished units of every rank file, in unit order, without touching them (the report then
    says it is partial)."""
    from steerlens import plot
    from steerlens.experiments.wide import wide_records

    folder = Path(folder)
    records, manifest, partial = study_records(folder)
    wide = wide_records(folder)
    text = study_report(
        records, manifest, partial=partial, wide_units=None if wide is None else wide[1]
    )
    out = [atomic_write(folder / "study.md", text)]
    frame: Any = records
    measures = [m for m in [*KL_MEASURES, *RATIO_MEASURES] if m in frame]
    fig = plot.ratio_by_layer(paired_ratios(records, measures=measures, by=("method", "layer")))
    target = Path(figures or folder) / "kl_ratio_by_layer.png"
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png")
    return out + [target]
