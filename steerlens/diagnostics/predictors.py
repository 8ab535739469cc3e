"""What predicts a method's measured KL ratio to a baseline, from the records of the
matched-concept protocol (:mod:`steerlens.experiments.matched`): the ratio itself run by run
(:func:`with_kl_ratio`), and how well each predictor (ρ at the clean point, ρ along FishBack's
path, ρ along the method's own path, the finite-change quadratic) agrees with it
(:func:`predictor_agreement`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from steerlens.errors import InputError

#: what makes two records the same run of the matched-concept protocol
RUN_KEYS = ("concept", "layer", "context", "target_probability")


def pair_with_baseline(
    records: pd.DataFrame, baseline: str, columns: Sequence[str], *, keep_all: bool = False
) -> pd.DataFrame:
    """Each run of ``records`` beside ``baseline``'s reached run of the same :data:`RUN_KEYS`,
    whose ``columns`` it gains as ``<column>_baseline``: by default only the reached runs of
    the other methods that have one; with ``keep_all`` every row, NaN where there is none.

    >>> rows = [dict(concept="c", layer=1, context="a", target_probability=0.5, reached=True,
    ...              method=m, off_target_kl=k) for m, k in [("fishback", 1.0), ("euclidean", 4.0)]]
    >>> pair_with_baseline(pd.DataFrame(rows), "fishback", ["off_target_kl"])[
    ...     ["method", "off_target_kl", "off_target_kl_baseline"]].to_dict("records")
    [{'method': 'euclidean', 'off_target_kl': 4.0, 'off_target_kl_baseline': 1.0}]
    """
    frame: Any = records  # pandas' inline types defeat the checker here
    missing = [c for c in [*RUN_KEYS, "method", "reached", *columns] if c not in frame]
    if missing:
        raise InputError(f"records have no column(s) {missing}; they have {list(frame.columns)}")
    keys = list(RUN_KEYS)
    base = frame[(frame["method"] == baseline) & frame["reached"]][keys + list(columns)]
    base = base.rename(columns={c: f"{c}_baseline" for c in columns})
    if keep_all:
        return frame.merge(base, on=keys, how="left")
    others = frame[(frame["method"] != baseline) & frame["reached"]]
    return others.merge(base, on=keys)


def with_kl_ratio(records: pd.DataFrame, baseline: str = "fishback") -> pd.DataFrame:
    """``records`` with a column ``kl_ratio``: each row's off-target KL over ``baseline``'s on
    the same (concept, layer, context, target); NaN where either did not reach the target. With
    a ``kl_quadratic`` column, also ``kl_quadratic_ratio`` (the finite-change predictor of
    ``kl_ratio``); with ``path_length``, ``rho_own`` = (path_length / baseline's)², ρ along
    the method's own path (NaN where the baseline's path has length 0: it started at the
    target)."""
    frame: Any = records
    cols = [c for c in ("off_target_kl", "kl_quadratic", "path_length") if c in frame]
    out = pair_with_baseline(records, baseline, cols, keep_all=True)
    out["kl_ratio"] = (out["off_target_kl"] / out["off_target_kl_baseline"]).where(out["reached"])
    if "kl_quadratic" in frame:
        quad = out["kl_quadratic"] / out["kl_quadratic_baseline"]
        out["kl_quadratic_ratio"] = quad.where(out["reached"])
    if "path_length" in frame:
        own = (out["path_length"] / out["path_length_baseline"]) ** 2
        out["rho_own"] = own.where(out["reached"] & out["path_length_baseline"].gt(0))
    return out.drop(columns=[f"{c}_baseline" for c in cols])


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
