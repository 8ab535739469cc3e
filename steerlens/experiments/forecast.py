"""The cost-ratio forecast, scored honestly on the study's records.

A *forecast* of a method's off-target KL over FishBack's (the ratio, on each KL measure of
:data:`~steerlens.evaluation.KL_MEASURES`) may read only what exists before that method runs:
the clean point and FishBack's own run. An *account* reads the method's own run (its matched
edit or the path it walked) and is a second measurement of the outcome; a *trivial* predictor is
what a forecast must beat. The candidates (:data:`PREDICTORS`):

| predictor | kind | reads |
|---|---|---|
| ``rho`` | forecast | the method's direction and the off-target metric at the clean point |
| ``rho_path`` | forecast | the method's direction along FishBack's path |
| ``layer`` | trivial | the layer index |
| ``grad_norm`` | trivial | ‖g‖ at the clean point |
| ``kantorovich`` | trivial | the Kantorovich bound of the implicit metric (Euclidean, depth-0) |
| ``edit_norm_ratio`` | account | (‖δ‖ / ‖δ_FishBack‖)², both matched edits |
| ``kl_quadratic_ratio`` | account | ½δᵀGδ of both matched edits |
| ``rho_own`` | account | (Fisher length of the method's own path / FishBack's)² |

The split is fixed by rule before any score is seen: a context is in the **development**
split when the SHA-1 of its text is 0 mod 3 (:func:`is_development`), and the development
layers are :data:`DEV_LAYERS`. Each predictor is scored as it is (``raw``, where it is on the
scale of a ratio) and ``fitted``: log(measured) = a·log(predictor) + b by least squares on the
development runs only. The forecast is chosen on the development runs alone, per measure: the
(forecast predictor, variant) with the largest fraction of runs within 2× of the measured ratio
(ties: the larger Spearman). It is then scored once on the held-out runs: new contexts at the
development layers, development contexts at new layers, new contexts at new layers, and a
second model's records when given. Every score: Spearman with a bootstrap interval over
independent contexts (contexts resampled with all their runs), Pearson on the logs, the median
predicted / measured, and the fraction within 2×.

The site ranking of ``steerlens where`` is a forecast too (:func:`site_ranking`): its
``kl_per_unit``·Δc² against FishBack's measured KL, run by run, and its ranking of the layers
against the measured one.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from steerlens.diagnostics.predictors import pair_with_baseline
from steerlens.errors import InputError
from steerlens.evaluation import KL_MEASURES

__all__ = [
    "DEV_LAYERS",
    "PREDICTORS",
    "Forecast",
    "Predictor",
    "forecast",
    "is_development",
    "paired_runs",
    "score",
    "site_ranking",
]

#: the layers whose runs (at development contexts) choose and fit the forecast
DEV_LAYERS: tuple[int, ...] = (6, 18)
#: the measured ratios a forecast is scored against
MEASURES: tuple[str, ...] = tuple(KL_MEASURES)


@dataclass(frozen=True)
class Predictor:
    """A candidate: its records column, its kind (``forecast``, ``trivial`` or ``account``) and
    whether its raw value is already on the scale of a ratio (else only its fitted form is
    scored)."""

    column: str
    kind: str
    ratio_scale: bool


PREDICTORS: tuple[Predictor, ...] = (
    Predictor("rho", "forecast", True),
    Predictor("rho_path", "forecast", True),
    Predictor("layer", "trivial", False),
    Predictor("grad_norm", "trivial", False),
    Predictor("kantorovich", "trivial", True),
    Predictor("edit_norm_ratio", "account", True),
    Predictor("kl_quadratic_ratio", "account", True),
    Predictor("rho_own", "account", True),
)


def is_development(context: str) -> bool:
    """Whether a context is in the development split: SHA-1 of its text ≡ 0 (mod 3)."""
    return int(hashlib.sha1(context.encode()).hexdigest(), 16) % 3 == 0


def paired_runs(records: pd.DataFrame, baseline: str = "fishback") -> pd.DataFrame:
    """One row per run of a method other than ``baseline`` that reached its target beside a
    reached ``baseline`` run (same concept, layer, context and target): the predictors of
    :data:`PREDICTORS` present, ``ratio_<measure>`` for every KL measure recorded, and
    ``split``: ``dev``, ``new contexts``, ``new layers`` or ``new both``."""
    frame: Any = records
    if "off_target_kl" not in frame:
        raise InputError(f"records have no column off_target_kl; they have {list(frame.columns)}")
    measures = [m for m in MEASURES if m in frame]
    extra = [c for c in ("kl_quadratic", "path_length", "edit_norm") if c in frame]
    out = pair_with_baseline(records, baseline, measures + extra)
    for m in measures:
        out[f"ratio_{m}"] = out[m] / out[f"{m}_baseline"]
    if "kl_quadratic" in extra:
        out["kl_quadratic_ratio"] = out["kl_quadratic"] / out["kl_quadratic_baseline"]
    if "path_length" in extra:
        out["rho_own"] = (out["path_length"] / out["path_length_baseline"]) ** 2
    if "edit_norm" in extra:
        out["edit_norm_ratio"] = (out["edit_norm"] / out["edit_norm_baseline"]) ** 2
    dev_context = out["context"].map(is_development)
    dev_layer = out["layer"].isin(DEV_LAYERS)
    out["split"] = np.select(
        [dev_context & dev_layer, ~dev_context & dev_layer, dev_context & ~dev_layer],
        ["dev", "new contexts", "new layers"],
        "new both",
    )
    return out


def _usable(runs: Any, column: str, measure: str) -> Any:
    if column not in runs or f"ratio_{measure}" not in runs:
        return runs.iloc[0:0]
    x, y = runs[column].astype(float), runs[f"ratio_{measure}"].astype(float)
    return runs[np.isfinite(x) & np.isfinite(y) & x.gt(0) & y.gt(0)]


def _fit(dev: Any, column: str, measure: str) -> tuple[float, float] | None:
    """(a, b) of log y = a log x + b on ``dev``; None with fewer than 3 runs or one x."""
    ok = _usable(dev, column, measure)
    if len(ok) < 3 or ok[column].nunique() < 2:
        return None
    lx, ly = np.log(ok[column].astype(float)), np.log(ok[f"ratio_{measure}"].astype(float))
    a, b = np.polyfit(lx, ly, 1)
    return float(a), float(b)


#: a column of values: a list, an array or a pandas Series
Values = Sequence[float] | np.ndarray | pd.Series


def score(
    predicted: Values,
    measured: Values,
    contexts: Sequence[str] | np.ndarray | pd.Series,
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """The scores of the module docstring for paired predicted / measured ratios (all > 0),
    ``contexts`` naming each run's context (the bootstrap's unit).

    >>> s = score([1.0, 2.0, 4.0, 8.0], [1.5, 2.0, 5.0, 7.0], ["a", "b", "c", "d"])
    >>> s["spearman"], s["within_2x"]
    (1.0, 1.0)
    """
    p, m = np.asarray(predicted, dtype=float), np.asarray(measured, dtype=float)
    ctx = np.asarray(contexts)
    if not (len(p) == len(m) == len(ctx)):
        raise InputError(f"need one context per run: {len(p)}, {len(m)}, {len(ctx)}")
    if len(p) and ((p <= 0).any() or (m <= 0).any()):
        raise InputError("predicted and measured ratios must be > 0")
    out = {"runs": float(len(p)), "contexts": float(len(set(ctx.tolist())))}
    over = p / m if len(p) else np.array([])
    out["median_predicted_over_measured"] = float(np.median(over)) if len(p) else math.nan
    out["within_2x"] = float(((over >= 0.5) & (over <= 2)).mean()) if len(p) else math.nan
    varies = len(p) >= 3 and len(set(p.tolist())) > 1 and len(set(m.tolist())) > 1
    out["spearman"] = _spearman(p, m) if varies else math.nan
    out["pearson_log"] = float(np.corrcoef(np.log(p), np.log(m))[0, 1]) if varies else math.nan
    lo = hi = math.nan
    names, which = np.unique(ctx, return_inverse=True)
    if varies and len(names) >= 3:
        rng = np.random.default_rng(seed)
        picks = rng.integers(0, len(names), (n_boot, len(names)))
        counts = np.stack([np.bincount(row, minlength=len(names)) for row in picks])
        weights = counts[:, which].astype(float)  # each run as often as its context was drawn
        rho = _weighted_spearman(p, m, weights)
        rho = rho[np.isfinite(rho)]
        if len(rho):
            lo, hi = (float(np.quantile(rho, q)) for q in (0.025, 0.975))
    out["spearman_ci_low"], out["spearman_ci_high"] = lo, hi
    return out


def _midranks(x: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per row of ``weights`` [draws, n]: the rank of each x among the sample that repeats run i
    weights[i] times (ties share their mid-rank), as scipy's rankdata gives on that sample."""
    values, inverse = np.unique(x, return_inverse=True)
    onehot = np.zeros((len(x), len(values)))
    onehot[np.arange(len(x)), inverse] = 1.0
    per_value = weights @ onehot  # [draws, distinct values]
    below = np.cumsum(per_value, 1) - per_value
    return (below + (per_value + 1) / 2)[:, inverse]


def _weighted_spearman(x: np.ndarray, y: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Spearman's correlation of each bootstrap sample (run i repeated weights[d, i] times),
    all draws at once; NaN where a sample's ranks do not vary."""
    rx, ry = _midranks(x, weights), _midranks(y, weights)
    total = weights.sum(1, keepdims=True)
    mx, my = (
        (weights * rx).sum(1, keepdims=True) / total,
        (weights * ry).sum(1, keepdims=True) / total,
    )
    cov = (weights * (rx - mx) * (ry - my)).sum(1)
    var = (weights * (rx - mx) ** 2).sum(1) * (weights * (ry - my) ** 2).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(var > 0, cov / np.sqrt(var), np.nan)


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import rankdata

    return float(np.corrcoef(rankdata(x), rankdata(y))[0, 1])


@dataclass(frozen=True)
class Forecast:
    """The scores of every candidate on every split and measure (``scores``), the forecast
    chosen per measure on the development runs (``chosen``: measure → (predictor, variant)),
    the paired runs with each candidate's prediction (``runs``), and the first model's records
    (``records``, for :func:`site_ranking`)."""

    scores: pd.DataFrame
    chosen: dict[str, tuple[str, str]]
    runs: pd.DataFrame
    records: pd.DataFrame | None = None

    def held_out(self) -> pd.DataFrame:
        """The chosen forecast's rows of ``scores`` on every split, per measure."""
        s: Any = self.scores
        rows = [
            s[(s["measure"] == m) & (s["predictor"] == p) & (s["variant"] == v)]
            for m, (p, v) in self.chosen.items()
        ]
        return pd.concat(rows) if rows else s.iloc[0:0]


def forecast(
    records: pd.DataFrame, second: pd.DataFrame | None = None, *, baseline: str = "fishback"
) -> Forecast:
    """Choose and fit on the development runs of ``records``, score every candidate on every
    split (and on ``second``, another model's records, as the split ``second model``)."""
    runs = paired_runs(records, baseline)
    if second is not None:
        other = paired_runs(second, baseline).assign(split="second model")
        runs = pd.concat([runs, other], ignore_index=True)
    dev = runs[runs["split"] == "dev"]
    rows = []
    for measure in MEASURES:
        if f"ratio_{measure}" not in runs:
            continue
        for pred in PREDICTORS:
            if pred.column not in runs:
                continue
            variants: list[tuple[str, tuple[float, float] | None]] = []
            if pred.ratio_scale:
                variants.append(("raw", (1.0, 0.0)))
            variants.append(("fitted", _fit(dev, pred.column, measure)))
            for variant, coef in variants:
                if coef is None:
                    continue
                a, b = coef
                col = f"pred_{pred.column}_{variant}_{measure}"
                runs[col] = np.exp(a * np.log(runs[pred.column].astype(float)) + b)
                for split, group in runs.groupby("split"):
                    ok = _usable(group, pred.column, measure)
                    s = score(
                        np.exp(a * np.log(ok[pred.column].astype(float)) + b),
                        ok[f"ratio_{measure}"].astype(float),
                        ok["context"].astype(str),
                    )
                    head = {"measure": measure, "predictor": pred.column, "kind": pred.kind}
                    rows.append(head | {"variant": variant, "a": a, "b": b, "split": split} | s)
    scores: Any = pd.DataFrame(rows)
    chosen: dict[str, tuple[str, str]] = {}
    if len(scores):
        pick = scores[(scores["split"] == "dev") & (scores["kind"] == "forecast")]
        pick = pick[pick["runs"] >= 3]
        for measure in MEASURES:
            group = pick[pick["measure"] == measure]
            if len(group):
                best = group.sort_values(["within_2x", "spearman"], ascending=False).iloc[0]
                chosen[measure] = (str(best["predictor"]), str(best["variant"]))
    return Forecast(scores, chosen, runs, records)


def site_ranking(records: pd.DataFrame, method: str = "fishback") -> pd.DataFrame:
    """The site ranking of ``steerlens where`` scored as a forecast on ``method``'s reached runs,
    one row per KL measure and split: ``kl_per_unit``·Δc² (Δc the change in log pair share from
    the clean context to the target) against each run's measured KL (:func:`score`), and
    ``layer_spearman``: the mean over (concept, context, target) of the Spearman correlation,
    across layers, of ``kl_per_unit`` with the measured KL (groups of ≥ 3 layers)."""
    frame: Any = records
    if "kl_per_unit" not in frame:
        return pd.DataFrame()
    runs = frame[(frame["method"] == method) & frame["reached"] & frame["kl_per_unit"].gt(0)]
    runs = runs[np.isfinite(runs["kl_per_unit"].astype(float))].copy()
    if runs.empty:
        return pd.DataFrame()
    delta = np.log(runs["target_probability"]) - np.log(runs["clean_probability"])
    runs["predicted_kl"] = runs["kl_per_unit"] * delta**2
    dev = runs["context"].map(is_development) & runs["layer"].isin(DEV_LAYERS)
    runs["split"] = np.where(dev, "dev", "held out")
    rows = []
    for measure in [m for m in MEASURES if m in runs]:
        for split, group in [("all", runs), *runs.groupby("split")]:
            ok = group[group[measure].gt(0) & group["predicted_kl"].gt(0)]
            row = {"measure": measure, "split": split}
            row |= score(ok["predicted_kl"], ok[measure], ok["context"].astype(str))
            per = []
            for _, runs_of in ok.groupby(["concept", "context", "target_probability"]):
                if runs_of["layer"].nunique() >= 3:
                    per.append(
                        _spearman(runs_of["kl_per_unit"].to_numpy(), runs_of[measure].to_numpy())
                    )
            row["layer_spearman"] = float(np.nanmean(per)) if per else math.nan
            row["layer_groups"] = float(len(per))
            rows.append(row)
    return pd.DataFrame(rows)
