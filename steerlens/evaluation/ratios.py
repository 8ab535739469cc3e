"""Each method's off-target cost over a baseline's on the same runs of the matched-concept
protocol: bootstrap intervals, paired ratios per measure of
:data:`~steerlens.evaluation.measures.KL_MEASURES`, the table laid out for reading, and the
per-target summary.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from steerlens.diagnostics.predictors import pair_with_baseline, with_kl_ratio
from steerlens.errors import InputError
from steerlens.evaluation.measures import KL_MEASURES


def bootstrap_ci(
    values: Sequence[float], n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its percentile bootstrap interval.

    >>> m, lo, hi = bootstrap_ci([1.0, 2.0, 3.0, 4.0])
    >>> m, lo <= m <= hi
    (2.5, True)
    """
    x = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), (n_boot, len(x)))].mean(1)
    tail = (1 - level) / 2
    return float(x.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def paired_ratios(
    records: pd.DataFrame,
    baseline: str = "fishback",
    *,
    measures: Sequence[str] | None = None,
    by: Sequence[str] = ("method", "layer"),
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Each method's cost over ``baseline``'s on the same runs, one row per group of ``by`` and
    measure (by default every one of :data:`KL_MEASURES` the records have): the geometric mean
    of the per-run ratios (a run: the same concept, layer, context
    and target, both reached, both measures > 0), its paired bootstrap interval over
    independent contexts (contexts resampled with all their runs; NaN with fewer than 2
    distinct contexts, where no interval over contexts exists), the median ratio, and the
    fraction of runs where the baseline paid less (``baseline_ahead``).

    >>> import pandas as pd
    >>> rows = [dict(concept="c", layer=1, context=x, target_probability=0.5, reached=True,
    ...              method=m, off_target_kl=k) for x, m, k in
    ...         [("a", "fishback", 1.0), ("a", "euclidean", 4.0),
    ...          ("b", "fishback", 2.0), ("b", "euclidean", 2.0)]]
    >>> out = paired_ratios(pd.DataFrame(rows), measures=["off_target_kl"])
    >>> out[["method", "runs", "contexts", "ratio", "baseline_ahead"]].to_dict("records")
    [{'method': 'euclidean', 'runs': 2, 'contexts': 2, 'ratio': 2.0, 'baseline_ahead': 0.5}]
    """
    measures, paired = _paired(records, baseline, measures, KL_MEASURES, by, level)
    rng = np.random.default_rng(seed)
    tail = (1 - level) / 2
    rows = []
    for measure in measures:
        ratio = paired[measure] / paired[f"{measure}_baseline"]
        ok = paired[ratio.gt(0) & np.isfinite(ratio)].assign(_log=np.log(ratio))
        for key, group in ok.groupby(list(by), sort=True):
            head = dict(zip(by, key if isinstance(key, tuple) else (key,), strict=True))
            n_contexts, lo, hi = _context_bootstrap(group, "_log", rng, n_boot, tail)
            logs = group["_log"].to_numpy()
            rows.append(
                head
                | {
                    "measure": measure,
                    "runs": len(group),
                    "contexts": n_contexts,
                    "ratio": float(np.exp(logs.mean())),
                    "ratio_ci_low": math.exp(lo),
                    "ratio_ci_high": math.exp(hi),
                    "median_ratio": float(np.exp(np.median(logs))),
                    "baseline_ahead": float((logs > 0).mean()),
                }
            )
    columns = [*by, "measure", "runs", "contexts", "ratio", "ratio_ci_low", "ratio_ci_high"]
    return pd.DataFrame(rows, columns=[*columns, "median_ratio", "baseline_ahead"])


def _paired(
    records: pd.DataFrame,
    baseline: str,
    measures: Sequence[str] | None,
    default: Mapping[str, str],
    by: Sequence[str],
    level: float,
) -> tuple[list[str], pd.DataFrame]:
    """The measures to compare (by default those of ``default`` the records have) and each
    run beside ``baseline``'s (:func:`pair_with_baseline`), after checking ``by`` and
    ``level``."""
    frame: Any = records
    chosen = [m for m in default if m in frame] if measures is None else list(measures)
    missing = [c for c in by if c not in frame]
    if missing:
        raise InputError(f"records have no column(s) {missing}; they have {list(frame.columns)}")
    if not 0 < level < 1:
        raise InputError(f"level must be in (0, 1), got {level}")
    return chosen, pair_with_baseline(records, baseline, chosen)


def _context_bootstrap(
    group: Any, column: str, rng: np.random.Generator, n_boot: int, tail: float
) -> tuple[int, float, float]:
    """(distinct contexts, low, high): the percentile bootstrap interval of the mean of
    ``group[column]`` over runs, resampling independent contexts with all their runs (NaN
    bounds with fewer than 2 contexts, where no interval over contexts exists)."""
    sums = group.groupby("context")[column].agg(["sum", "count"]).to_numpy()
    if len(sums) < 2:
        return len(sums), math.nan, math.nan
    pick = rng.integers(0, len(sums), (n_boot, len(sums)))
    means = sums[pick, 0].sum(1) / sums[pick, 1].sum(1)
    return len(sums), float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


#: the per-run measures besides the KLs compared with the baseline's run by run: perplexities
#: as a ratio (:func:`paired_ratios`), fractions and masses as a difference
#: (:func:`paired_differences`)
RATIO_MEASURES: dict[str, str] = {
    "perplexity_greedy": "greedy perplexity",
    "perplexity_sampled": "sampled perplexity",
}
DIFFERENCE_MEASURES: dict[str, str] = {
    "target_first_greedy": "greedy next word is the target (fraction)",
    "target_first_sampled": "sampled next word is the target (fraction)",
    "pair_mass": "pair mass p_b + p_t",
}


def paired_differences(
    records: pd.DataFrame,
    baseline: str = "fishback",
    *,
    measures: Sequence[str] | None = None,
    by: Sequence[str] = ("method",),
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Each method's measure minus ``baseline``'s on the same runs (as in
    :func:`paired_ratios`: the same concept, layer, context and target, both reached), one row
    per group of ``by`` and measure (by default every one of :data:`DIFFERENCE_MEASURES` the
    records have): the mean difference, its paired bootstrap interval over independent
    contexts, and the fractions of runs where the method's value is above and below the
    baseline's.

    >>> import pandas as pd
    >>> rows = [dict(concept="c", layer=1, context=x, target_probability=0.5, reached=True,
    ...              method=m, pair_mass=v) for x, m, v in
    ...         [("a", "fishback", 0.5), ("a", "euclidean", 0.25),
    ...          ("b", "fishback", 0.5), ("b", "euclidean", 0.5)]]
    >>> out = paired_differences(pd.DataFrame(rows))
    >>> out[["method", "runs", "difference", "above", "below"]].to_dict("records")
    [{'method': 'euclidean', 'runs': 2, 'difference': -0.125, 'above': 0.0, 'below': 0.5}]
    """
    measures, paired = _paired(records, baseline, measures, DIFFERENCE_MEASURES, by, level)
    rng = np.random.default_rng(seed)
    tail = (1 - level) / 2
    rows = []
    for measure in measures:
        diff = paired[measure] - paired[f"{measure}_baseline"]
        ok = paired[np.isfinite(diff)].assign(_diff=diff)
        for key, group in ok.groupby(list(by), sort=True):
            head = dict(zip(by, key if isinstance(key, tuple) else (key,), strict=True))
            n_contexts, lo, hi = _context_bootstrap(group, "_diff", rng, n_boot, tail)
            values = group["_diff"].to_numpy()
            rows.append(
                head
                | {
                    "measure": measure,
                    "runs": len(group),
                    "contexts": n_contexts,
                    "difference": float(values.mean()),
                    "difference_ci_low": lo,
                    "difference_ci_high": hi,
                    "above": float((values > 0).mean()),
                    "below": float((values < 0).mean()),
                }
            )
    columns = [*by, "measure", "runs", "contexts", "difference", "difference_ci_low"]
    return pd.DataFrame(rows, columns=[*columns, "difference_ci_high", "above", "below"])


def ratio_table(
    ratios: pd.DataFrame, by: Sequence[str] = ("method", "layer"), baseline: str = "fishback"
) -> pd.DataFrame:
    """:func:`paired_ratios` laid out for reading: one row per group of ``by``, and per measure
    the ratio over ``baseline`` with its interval and in how many runs the baseline paid less,
    side by side."""
    frame: Any = ratios
    parts = []
    for measure, group in frame.groupby("measure", sort=False):
        name = (KL_MEASURES | RATIO_MEASURES).get(str(measure), str(measure))
        ci = [
            "n/a (1 context)" if not math.isfinite(lo) else f"[{lo:.3g}, {hi:.3g}]"
            for lo, hi in zip(group["ratio_ci_low"], group["ratio_ci_high"], strict=True)
        ]
        runs = zip(group["baseline_ahead"], group["runs"], strict=True)
        parts.append(
            pd.DataFrame(
                {
                    **{b: group[b].to_numpy() for b in by},
                    f"{name} ×": group["ratio"].to_numpy(),
                    f"{name} 95% CI": ci,
                    f"{name}: {baseline} lower": [f"{round(a * n)} of {n}" for a, n in runs],
                }
            ).set_index(list(by))
        )
    if not parts:
        return pd.DataFrame()
    return pd.concat(parts, axis=1).reset_index()


def difference_table(
    differences: pd.DataFrame, by: Sequence[str] = ("method",), baseline: str = "fishback"
) -> pd.DataFrame:
    """:func:`paired_differences` laid out for reading: one row per group of ``by``, and per
    measure the mean difference from ``baseline`` with its interval and in how many runs the
    method's value is above / below the baseline's, side by side."""
    frame: Any = differences
    parts = []
    for measure, group in frame.groupby("measure", sort=False):
        name = DIFFERENCE_MEASURES.get(str(measure), str(measure))
        ci = [
            "n/a (1 context)" if not math.isfinite(lo) else f"[{lo:.3g}, {hi:.3g}]"
            for lo, hi in zip(group["difference_ci_low"], group["difference_ci_high"], strict=True)
        ]
        counts = zip(group["above"], group["below"], group["runs"], strict=True)
        parts.append(
            pd.DataFrame(
                {
                    **{b: group[b].to_numpy() for b in by},
                    f"{name}: − {baseline}": group["difference"].to_numpy(),
                    f"{name} 95% CI": ci,
                    f"{name}: above / below": [
                        f"{round(a * n)} / {round(b * n)} of {n}" for a, b, n in counts
                    ],
                }
            ).set_index(list(by))
        )
    if not parts:
        return pd.DataFrame()
    return pd.concat(parts, axis=1).reset_index()


def summarize(records: pd.DataFrame, baseline: str = "fishback") -> pd.DataFrame:
    """Per (method, layer, target): contexts reached / total, and the mean off-target KL and
    its ratio to ``baseline`` on the same contexts, with bootstrap 95% intervals, and the mean
    pair-merge KL where recorded (:func:`paired_ratios` compares both measures run by run)."""
    if records.empty:
        raise InputError("no records to summarize")
    frame: Any = with_kl_ratio(records, baseline)
    rows = []
    for (method, layer, target), group in frame.groupby(
        ["method", "layer", "target_probability"], sort=True
    ):
        ok = group[group["reached"]]
        kl_mean, kl_lo, kl_hi = bootstrap_ci(ok["off_target_kl"].tolist())
        r_mean, r_lo, r_hi = bootstrap_ci(ok["kl_ratio"].tolist())
        rows.append(
            {
                "method": method,
                "layer": layer,
                "target_probability": target,
                "reached": int(group["reached"].sum()),
                "contexts": len(group),
                "off_target_kl": kl_mean,
                "off_target_kl_ci": (kl_lo, kl_hi),
                f"kl_ratio_to_{baseline}": r_mean,
                "kl_ratio_ci": (r_lo, r_hi),
                "off_target_kl_merged": (
                    float(ok["off_target_kl_merged"].mean())
                    if "off_target_kl_merged" in ok
                    else math.nan
                ),
                **{
                    name: float(ok[name].mean()) if name in ok else math.nan
                    for name in ("rho", "rho_path", "rho_own")
                },
            }
        )
    return pd.DataFrame(rows)
