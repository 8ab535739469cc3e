"""The geometry figures behind the claims ("deviation from Euclidean", "effective dimension"),
each computed under a named definition, and the table that sets a model beside its controls
(:mod:`steerlens.diagnostics.controls`).

Every figure comes from the eigenvalues λ₁ ≥ … ≥ λ_d ≥ 0 of one metric G, with ḡ = tr(G)/d:

- ``deviation_spectral``: ‖G − ḡI‖₂ / ‖G‖₂ — the deviation from Euclidean of DESIGN.md §3
  (steerlens's own; the FishBack paper's exact definition is not public);
- ``deviation_frobenius``: ‖G − ḡI‖_F / ‖G‖_F — a second reading of the same words, given so
  that no number hangs on one choice (not the paper's either);
- ``participation_fraction``: the participation ratio PR = (tr G)² / tr(G²), over d — the
  effective dimension of DESIGN.md §3;
- ``rank_90_fraction`` / ``rank_95_fraction`` / ``rank_99_fraction``: the fewest eigen-directions
  holding 90/95/99% of tr G, over d (DESIGN.md §3);
- ``top_share``: λ₁ / tr G.

What any metric concentrated on few directions gives, from the definitions alone:
``deviation_spectral`` = max(λ₁ − ḡ, ḡ − λ_d) / λ₁, so it is 1 − 1/(d·top_share) whenever
λ₁ ≥ 2ḡ — above 0.97 as soon as the top direction holds 1/(0.03·d) of the trace (6% at
d = 576) — and at least ½ for every singular metric; ``deviation_frobenius`` is
√(1 − participation_fraction), the effective dimension restated.

>>> import torch
>>> figures = geometry_figures(torch.tensor([3.0, 1.0, 0.0, 0.0], dtype=torch.float64))
>>> figures["deviation_spectral"], figures["participation_fraction"], figures["top_share"]
(0.6666666666666666, 0.4, 0.75)
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import pandas as pd
from jaxtyping import Float
from torch import Tensor

from steerlens.errors import InputError, MetricError
from steerlens.metric.spectrum import deviation_from_euclidean, effective_dimension, rank_holding


@dataclass(frozen=True)
class Definition:
    """One geometry figure: its name, its formula in words and where the definition comes from;
    ``compute`` maps the eigenvalues of G (descending, ≥ 0) to the figure."""

    name: str
    formula: str
    source: str
    compute: Callable[[Tensor], float]


_DESIGN = "DESIGN.md §3"
_DEVIATION = "DESIGN.md §3, steerlens's own: FishBack's exact definition is not public"


def _frobenius(evals: Tensor) -> float:
    total = float(evals.sum())
    squares = float(evals.pow(2).sum())
    return math.sqrt(max(0.0, squares - total**2 / evals.numel()) / squares)


def _rank_fraction(q: float) -> Callable[[Tensor], float]:
    return lambda evals: rank_holding(evals, q) / evals.numel()


DEFINITIONS: dict[str, Definition] = {
    d.name: d
    for d in (
        Definition(
            "deviation_spectral",
            "‖G − ḡI‖₂ / ‖G‖₂, ḡ = tr G / d (= max(λ₁ − ḡ, ḡ − λ_d) / λ₁)",
            _DEVIATION,
            deviation_from_euclidean,
        ),
        Definition(
            "deviation_frobenius",
            "‖G − ḡI‖_F / ‖G‖_F, ḡ = tr G / d (= √(1 − participation_fraction))",
            "an alternative reading of DESIGN.md §3's words; not the paper's",
            _frobenius,
        ),
        Definition(
            "participation_fraction",
            "(tr G)² / tr(G²) / d",
            _DESIGN,
            lambda evals: effective_dimension(evals) / evals.numel(),
        ),
        Definition(
            "rank_90_fraction",
            "fewest eigen-directions holding 90% of tr G, / d",
            _DESIGN,
            _rank_fraction(0.9),
        ),
        Definition(
            "rank_95_fraction",
            "fewest eigen-directions holding 95% of tr G, / d",
            _DESIGN,
            _rank_fraction(0.95),
        ),
        Definition(
            "rank_99_fraction",
            "fewest eigen-directions holding 99% of tr G, / d",
            _DESIGN,
            _rank_fraction(0.99),
        ),
        Definition(
            "top_share",
            "λ₁ / tr G (deviation_spectral = 1 − 1/(d·top_share) when λ₁ ≥ 2 tr G / d)",
            "what deviation_spectral is made of (an identity, not a claim)",
            lambda evals: float(evals[0] / evals.sum()),
        ),
    )
}


def geometry_figures(
    evals: Float[Tensor, " d"], definitions: Sequence[str] | None = None
) -> dict[str, float]:
    """Each definition's figure (default: all of :data:`DEFINITIONS`, in order) from the
    eigenvalues of G, sorted descending inside."""
    names = list(DEFINITIONS) if definitions is None else list(definitions)
    unknown = [n for n in names if n not in DEFINITIONS]
    if unknown:
        raise InputError(f"unknown geometry definitions {unknown}; valid: {list(DEFINITIONS)}")
    if evals.ndim != 1 or evals.numel() == 0:
        raise InputError(f"eigenvalues must be a non-empty vector, got shape {tuple(evals.shape)}")
    evals = evals.double().clamp_min(0.0).sort(descending=True).values
    if float(evals.sum()) <= 0:
        raise MetricError("the metric is zero: its geometry figures are undefined")
    return {name: float(DEFINITIONS[name].compute(evals)) for name in names}


@dataclass(frozen=True)
class GeometryRow:
    """One figure of one metric: which model (``"real"`` or a control kind) under which seed,
    the site, the definition's name and the value."""

    model: str
    seed: int | None
    site: str
    definition: str
    value: float


def geometry_rows(
    evals: Float[Tensor, " d"], model: str, site: str, seed: int | None = None
) -> list[GeometryRow]:
    """:func:`geometry_figures` of one metric as rows, every definition named."""
    return [
        GeometryRow(model, seed, site, name, value)
        for name, value in geometry_figures(evals).items()
    ]


def rows_frame(rows: Sequence[GeometryRow]) -> pd.DataFrame:
    """The rows as a DataFrame (``seed`` a nullable integer: empty for the real model)."""
    frame = pd.DataFrame([asdict(r) for r in rows])
    frame["seed"] = frame["seed"].astype("Int64")
    return frame


def control_table(rows: Sequence[GeometryRow]) -> pd.DataFrame:
    """Per definition and model: the range over sites (min, median, max, pooling the seeds
    of a control), with the definition's formula and source beside every number. Columns
    ``definition, model, min, median, max, sites, seeds, formula, source``."""
    if not rows:
        raise InputError("no geometry rows: compute some with geometry_rows first")
    groups: dict[tuple[str, str], list[GeometryRow]] = {}
    for row in rows:
        if row.definition not in DEFINITIONS:
            raise InputError(f"unknown geometry definition {row.definition!r}")
        groups.setdefault((row.definition, row.model), []).append(row)
    order = list(DEFINITIONS)
    out = []
    for definition, model in sorted(groups, key=lambda key: order.index(key[0])):
        group = groups[definition, model]
        values = sorted(r.value for r in group)
        spec = DEFINITIONS[definition]
        out.append(
            {
                "definition": definition,
                "model": model,
                "min": values[0],
                "median": statistics.median(values),
                "max": values[-1],
                "sites": len({r.site for r in group}),
                "seeds": len({r.seed for r in group}),
                "formula": spec.formula,
                "source": spec.source,
            }
        )
    return pd.DataFrame(out)


__all__ = [
    "DEFINITIONS",
    "Definition",
    "GeometryRow",
    "control_table",
    "geometry_figures",
    "geometry_rows",
    "rows_frame",
]
