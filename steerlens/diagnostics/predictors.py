"""What predicts a method's measured KL ratio to a baseline, from the records of the
matched-concept protocol (:mod:`steerlens.experiments.matched`): the ratio itself run by run
(:func:`with_kl_ratio`), and how well each predictor (ρ at the clean point, ρ along FishBack's
path, ρ along the method's own path, the finite-change quadratic) agrees with it
(:func:`predictor_agreement`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from steerlens.errors import InputError


def with_kl_ratio(records: pd.DataFrame, baseline: str = "fishback") -> pd.DataFrame:
    """``records`` with a column ``kl_ratio``: each row's off-target KL over ``baseline``'s on
    the same (concept, layer, context, target); NaN where either did not reach the target. With
    a ``kl_quadratic`` column, also ``kl_quadratic_ratio`` (the finite-change predictor of
    ``kl_ratio``); with ``path_length``, ``rho_own`` = (path_length / baseline's)², ρ along
    the method's own path (NaN where the baseline's path has length 0: it started at the
    target)."""
    keys = ["concept", "layer", "context", "target_probability"]
    frame: Any = records  # pandas' inline types defeat the checker here
    is_base = (frame["method"] == baseline) & frame["reached"]
    cols = {"off_target_kl": "_baseline_kl"}
    if "kl_quadratic" in frame:
        cols["kl_quadratic"] = "_baseline_quad"
    if "path_length" in frame:
        cols["path_length"] = "_baseline_length"
    base = frame[is_base][keys + list(cols)].rename(columns=cols)
    out = frame.merge(base, on=keys, how="left")
    ratio = out["off_target_kl"] / out["_baseline_kl"]
    out["kl_ratio"] = ratio.where(out["reached"])
    if "kl_quadratic" in frame:
        quad = out["kl_quadratic"] / out["_baseline_quad"]
        out["kl_quadratic_ratio"] = quad.where(out["reached"])
    if "path_length" in frame:
        own = (out["path_length"] / out["_baseline_length"]) ** 2
        out["rho_own"] = own.where(out["reached"] & out["_baseline_length"].gt(0))
    return out.drop(columns=list(cols.values()))


def predictor_agreement(
    records: pd.DataFrame, baseline: str = "fishback", *, by: str | None = None
) -> pd.DataFrame:
    """How well each predictor of the measured KL ratio to ``baseline`` does over the reached
    runs of the other methods: ``rho`` (clean-point spectral cost ratio) and, where present,
    ``rho_path`` (ρ integrated along FishBack's path), ``rho_own`` (along the method's own
    path) and ``kl_quadratic_ratio`` (finite change). Spearman and Pearson-on-logs correlations,
    the median predicted/measured, and the fraction within 2× of measured; ``by`` (a records
    column, e.g. ``"method"`` or ``"layer"``): one row per predictor and value of it, for
    groups of at least 3 runs."""
    frame: Any = with_kl_ratio(records, baseline) if "kl_ratio" not in records else records
    if by is not None and by not in frame:
        raise InputError(f"no column {by!r} to group by; records have {list(frame.columns)}")
    rows = []
    for name in ("rho", "rho_path", "rho_own", "kl_quadratic_ratio"):
        if name not in frame:
            continue
        ok = frame[(frame["method"] != baseline) & frame["kl_ratio"].gt(0) & frame[name].gt(0)]
        groups = ok.groupby(by) if by is not None else [(None, ok)]
        for key, group in groups:
            if len(group) >= 3:
                head = {"predictor": name} | ({by: key} if by not in (None, "method") else {})
                rows.append(head | _agreement(group, name))
    return pd.DataFrame(rows)


def _agreement(ok: Any, name: str) -> dict[str, Any]:
    pred, meas = ok[name].astype(float), ok["kl_ratio"].astype(float)
    over = pred / meas
    varies = pred.nunique() > 1 and meas.nunique() > 1  # else no correlation is defined
    return {
        "runs": len(ok),
        "methods": ", ".join(sorted(ok["method"].unique())),
        "spearman": float(pred.corr(meas, method="spearman")) if varies else math.nan,
        "pearson_log": float(np.log(pred).corr(np.log(meas))) if varies else math.nan,
        "median_predicted_over_measured": float(over.median()),
        "within_2x": float(((over <= 2) & (over >= 0.5)).mean()),
    }
