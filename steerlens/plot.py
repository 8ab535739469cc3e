"""Every steerlens figure, in one style; the only module that imports matplotlib.

Each function takes result objects (tables, spectra) and returns a matplotlib ``Figure`` built
without pyplot, so nothing is shown, registered or saved behind the caller's back. Sizes suit
a paper column (3.4 in) or page (7 in); fonts stay readable at that size.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, ParamSpec

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from torch import Tensor

from steerlens.errors import InputError

P = ParamSpec("P")

STYLE: dict[str, Any] = {
    "font.size": 8,
    "axes.titlesize": 9,
    "axes.labelsize": 8,
    "legend.fontsize": 7,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "lines.linewidth": 1.4,
    "savefig.dpi": 200,
    "savefig.bbox": "tight",
}

#: one colour per method, the same in every figure
METHOD_COLORS = {
    "fishback": "#1b9e77",
    "fishback_merge": "#17becf",
    "fishback_plain": "#1f77b4",
    "fishback_transfer": "#000000",
    "euclidean": "#d95f02",
    "depth0": "#7570b3",
    "dual": "#7570b3",
    "caa": "#e7298a",
    "caa_last": "#a50f15",
    "actadd": "#66a61e",
    "probe": "#e6ab02",
    "sae": "#a6761d",
}
#: FishBack's variants are drawn dashed beside the solid baselines
METHOD_LINES = {"fishback_merge": "--", "fishback_plain": "--", "fishback_transfer": "--"}
PATH_COLORS = {"skip": "#999999", "attn": "#377eb8", "mlp": "#e41a1c", "attn_mlp": "#984ea3"}


def _styled(fn: Callable[P, Figure]) -> Callable[P, Figure]:
    """Build the figure under :data:`STYLE` without touching the caller's rcParams."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> Figure:
        with matplotlib.rc_context(STYLE):  # type: ignore[arg-type]
            return fn(*args, **kwargs)

    return wrapper


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)
    return fig, axes[0]


def _style(ax) -> None:
    for key in ("top", "right"):
        ax.spines[key].set_visible(False)
    ax.grid(True, alpha=0.3)


@_styled
def spectra(spectra: Mapping[int | str, Tensor], *, normalize: bool = True) -> Figure:
    """Eigenvalue spectra of metrics (descending), one line per layer; normalized by the top
    eigenvalue, on a log axis."""
    fig, (ax,) = _figure(3.4, 2.6)
    cmap = matplotlib.colormaps["viridis"]
    keys = list(spectra)
    for i, key in enumerate(keys):
        ev = spectra[key].double().cpu().numpy()
        ev = ev / ev[0] if normalize and ev[0] > 0 else ev
        ax.semilogy(
            np.arange(1, len(ev) + 1),
            np.clip(ev, 1e-12, None),
            color=cmap(i / max(len(keys) - 1, 1)),
            label=f"layer {key}",
        )
    ax.set_xlabel("eigen-direction (descending)")
    ax.set_ylabel("eigenvalue / largest" if normalize else "eigenvalue")
    ax.set_title("Pullback Fisher spectrum at hook_resid_post")
    ax.legend(frameon=False)
    _style(ax)
    return fig


@_styled
def geometry_vs_depth(table: pd.DataFrame) -> Figure:
    """Effective dimension (participation ratio and rank@90%, as fractions of d) and deviation
    from Euclidean against layer, from :func:`~steerlens.diagnostics.diagnostics_table`."""
    df: Any = table.groupby("layer", as_index=False).mean(numeric_only=True)
    layer = df["layer"]
    fig, (a, b) = _figure(7.0, 2.5, 2)
    a.plot(layer, df["participation_fraction"], marker="o", ms=3, label="(tr G)²/tr G² / d")
    a.plot(layer, df["rank_90_fraction"], marker="s", ms=3, label="rank holding 90% of tr G / d")
    a.set_xlabel("layer")
    a.set_ylabel("fraction of d")
    a.set_title("Effective dimension")
    a.legend(frameon=False)
    b.plot(layer, df["deviation_from_euclidean"], marker="o", ms=3, color="#d95f02")
    b.set_ylim(0, 1.02)
    b.set_xlabel("layer")
    b.set_ylabel("‖G − ḡI‖₂ / ‖G‖₂")
    b.set_title("Deviation from Euclidean (ḡ = tr G / d)")
    for ax in (a, b):
        _style(ax)
    return fig


@_styled
def block_shares(shares: pd.DataFrame) -> Figure:
    """Shares of ‖B_pre‖²_F by path (skip, attention, MLP, attention→MLP) against layer, from
    ``Sweep.shares``."""
    fig, (ax,) = _figure(3.4, 2.6)
    for path, group in shares.groupby("path"):
        ax.plot(
            group["layer"],
            group["share"],
            marker="o",
            ms=2.5,
            label=str(path),
            color=PATH_COLORS.get(str(path)),
        )
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xlabel("layer")
    ax.set_ylabel("share of ‖B_pre‖²_F")
    ax.set_title("Block decomposition of the metric")
    ax.legend(frameon=True, framealpha=0.9, ncols=2, loc="center right")
    _style(ax)
    return fig


@_styled
def kl_vs_probability(records: pd.DataFrame, *, kl: str = "off_target_kl") -> Figure:
    """Mean off-target KL (log scale) against target concept probability per method, one panel
    per layer, one legend for all; only contexts that reached the target count."""
    frame: Any = records
    layers = sorted(frame["layer"].unique())
    width = min(max(2.4 * len(layers), 3.4), 7.0)
    fig, axes = _figure(width, 2.6 if len(layers) > 1 else 3.0, len(layers))
    for ax, layer in zip(axes, layers, strict=True):
        sub = frame[(frame["layer"] == layer) & frame["reached"]]
        for method, group in sub.groupby("method"):
            agg = group.groupby("target_probability")[kl].mean()
            ax.semilogy(
                agg.index.to_numpy(),
                agg.to_numpy(),
                marker="o",
                ms=3,
                color=METHOD_COLORS.get(str(method)),
                label=str(method),
            )
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("target concept probability")
        _style(ax)
    axes[0].set_ylabel(f"{KL_LABELS.get(kl, kl).split(' (')[0]} (nats)")
    handles, labels = _legend_entries(axes)
    fig.legend(
        handles,
        [lbl.split(" (")[0] for lbl in labels],
        loc="outside lower center",
        ncols=min(len(labels), max(1, int(width / 0.9))),
        frameon=False,
    )
    return fig


def _legend_entries(axes: Any) -> tuple[list[Any], list[str]]:
    """Every labelled artist across the panels, once per label (a method may appear only in
    some panels)."""
    handles: list[Any] = []
    labels: list[str] = []
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    return handles, labels


#: the off-target divergences, as the panels name them
KL_LABELS = {
    "off_target_kl": "complement KL (FishBack descends it)",
    "off_target_kl_merged": "pair-merge KL (Park et al.)",
    "kl_full": "whole-distribution KL",
}

#: every measure compared to FishBack's as a ratio, as the panels name them
RATIO_LABELS = KL_LABELS | {
    "perplexity_greedy": "greedy continuation's perplexity",
    "perplexity_sampled": "sampled continuations' perplexity",
}

#: predictors of the measured KL ratio, with their axis labels
PREDICTORS = {
    "rho": "ρ at the clean point",
    "rho_path": "ρ along FishBack's path",
    "rho_own": "ρ along its own path",
    "kl_quadratic_ratio": "½δᵀGδ ratio at the matched edit",
}


@_styled
def predicted_vs_measured(records: pd.DataFrame, *, baseline: str = "fishback") -> Figure:
    """Predicted cost ratio against the measured off-target KL ratio to ``baseline`` at matched
    probability, log–log on one scale, with the identity line and the band within 2× of it:
    one panel per predictor present in
    ``records`` (ρ at the clean point; ρ integrated along FishBack's path, ``rho_path``; ρ
    along the method's own path, ``rho_own``; the finite-change ratio ``kl_quadratic_ratio``)."""
    if "kl_ratio" not in records:
        raise ValueError("records need a kl_ratio column (steerlens.diagnostics.with_kl_ratio)")
    frame: Any = records
    names = [p for p in PREDICTORS if p in frame]
    fig, axes = _figure(3.4 * len(names), 3.0, ncols=len(names))
    shown = {}
    for name in names:
        finite = np.isfinite(frame[name].astype(float)) & np.isfinite(
            frame["kl_ratio"].astype(float)
        )
        keep = (frame["method"] != baseline) & frame["kl_ratio"].gt(0) & frame[name].gt(0) & finite
        shown[name] = frame[keep][["method", name, "kl_ratio"]]
    values = [v for n, df in shown.items() for v in (*df[n], *df["kl_ratio"])]
    lo, hi = (min(values + [1.0]) / 1.5, max(values) * 1.5) if values else (0.5, 2.0)
    line = np.geomspace(lo, hi, 50)
    for ax, name in zip(axes, names, strict=True):
        df = shown[name]
        ax.fill_between(line, line / 2, line * 2, color="0.85", lw=0, label="within 2×")
        for method, group in df.groupby("method"):
            ax.scatter(
                group[name],
                group["kl_ratio"],
                s=12,
                alpha=0.8,
                label=str(method),
                color=METHOD_COLORS.get(str(method)),
            )
        ax.plot([lo, hi], [lo, hi], color="black", lw=0.7, ls="--", label="y = x")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_xlabel(f"{PREDICTORS[name]} (predicted)")
        ax.set_ylabel(f"off-target KL / {baseline}'s (measured)")
        ax.set_title(f"Predicted by {PREDICTORS[name].split(' at ')[0]}")
        _style(ax)
    handles, labels = _legend_entries(axes)
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), frameon=False)
    return fig


#: audit measures whose sign matters (a diverging colour scale centred on 0)
_SIGNED = ("dla_concept", "metric_share", "off_target_share")
#: colour-bar labels of the audit measures
AUDIT_LABELS = {
    "change_norm": "‖steered − clean‖ at the last position",
    "first_order_norm": r"first-order change $\|J\delta\|$",
    "agreement": "cosine(actual, first order)",
    "dla_concept": "direct effect on the concept (nats)",
    "dla_off_target_kl": "direct off-target KL, 2nd order (nats)",
    "metric_share": r"share of $\delta^\top G\,\delta$",
    "off_target_share": r"share of $\delta^\top G_{\mathrm{off}}\,\delta$",
}


@_styled
def audit_heatmap(
    audit: Any, measure: str = "change_norm", methods: Any = None, *, log: bool | None = None
) -> Figure:
    """One layer × head heatmap per method (an MLP column at the right), on one colour scale,
    from :func:`steerlens.audit`. Signed measures use a diverging scale centred on 0; sizes
    (norms, KL) a log scale over three decades unless ``log=False``."""
    from matplotlib.colors import LogNorm, Normalize

    methods = list(methods or audit.methods)
    grids = [audit.grid(measure, m) for m in methods]
    values = np.concatenate([g.to_numpy(dtype=float).ravel() for g in grids])
    values = values[np.isfinite(values)]
    top = float(np.abs(values).max()) if len(values) else 1.0
    signed = measure in _SIGNED
    cmap = matplotlib.colormaps["RdBu_r" if signed else "magma_r"].with_extremes(bad="white")
    log = (not signed and measure != "agreement") if log is None else log
    norm = LogNorm(top / 1e3, top, clip=True) if log else Normalize(-top if signed else 0, top)
    n_layers = max(len(g) for g in grids)
    fig, axes = _figure(min(2.6 * len(methods) + 0.8, 7.0), 0.5 + 0.16 * n_layers, len(methods))
    image = None
    for ax, method, grid in zip(axes, methods, grids, strict=True):
        heads = grid.shape[1] - 1
        matrix = grid.to_numpy(dtype=float)
        # a blank column between the heads and the MLP
        padded = np.column_stack([matrix[:, :heads], np.full(len(matrix), np.nan), matrix[:, -1]])
        image = ax.imshow(padded, aspect="auto", cmap=cmap, norm=norm, interpolation="none")
        ax.set_xticks([*range(heads), heads + 1], [*(str(h) for h in range(heads)), "MLP"])
        step = max(1, len(grid) // 10)
        rows = list(range(0, len(grid), step))
        ax.set_yticks(rows, [str(grid.index[r]) for r in rows])
        ax.set_xlabel("head")
        ax.set_title(str(method))
        ax.grid(False)
        for key in ("top", "right", "left", "bottom"):
            ax.spines[key].set_visible(False)
    axes[0].set_ylabel("layer")
    assert image is not None
    fig.colorbar(image, ax=list(axes), label=AUDIT_LABELS[measure], shrink=0.9)
    return fig


@_styled
def audit_agreement(audit: Any) -> Figure:
    """Each component's actual change against its first-order prediction J·δ (log–log, the
    identity dashed), one colour per method, with the overall cosine agreement in the legend."""
    fig, (ax,) = _figure(3.4, 3.0)
    frame: Any = audit.components
    summary = audit.summary.set_index("method")
    lo, hi = np.inf, 0.0
    for method, group in frame.groupby("method", sort=False):
        keep = group["change_norm"].gt(0) & group["first_order_norm"].gt(0)
        x, y = group["first_order_norm"][keep], group["change_norm"][keep]
        if not len(x):
            continue
        cos = float(summary.loc[method, "agreement"])
        ax.scatter(
            x,
            y,
            s=8,
            alpha=0.7,
            color=METHOD_COLORS.get(str(method)),
            label=f"{method} (cosine {cos:.2f})",
        )
        lo, hi = min(lo, x.min(), y.min()), max(hi, x.max(), y.max())
    if hi > 0:
        ax.plot([lo, hi], [lo, hi], color="black", lw=0.7, ls="--", label="y = x")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("first-order change ‖J·δ‖ (forward mode)")
    ax.set_ylabel("actual change ‖steered − clean‖")
    ax.set_title("Component changes: first order vs actual")
    ax.legend(frameon=False)
    _style(ax)
    return fig


@_styled
def rho_by_layer(table: pd.DataFrame) -> Figure:
    """ρ of each method's direction against layer (median over contexts, with the
    interquartile range shaded), log scale, from ``diagnose_concept`` or the reproduction's
    records (one row per context × method × layer; duplicate rows per target are dropped)."""
    frame: Any = table.dropna(subset=["rho"])
    keys = [k for k in ("concept", "context", "method", "layer") if k in frame]
    frame = frame.drop_duplicates(subset=keys)
    fig, (ax,) = _figure(3.4, 2.8)
    for method, group in frame.groupby("method", sort=False):
        stats = group.groupby("layer")["rho"].quantile([0.25, 0.5, 0.75]).unstack()
        color = METHOD_COLORS.get(str(method))
        layers = stats.index.to_numpy()
        ax.plot(layers, stats[0.5], marker="o", ms=3, color=color, label=str(method))
        ax.fill_between(layers, stats[0.25], stats[0.75], color=color, alpha=0.15, lw=0)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("ρ (1 = Fisher-optimal)")
    ax.set_title("Spectral cost ratio per method")
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=4, frameon=False)
    _style(ax)
    return fig


@_styled
def ratio_by_layer(ratios: pd.DataFrame, *, baseline: str = "fishback") -> Figure:
    """Each method's cost over ``baseline``'s against layer, one panel per measure, three to a
    row (from :func:`steerlens.evaluation.paired_ratios` by method and layer: each KL, and the
    perplexities of the continuations where given): the geometric mean ratio with its bootstrap
    interval over contexts where there is one, on one log scale; above the dotted line at 1 the
    baseline paid less. FishBack's variants are dashed."""
    frame: Any = ratios
    measures = list(dict.fromkeys(frame["measure"]))
    if not measures:
        raise InputError("no ratios to draw: no run paired with a reached baseline run")
    ncols = min(len(measures), 3)
    nrows = -(-len(measures) // ncols)
    fig = Figure(figsize=(min(3.0 * len(measures), 9.0), 2.6 * nrows + 0.9), layout="constrained")
    grid = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in grid[len(measures) :]:
        ax.set_visible(False)
    axes = grid[: len(measures)]
    for ax, measure in zip(axes, measures, strict=True):
        sub = frame[frame["measure"] == measure]
        for method, group in sub.groupby("method", sort=True):
            group = group.sort_values("layer")
            y = group["ratio"].to_numpy(dtype=float)
            lo = y - group["ratio_ci_low"].to_numpy(dtype=float)
            hi = group["ratio_ci_high"].to_numpy(dtype=float) - y
            ax.errorbar(
                group["layer"].to_numpy(),
                y,
                yerr=np.nan_to_num(np.stack([lo, hi]), nan=0.0),
                marker="o",
                ms=3,
                capsize=2,
                color=METHOD_COLORS.get(str(method)),
                ls=METHOD_LINES.get(str(method), "-"),
                label=str(method),
            )
        ax.axhline(1.0, color="black", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_title(RATIO_LABELS.get(str(measure), str(measure)))
        _style(ax)
    for row in range(nrows):
        grid[row * ncols].set_ylabel(f"method / {baseline} (geometric mean)")
    what = "Off-target KL" if set(measures) <= set(KL_LABELS) else "Each measure"
    fig.suptitle(f"{what} over {baseline}'s at matched share (> 1: {baseline} pays less)")
    lows = [ax.get_ylim()[0] for ax in axes]
    highs = [ax.get_ylim()[1] for ax in axes]
    for ax in axes:
        ax.set_ylim(min(lows), max(highs))
    handles, labels = _legend_entries(axes)
    fig.legend(
        handles, labels, loc="outside lower center", ncols=min(len(labels), 5), frameon=False
    )
    return fig


@_styled
def forecast_calibration(runs: pd.DataFrame, chosen: Mapping[str, tuple[str, str]]) -> Figure:
    """The chosen forecast of each measure (``chosen``: measure → (predictor, variant), as
    :class:`~steerlens.experiments.forecast.Forecast` has it) against the measured ratio to
    FishBack, log–log, with the identity line and the band within 2×: development runs as
    circles, held-out runs as crosses (``runs``' ``split``, its ``ratio_<measure>`` and
    ``pred_<predictor>_<variant>_<measure>`` columns)."""
    measures = list(chosen)
    fig, axes = _figure(3.0 * max(len(measures), 1), 3.0, ncols=max(len(measures), 1))
    for ax, measure in zip(axes, measures, strict=False):
        predictor, variant = chosen[measure]
        x_col, y_col = f"pred_{predictor}_{variant}_{measure}", f"ratio_{measure}"
        frame: Any = runs
        x, y = frame[x_col].astype(float), frame[y_col].astype(float)
        ok = frame[np.isfinite(x) & np.isfinite(y) & x.gt(0) & y.gt(0)]
        values = [*ok[x_col], *ok[y_col]]
        lo, hi = (min(values) / 1.5, max(values) * 1.5) if values else (0.5, 2.0)
        line = np.geomspace(lo, hi, 50)
        ax.fill_between(line, line / 2, line * 2, color="0.85", lw=0, label="within 2×")
        dev = ok["split"] == "dev"
        ax.scatter(ok[dev][x_col], ok[dev][y_col], s=10, alpha=0.7, label="development")
        ax.scatter(ok[~dev][x_col], ok[~dev][y_col], s=14, marker="x", alpha=0.7, label="held out")
        ax.plot([lo, hi], [lo, hi], color="black", lw=0.7, ls="--", label="y = x")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_xlabel(f"{predictor} ({variant}), predicted")
        ax.set_ylabel("KL / FishBack's, measured")
        ax.set_title(KL_LABELS.get(measure, measure))
        _style(ax)
    handles, labels = _legend_entries(axes)
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), frameon=False)
    return fig
