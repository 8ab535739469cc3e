"""The result of :func:`steerlens.audit`: per-component tables, and the ways to read them
(a layer × head grid per measure, methods side by side, the most-moved components, and
:meth:`Audit.plot`, the heatmap of :mod:`steerlens.plot`).

>>> import pandas as pd
>>> rows = pd.DataFrame(dict(method="m", component=["L1H0", "L1MLP"], layer=1,
...                          column=["H0", "MLP"], change_norm=[0.5, 2.0]))
>>> summary = pd.DataFrame(dict(method=["m"], prompts=[1]))
>>> grid = Audit(rows, rows, summary, pd.DataFrame(), n_heads=1).grid()
>>> list(grid.columns), grid.values.tolist()
(['H0', 'MLP'], [[0.5, 2.0]])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd

from steerlens.errors import InputError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: what each per-component column measures (figure labels use these)
MEASURES: dict[str, str] = {
    "change_norm": "‖actual change‖ at the last position",
    "first_order_norm": "‖first-order change J·δ‖",
    "agreement": "cosine(actual, first-order)",
    "dla_concept": "direct effect on the concept (nats)",
    "dla_off_target_kl": "direct off-target KL, second order (nats)",
    "metric_share": "share of δᵀGδ (full Fisher)",
    "off_target_share": "share of δᵀG_offδ (off-target Fisher)",
}


@dataclass(frozen=True)
class Audit:
    """What :func:`steerlens.audit` found. ``components``: one row per (method, component),
    means over prompts; ``per_prompt``: the same per prompt; ``summary``: one row per method
    (means over prompts); ``sae_features``: the most-moved SAE features per (method, site)."""

    components: pd.DataFrame
    per_prompt: pd.DataFrame
    summary: pd.DataFrame
    sae_features: pd.DataFrame
    n_heads: int

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(self.components["method"]))

    def grid(self, measure: str = "change_norm", method: str | None = None) -> pd.DataFrame:
        """``measure`` as a layer × (head 0..H−1, MLP) table for one method."""
        if measure not in MEASURES or measure not in self.components:
            have = [m for m in MEASURES if m in self.components]
            raise InputError(f"unknown audit measure {measure!r}; this audit has {have}")
        method = self._method(method)
        rows: Any = self.components[self.components["method"] == method]
        table = rows.pivot_table(index="layer", columns="column", values=measure, sort=False)
        order = [f"H{h}" for h in range(self.n_heads)] + ["MLP"]
        return table.reindex(columns=order)

    def compare(self, measure: str = "change_norm") -> pd.DataFrame:
        """``measure`` per component (rows) for every method (columns)."""
        self.grid(measure, self.methods[0])
        frame: Any = self.components
        table = frame.pivot_table(index="component", columns="method", values=measure, sort=False)
        return table[self.methods]

    def top(self, n: int = 10, measure: str = "change_norm", method: str | None = None):
        """The ``n`` components with the largest |measure| for one method."""
        self.grid(measure, method)
        frame: Any = self.components
        rows = frame[frame["method"] == self._method(method)]
        return rows.reindex(rows[measure].abs().sort_values(ascending=False).index).head(n)

    def plot(
        self,
        measure: str = "change_norm",
        methods: Sequence[str] | None = None,
        *,
        log: bool | None = None,
    ) -> Figure:
        """The layer × head heatmap of ``measure`` (an MLP column at the right), one panel per
        method on one colour scale: :func:`steerlens.plot.audit_heatmap` of this audit."""
        from steerlens.plot import audit_heatmap

        return audit_heatmap(self, measure, methods, log=log)

    def _method(self, method: str | None) -> str:
        if method is None:
            if len(self.methods) != 1:
                raise InputError(f"this audit has methods {self.methods}: name one")
            return self.methods[0]
        if method not in self.methods:
            raise InputError(f"no method {method!r} in this audit; it has {self.methods}")
        return method

    def __repr__(self) -> str:
        n = int(self.summary["prompts"].iloc[0]) if len(self.summary) else 0
        return (
            f"Audit(methods={self.methods}, prompts={n}, "
            f"components={len(self.components) // max(len(self.methods), 1)})"
        )

    def _repr_html_(self) -> str:
        parts = [f"<p><b>{self!r}</b></p>", self.summary.to_html(index=False, float_format="%.4g")]
        for method in self.methods:
            top = self.top(5, method=method)[["component", *_present(top_columns, self)]]
            parts.append(f"<p>{method}: the five components it moves most</p>")
            parts.append(top.to_html(index=False, float_format="%.4g"))
        return "\n".join(parts)


top_columns = ("change_norm", "agreement", "dla_concept", "metric_share")


def _present(columns: Sequence[str], result: Audit) -> list[str]:
    return [c for c in columns if c in result.components]
