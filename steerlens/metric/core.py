"""The :class:`Metric`: a positive semi-definite d×d matrix G kept as a factor B with G = BᵀB.

Products, quadratic forms and damped solves use the factor and never form G unless asked;
a metric accumulated over a large dataset may hold only its Gram matrix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from html import escape

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from steerlens.errors import InputError, MetricError, NonFiniteError
from steerlens.metric.info import MetricInfo
from steerlens.metric.spectrum import spectral_summary


@dataclass(frozen=True)
class Metric:
    """The local pullback Fisher metric at one site.

    Attributes:
        factor: ``[n_rows, d]`` with G = factorᵀ factor (None if only the Gram is kept).
        gram: ``[d, d]`` G itself, when accumulated rather than factored.
        site: the site's canonical name.
        info: how it was computed (a :class:`~steerlens.metric.info.MetricInfo`: vocabulary
            mode, dropped mass, top-K size, number of prompts, depth, off-target transform, ...);
            None for a metric built from a given factor or Gram.
    """

    factor: Float[Tensor, "n_rows d"] | None
    site: str
    info: MetricInfo | None = None
    gram: Float[Tensor, "d d"] | None = None

    def __post_init__(self) -> None:
        if self.factor is None and self.gram is None:
            raise MetricError("a Metric needs a factor or a Gram matrix")

    # ------------------------------------------------------------------ shapes
    @property
    def dim(self) -> int:
        """The dimension d of the activation space at the site."""
        return int(self.factor.shape[1] if self.factor is not None else self.gram.shape[0])  # type: ignore[union-attr]

    @property
    def dtype(self) -> torch.dtype:
        t = self.factor if self.factor is not None else self.gram
        assert t is not None
        return t.dtype

    def __repr__(self) -> str:
        rows = "gram" if self.factor is None else f"{self.factor.shape[0]} rows"
        extra = ", ".join(f"{k}={v!r}" for k, v in self._shown().items())
        return f"Metric({self.site!r}, d={self.dim}, {rows}{', ' + extra if extra else ''})"

    def _repr_html_(self) -> str:
        diag = {"site": self.site, **spectral_summary(self.spectrum().double())}
        info = self.info.recorded() if self.info is not None else {}
        values = {
            k: f"{v:.4g}" if isinstance(v, float) else str(v) for k, v in {**diag, **info}.items()
        }
        table = pd.DataFrame({"value": values})
        return f"<p><b>{escape(repr(self))}</b></p>" + table.to_html()

    # ------------------------------------------------------------------ algebra
    def matrix(self) -> Float[Tensor, "d d"]:
        """The dense d×d matrix G."""
        if self.gram is not None:
            return self.gram
        assert self.factor is not None
        return self.factor.T @ self.factor

    def mv(self, v: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        """G v (batched over leading dimensions)."""
        v = self._check_vec(v)
        if self.factor is not None:
            return (v @ self.factor.T) @ self.factor
        return v @ self.matrix()

    def quad(self, v: Float[Tensor, "... d"]) -> Float[Tensor, "..."]:
        """vᵀ G v: twice the KL divergence, to second order, of the perturbation v."""
        v = self._check_vec(v)
        if self.factor is not None:
            return (v @ self.factor.T).pow(2).sum(-1)
        return (v @ self.matrix() * v).sum(-1)

    def trace(self) -> Tensor:
        if self.factor is not None:
            return self.factor.pow(2).sum()
        return torch.diagonal(self.matrix()).sum()

    def eigh(self) -> tuple[Float[Tensor, " d"], Float[Tensor, "d d"]]:
        """Eigenvalues (descending, clamped at 0) and eigenvectors (columns) of G."""
        g = self.matrix().double()
        evals, evecs = torch.linalg.eigh((g + g.T) / 2)
        evals, evecs = evals.flip(0).clamp_min(0.0), evecs.flip(1)
        return evals.to(self.dtype), evecs.to(self.dtype)

    def spectrum(self) -> Float[Tensor, " d"]:
        """Eigenvalues of G, descending."""
        return self.eigh()[0]

    def damping_value(self, damping: float, relative: bool = True) -> float:
        """The absolute ridge λ: ``damping · tr(G)/d`` if ``relative`` else ``damping``."""
        if damping < 0 or not torch.isfinite(torch.tensor(damping)):
            raise InputError(f"damping must be a finite number >= 0, got {damping}")
        return float(damping * self.trace() / self.dim) if relative else float(damping)

    def solve(
        self, g: Float[Tensor, "... d"], damping: float = 1e-2, *, relative: bool = True
    ) -> Float[Tensor, "... d"]:
        """(G + λI)⁻¹ g with λ = ``damping``·tr(G)/d (``relative=True``, the default) or
        λ = ``damping``. An undamped solve of a singular G raises :class:`MetricError`."""
        g = self._check_vec(g)
        lam = self.damping_value(damping, relative)
        d = self.dim
        if self.factor is not None and self.factor.shape[0] < d and lam > 0:
            # Woodbury: (λI + BᵀB)⁻¹ g = (g − Bᵀ(λI + BBᵀ)⁻¹Bg)/λ, an n_rows×n_rows solve.
            b = self.factor.double()
            small = b @ b.T + lam * torch.eye(b.shape[0], dtype=b.dtype, device=b.device)
            bg = g.double() @ b.T
            inner = torch.linalg.solve(small, bg.unsqueeze(-1)).squeeze(-1)
            return ((g.double() - inner @ b) / lam).to(g.dtype)
        a = self.matrix().double() + lam * torch.eye(d, dtype=torch.float64, device=g.device)
        if lam == 0:
            evals = torch.linalg.eigvalsh(a)
            if evals.min() <= 1e-12 * max(float(evals.max()), 1e-300):
                raise MetricError(
                    f"undamped solve of a singular metric at {self.site} (smallest eigenvalue "
                    f"{float(evals.min()):.3g}); pass damping > 0"
                )
        out = torch.linalg.solve(a, g.double().unsqueeze(-1)).squeeze(-1)
        return out.to(g.dtype)

    def pinv_quad(self, g: Float[Tensor, "... d"], damping: float = 1e-2) -> Float[Tensor, "..."]:
        """gᵀ (G + λI)⁻¹ g: the concept change per unit of off-target cost, at its best."""
        return (self._check_vec(g) * self.solve(g, damping)).sum(-1)

    # ------------------------------------------------------------------ transforms
    def compressed(self) -> Metric:
        """The same metric with at most d factor rows (the R of a thin QR)."""
        if self.factor is None or self.factor.shape[0] <= self.dim:
            return self
        r = torch.linalg.qr(self.factor.double(), mode="r")[1]
        return replace(self, factor=r.to(self.dtype).contiguous())

    def truncated(self, rank: int | None = None, trace_kept: float | None = None) -> Metric:
        """A rank-r factor: the top ``rank`` eigen-directions, or the fewest holding
        ``trace_kept`` of the trace."""
        evals, evecs = self.eigh()
        if rank is None:
            if trace_kept is None or not 0 < trace_kept <= 1:
                raise InputError(f"trace_kept must be in (0, 1], got {trace_kept}")
            frac = torch.cumsum(evals, 0) / evals.sum().clamp_min(1e-300)
            rank = int((frac < trace_kept).sum()) + 1
        if not 1 <= rank <= self.dim:
            raise InputError(f"rank must be in 1..{self.dim}, got {rank}")
        factor = evals[:rank].sqrt().unsqueeze(1) * evecs[:, :rank].T
        info = replace(self.info, rank=rank) if self.info is not None else None
        return replace(self, factor=factor.contiguous(), gram=None, info=info)

    def _shown(self) -> dict[str, object]:
        """The info fields the repr shows: five that say what G is, and how it was sampled or
        truncated where it was (the HTML table shows every field that applies)."""
        if self.info is None:
            return {}
        every = asdict(self.info)
        shown = {k: every[k] for k in ("vocab", "dropped_mass", "n_prompts", "depth", "off_target")}
        return shown | {k: every[k] for k in ("samples", "seed", "rank") if every[k] is not None}

    def _check_vec(self, v: Tensor) -> Tensor:
        if not isinstance(v, Tensor):
            raise InputError(f"expected a torch.Tensor, got {type(v).__name__}")
        if v.shape[-1:] != (self.dim,):
            raise InputError(
                f"vector of shape {tuple(v.shape)} does not fit the metric at {self.site} "
                f"(d = {self.dim})"
            )
        if not torch.isfinite(v).all():
            raise NonFiniteError(f"vector for the metric at {self.site} contains NaN or inf")
        t = self.factor if self.factor is not None else self.gram
        assert t is not None
        return v.to(dtype=t.dtype, device=t.device)


def stack_metrics(metrics: list[Metric], site: str, info: MetricInfo | None) -> Metric:
    """The mean of several metrics at one site (factor rows stacked, scaled by 1/√n)."""
    if not metrics:
        raise InputError("cannot average an empty list of metrics")
    n = len(metrics)
    if all(m.factor is not None for m in metrics):
        rows = torch.cat([m.factor for m in metrics], 0) / n**0.5  # type: ignore[misc]
        return Metric(rows, site, info).compressed()
    gram = sum(m.matrix() for m in metrics) / n
    return Metric(None, site, info, gram=gram)  # type: ignore[arg-type]
