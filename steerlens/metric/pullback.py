"""Public entry points: the pullback Fisher metric at one site, and at every site in one sweep.

>>> import torch
>>> from steerlens.testing import tiny_model
>>> model = tiny_model("llama")
>>> tokens = torch.tensor([3, 1, 4, 1, 5])
>>> metric = pullback_metric(model, tokens, "resid_post.0")
>>> metric.matrix().shape
torch.Size([16, 16])
>>> sweep = pullback_sweep(model, tokens)
>>> torch.allclose(sweep["blocks.0.hook_resid_post"].matrix(), metric.matrix())
True
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from steerlens.errors import InputError, SiteError
from steerlens.metric.autodiff import pullback_rows
from steerlens.metric.blockmap import shared_block_weights
from steerlens.metric.core import Metric
from steerlens.metric.direct import direct_rows
from steerlens.metric.info import MetricInfo
from steerlens.metric.outcomes import (
    DEFAULT_DROPPED_MASS,
    OffTarget,
    sampled_factor,
    unembed_factor,
)
from steerlens.metric.precision import compute_model
from steerlens.metric.recursion import pull_block
from steerlens.metric.state import PromptState, prompt_state
from steerlens.prompts import PromptsLike, as_prompts
from steerlens.sites import KINDS, Site, all_sites, as_site

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer

#: kinds in a default sweep: every kind but ``result``, whose per-head rows equal those of
#: ``attn_out`` in pre-norm blocks and would cost n_heads × d_model columns per layer
SWEEP_KINDS: tuple[str, ...] = tuple(k for k in KINDS if k != "result")


@dataclass(frozen=True)
class MetricOptions:
    """How the output distribution's factor is formed (see :mod:`steerlens.metric.outcomes`).

    ``vocab``: ``"auto"`` (top-K outcomes holding 1 − ``dropped_mass`` plus an exact rest row) or
    ``"full"`` (exact). ``off_target``: an :class:`OffTarget` transform, or None.
    ``rank`` / ``trace_kept``: optional truncation of the factor before the recursion.
    ``precision``: the dtype of the top-K Gram (``"float32"`` is faster and fine under a damped
    solve; see :func:`~steerlens.metric.outcomes.unembed_factor`).
    ``samples`` / ``seed``: instead of the exact factor, the sampled Fisher of ``samples``
    outcomes drawn from the model's own distribution with a generator seeded by ``seed``
    (:func:`~steerlens.metric.outcomes.sampled_factor`; ``vocab`` and ``dropped_mass`` then do
    not apply). None: exact.
    """

    vocab: str = "auto"
    dropped_mass: float = DEFAULT_DROPPED_MASS
    off_target: OffTarget | None = None
    rank: int | None = None
    trace_kept: float | None = None
    precision: str = "float64"
    samples: int | None = None
    seed: int = 0


def lens_logits(
    model: HookedTransformer, resid: Float[Tensor, "*rows d_model"]
) -> Float[Tensor, "*rows d_vocab"]:
    """The logits read from one residual stream vector (or rows of them, ``[rows, d_model]``)
    through ln_final and the unembedding (with the model's output soft-cap); differentiable in
    ``resid``."""
    ln = getattr(model, "ln_final", None)
    u = ln(resid.reshape(-1, 1, resid.shape[-1])).view(resid.shape) if ln is not None else resid
    logits = u @ model.W_U.detach().to(u.dtype) + model.b_U.detach().to(u.dtype)
    cap = model.cfg.output_logits_soft_cap
    if cap and cap > 0:
        logits = cap * torch.tanh(logits / cap)
    return logits


@torch.no_grad()  # no graph w.r.t. the weights; torch.func still differentiates
def lens_rows(
    model: HookedTransformer, resid: Float[Tensor, " d_model"], options: MetricOptions
) -> tuple[Float[Tensor, "n_rows d_model"], MetricInfo]:
    """Factor rows at a residual stream state read straight into ln_final and the unembedding:
    at the final residual the model's own output metric, earlier the logit-lens metric."""
    dtype = resid.dtype
    ln = getattr(model, "ln_final", None)
    logits = lens_logits(model, resid)
    cap = model.cfg.output_logits_soft_cap
    softcap = cap if cap and cap > 0 else None
    if options.samples is not None:
        generator = torch.Generator(device=logits.device).manual_seed(options.seed)
        rows_u, info = sampled_factor(
            logits,
            model.W_U,
            options.samples,
            generator,
            off_target=options.off_target,
            softcap=softcap,
        )
        info = replace(info, seed=options.seed)
    else:
        rows_u, info = unembed_factor(
            logits,
            model.W_U,
            vocab=options.vocab,
            dropped_mass=options.dropped_mass,
            off_target=options.off_target,
            softcap=softcap,
            precision=options.precision,
        )
    rows_u = rows_u.to(dtype)
    if ln is not None:
        rows = pullback_rows(lambda x: ln(x.view(1, 1, -1)).view(-1), (resid,), rows_u)[0]
    else:
        rows = rows_u
    metric = Metric(rows, "lens").compressed()
    if options.rank is not None or options.trace_kept is not None:
        metric = metric.truncated(options.rank, options.trace_kept)
    assert metric.factor is not None
    return metric.factor.contiguous(), info


def lens_layer(site: Site, depth: int | None, n_layers: int) -> int:
    """The block whose input residual the lens reads, for a site pulled back through ``depth``
    complete blocks (None: all the way to the output). ``depth=0`` at ``resid_pre`` (or at
    ``resid_post``) is the softmax's own geometry on that residual."""
    if depth is None:
        return n_layers
    if depth < 0:
        raise InputError(f"depth must be >= 0 or None, got {depth}")
    top = site.layer + depth + (0 if site.kind == "resid_pre" else 1)
    if top > n_layers:
        raise InputError(
            f"depth {depth} from site {site.name} passes the last block; the most is "
            f"{n_layers - site.layer - (0 if site.kind == 'resid_pre' else 1)}"
        )
    return top


def _take(rows: Tensor, site: Site) -> Tensor:
    if site.head is not None:
        return rows[:, site.head].contiguous()
    return rows.reshape(rows.shape[0], -1)


@torch.no_grad()  # no graph w.r.t. the weights; torch.func transforms still differentiate
def _prompt_rows(
    model: HookedTransformer,
    state: PromptState,
    sites: Sequence[Site],
    top: int,
    options: MetricOptions,
    decompose: bool,
) -> tuple[dict[str, Tensor], MetricInfo, list[dict[str, Any]]]:
    """Factor rows of one prompt at every site (all pulled back from lens layer ``top``)."""
    b, info = lens_rows(model, state.resid[top], options)
    b_lens = b
    out: dict[str, Tensor] = {}
    last = [s for s in sites if s.position == "last"]
    bottom = min((s.layer for s in last), default=top)
    by_layer: dict[int, list[Site]] = {}
    for s in last:
        by_layer.setdefault(s.layer, []).append(s)
    shares: list[dict[str, Any]] = []
    for layer in range(top - 1, bottom - 1, -1):
        wanted = by_layer.get(layer, [])
        needs_block = decompose or layer > bottom or any(s.kind != "resid_post" for s in wanted)
        if not needs_block:
            out.update({s.name: b for s in wanted})
            continue
        pulled = pull_block(model, state, layer, b, {s.kind for s in wanted}, decompose=decompose)
        for s in wanted:
            out[s.name] = _take(pulled.rows[s.kind], s)
        if decompose:
            shares.append({"layer": layer, **pulled.shares, "heads": pulled.head_shares})
        b = pulled.rows["resid_pre"]
    for s in last:
        if s.layer == top:  # depth 0 at resid_pre: the lens rows themselves
            out[s.name] = b_lens
    for s in sites:
        if s.position != "last":
            out[s.name] = direct_rows(model, state.tokens, s, b_lens, top)
    return out, info, shares


class _Rows:
    """One site's factor rows over prompts, G = Σ rowsᵀrows / n: the first prompt's rows, and
    every prompt's while they are at most d together (the metric keeps a factor); once a second
    prompt takes them past d, their Gram, accumulated one matmul a prompt in the rows' dtype
    (the metric keeps the Gram, accumulated in float64 as every Gram of the engine is, and
    returned in the rows' dtype). So a many-prompt metric holds at most one d × d matrix a site
    however many prompts it averages, and a prompt of R rows costs R·d² multiply-adds there (the
    thin-QR fold this replaces cost several times that: a QR of up to 3d rows every few
    prompts)."""

    def __init__(self) -> None:
        self.parts: list[Tensor] = []
        self.gram: Tensor | None = None  # float64, returned in the rows' dtype
        self.dtype = torch.float64
        self.n_rows = 0
        self.n_prompts = 0

    def add(self, rows: Tensor) -> None:
        self.n_rows += rows.shape[0]
        self.n_prompts += 1
        if self.gram is None and (self.n_prompts == 1 or self.n_rows <= rows.shape[1]):
            self.parts.append(rows)
            return
        if self.gram is None:
            held = torch.cat(self.parts, 0).double()
            self.gram, self.parts, self.dtype = held.T @ held, [], rows.dtype
        wide = rows.double()
        self.gram.addmm_(wide.T, wide)


def _finish(rows: _Rows, name: str, info: MetricInfo) -> Metric:
    n = rows.n_prompts
    if rows.gram is not None:
        return Metric(None, name, info, gram=(rows.gram / n).to(rows.dtype))
    factor = torch.cat(rows.parts, 0) / n**0.5 if n > 1 else rows.parts[0]
    return Metric(factor.contiguous(), name, info).compressed()


def _summarize(infos: list[MetricInfo], depth: int | None = None) -> MetricInfo:
    """One record for a metric averaged over prompts: the largest and the mean dropped mass,
    the largest top K."""
    drops = [i.dropped_mass for i in infos]
    return replace(
        infos[0],
        dropped_mass=max(drops),
        mean_dropped_mass=sum(drops) / len(drops),
        top_k=max(i.top_k or 0 for i in infos),
        n_prompts=len(infos),
        depth=depth,
    )


def pullback_metric(
    model: HookedTransformer,
    prompts: PromptsLike,
    site: str | Site,
    *,
    vocab: str = "auto",
    dropped_mass: float = DEFAULT_DROPPED_MASS,
    off_target: OffTarget | None = None,
    depth: int | None = None,
    rank: int | None = None,
    trace_kept: float | None = None,
    attention_mask: Tensor | None = None,
) -> Metric:
    """The local pullback Fisher metric G = Jᵀ(diag p − ppᵀ)J at ``site``, for the next-token
    distribution at each prompt's last position, averaged over prompts.

    Args:
        model: any causal HookedTransformer (float16 / bfloat16 models are computed on a
            float32 copy: :mod:`steerlens.metric.precision`).
        prompts: a string, list of strings, or token tensor ``[pos]`` / ``[batch, pos]``
            (with ``attention_mask``, a padded batch: each row's real tokens are one prompt).
        site: e.g. ``"blocks.6.hook_resid_post"``, ``"resid_post.6@all"``, ``"z.6:3"``.
        vocab: ``"auto"`` (top-K + rest, K by ``dropped_mass``) or ``"full"`` (exact).
        off_target: take the Fisher metric of a transformed distribution (token-set complement,
            or the dual-steering pair merge).
        depth: pull back through this many complete blocks, then read the residual straight into
            ln_final and the unembedding (None: the full model; 0: the softmax geometry).
        rank, trace_kept: truncate the output factor (fewer rows, a lower bound on G).
    """
    model = compute_model(model)
    options = MetricOptions(vocab, dropped_mass, off_target, rank, trace_kept)
    site = as_site(site, model)
    top = lens_layer(site, depth, model.cfg.n_layers)
    rows, infos = _Rows(), []
    with shared_block_weights(model):  # every prompt's blocks read one copy of the weights
        for tokens in as_prompts(model, prompts, attention_mask):
            state = prompt_state(model, tokens)
            site.resolve_position(state.n_pos)
            out, info, _ = _prompt_rows(model, state, [site], top, options, decompose=False)
            rows.add(out[site.name])
            infos.append(info)
    return _finish(rows, site.name, _summarize(infos, depth))


@dataclass(frozen=True)
class Sweep(Mapping[str, Metric]):
    """Metrics at many sites from one recursive sweep, indexable by site name or :class:`Site`,
    with the block decomposition (``shares``: one row per layer and path; ``head_shares``) and
    ``info``, the :class:`~steerlens.metric.info.MetricInfo` its metrics share."""

    metrics: dict[str, Metric]
    n_layers: int
    shares: pd.DataFrame = field(default_factory=pd.DataFrame)
    head_shares: pd.DataFrame = field(default_factory=pd.DataFrame)
    info: MetricInfo = field(kw_only=True)

    def _key(self, key: str | Site) -> str:
        site = Site.parse(key)
        if site.layer < 0:
            site = Site(site.kind, site.layer + self.n_layers, site.head, site.position)
        return site.name

    def __getitem__(self, key: str | Site) -> Metric:  # type: ignore[override]
        name = self._key(key)
        if name not in self.metrics:
            raise SiteError(
                f"site {name} is not in this sweep; it holds {len(self.metrics)} sites, e.g. "
                + ", ".join(list(self.metrics)[:4])
            )
        return self.metrics[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.metrics)

    def __len__(self) -> int:
        return len(self.metrics)

    def __repr__(self) -> str:
        info = ", ".join(f"{k}={v!r}" for k, v in self.info.recorded().items())
        return f"Sweep({len(self.metrics)} sites, {self.n_layers} layers, {info})"

    def traces(self) -> pd.DataFrame:
        """tr G per site, as a layer × site-kind table (per-head sites summed over heads)."""
        rows = []
        for name, metric in self.metrics.items():
            site = Site.parse(name)
            rows.append({"layer": site.layer, "kind": site.kind, "trace": float(metric.trace())})
        frame: Any = pd.DataFrame(rows)
        return frame.pivot_table(index="layer", columns="kind", values="trace", aggfunc="sum")

    def _repr_html_(self) -> str:
        info = ", ".join(f"{k}={v}" for k, v in self.info.recorded().items())
        return (
            f"<p><b>Sweep</b>: {len(self.metrics)} sites over {self.n_layers} layers"
            f"{' (' + info + ')' if info else ''}. tr G per layer and site kind:</p>"
            + self.traces().to_html(float_format="%.4g")
        )


def pullback_sweep(
    model: HookedTransformer,
    prompts: PromptsLike,
    sites: Sequence[str | Site] | None = None,
    *,
    vocab: str = "auto",
    dropped_mass: float = DEFAULT_DROPPED_MASS,
    off_target: OffTarget | None = None,
    rank: int | None = None,
    trace_kept: float | None = None,
    decompose: bool = True,
    progress: bool = False,
    attention_mask: Tensor | None = None,
) -> Sweep:
    """The metric at every requested site (default: every site of every layer, per head for
    ``hook_z``; ``hook_result`` on request) from one recursive sweep per prompt, plus the block
    decomposition of ‖B_pre‖²_F per layer (``decompose``). Options as :func:`pullback_metric`."""
    model = compute_model(model)
    options = MetricOptions(vocab, dropped_mass, off_target, rank, trace_kept)
    if sites is None:
        parsed = all_sites(model, SWEEP_KINDS)
    else:
        parsed = [as_site(s, model) for s in sites]
        if not parsed:
            raise InputError("no sites given: pass None for every site, or a list of sites")
    n = model.cfg.n_layers
    rows = {s.name: _Rows() for s in parsed}
    infos, share_rows = [], []
    prompts_list = as_prompts(model, prompts, attention_mask)
    with shared_block_weights(model):  # every prompt's blocks read one copy of the weights
        for p_index, tokens in enumerate(tqdm(prompts_list, disable=not progress, desc="sweep")):
            state = prompt_state(model, tokens)
            for s in parsed:
                s.resolve_position(state.n_pos)
            out, info, shares = _prompt_rows(model, state, parsed, n, options, decompose)
            for name, r in out.items():
                rows[name].add(r)
            infos.append(info)
            share_rows += [{"prompt": p_index, **row} for row in shares]
    summary = _summarize(infos)
    metrics = {name: _finish(r, name, summary) for name, r in rows.items()}
    shares_df, heads_df = _share_frames(share_rows)
    return Sweep(metrics, n, shares_df, heads_df, info=summary)


def _share_frames(share_rows: list[dict[str, Any]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    if not share_rows:
        return pd.DataFrame(), pd.DataFrame()
    paths = ["skip", "mlp", "attn", "attn_mlp"]
    long = [
        {"prompt": r["prompt"], "layer": r["layer"], "path": p, "share": r[p]}
        for r in share_rows
        for p in paths
    ]
    heads = [
        {"prompt": r["prompt"], "layer": r["layer"], "head": h, "share": v}
        for r in share_rows
        for h, v in enumerate(r["heads"])
    ]
    shares = (
        pd.DataFrame(long).groupby(["layer", "path"], as_index=False).agg(share=("share", "mean"))
    )
    head_df = (
        pd.DataFrame(heads).groupby(["layer", "head"], as_index=False).agg(share=("share", "mean"))
    )
    return shares, head_df
