"""The matched-concept protocol: steer each context to the same target probability with every
method, then measure what else changed.

Measures, for a context whose next token should move from a base form b to a target form t
(clean distribution p, steered q, both at the prediction position):

- ``probability``: q(t);
- ``off_target_kl``: KL(p̃ ‖ q̃) of the distributions renormalized on every token but t;
- ``off_target_kl_merged``: KL(p' ‖ q') after merging each base token's mass into its target
  (Park et al.'s dual-steering definition), over the whole pair mapping;
- ``perplexity`` (fluency, optional): the unsteered model's perplexity of a greedy continuation
  generated under the intervention (:func:`continuation_perplexity`);
- ``kl_full``: KL(p ‖ q) of the whole next-token distributions (nothing removed or merged);
- ``p_target``, ``p_base``, ``pair_mass``: q(t), q(b) and q(t) + q(b) (with a base);
- ``rr_diff``: the mean |1/rank_p(y) − 1/rank_q(y)| over the tokens y ≠ t in p's top-p 0.999 set
  (ranks among the tokens ≠ t): how much the order of the rest moved.

Strength: iterative methods stop at the target themselves (one run serves every target through
checkpoints); a fixed-direction method's scale is found by bisection. A context where a method
cannot reach a target (within ``max_scale`` or ``max_steps``) is a row with ``reached=False``,
never dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from steerlens.cost import fisher_length
from steerlens.errors import InputError
from steerlens.methods.intervention import Intervention
from steerlens.metric.local import LocalPath
from steerlens.metric.outcomes import OffTarget, outcome_distribution

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer


@torch.no_grad()
def next_logprobs(
    model: HookedTransformer, tokens: Tensor, intervention: Intervention | None = None
) -> Float[Tensor, " d_vocab"]:
    """log p of the next token after ``tokens`` (float64), optionally steered."""
    batch = tokens.view(1, -1)
    if intervention is None:
        return torch.log_softmax(model(batch)[0, -1].double(), -1)
    with intervention.apply(model):
        return torch.log_softmax(model(batch)[0, -1].double(), -1)


def _prompt_with_room(model: HookedTransformer, tokens: Tensor, n_tokens: int) -> Tensor:
    """``tokens`` as a [1, pos] batch, after checking that ``n_tokens`` more fit the context."""
    if n_tokens < 1:
        raise InputError(f"n_tokens must be >= 1, got {n_tokens}")
    seq = tokens.view(1, -1)
    if seq.shape[1] + n_tokens > model.cfg.n_ctx:
        raise InputError(
            f"{seq.shape[1]} prompt tokens + {n_tokens} generated exceed the model's context of "
            f"{model.cfg.n_ctx}"
        )
    return seq


@torch.no_grad()
def _continue(
    model: HookedTransformer,
    seq: Tensor,
    n_tokens: int,
    generator: torch.Generator | None,
) -> Tensor:
    """``seq`` [batch, pos] extended by ``n_tokens``: argmax without a generator, else sampled
    from the softmax with it. Every forward pass sees the whole sequence, so an ``@last`` edit
    applied around this steers each new prediction position and nothing else."""
    for _ in range(n_tokens):
        logits = model(seq)[:, -1]
        if generator is None:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            nxt = torch.multinomial(torch.softmax(logits.double(), -1), 1, generator=generator)
        seq = torch.cat([seq, nxt.to(seq.dtype)], 1)
    return seq


@torch.no_grad()
def _perplexity(model: HookedTransformer, seqs: Tensor, start: int) -> Tensor:
    """The unsteered model's perplexity of each row of ``seqs`` [batch, pos] from position
    ``start`` on: exp of the mean negative log-likelihood per token, [batch]."""
    logp = torch.log_softmax(model(seqs)[:, start - 1 : -1].double(), -1)
    return (-logp.gather(2, seqs[:, start:, None]).mean((1, 2))).exp()


@torch.no_grad()
def greedy_continuation(
    model: HookedTransformer,
    tokens: Tensor,
    intervention: Intervention | None = None,
    n_tokens: int = 8,
) -> Tensor:
    """``tokens`` followed by ``n_tokens`` greedy tokens generated with ``intervention``
    applied (every forward pass sees the whole sequence, so an ``@last`` edit steers each new
    prediction position and nothing else)."""
    seq = _prompt_with_room(model, tokens, n_tokens)
    with intervention.apply(model) if intervention is not None else nullcontext():
        return _continue(model, seq, n_tokens, None)[0]


@torch.no_grad()
def continuation_perplexity(
    model: HookedTransformer,
    tokens: Tensor,
    intervention: Intervention | None = None,
    n_tokens: int = 8,
) -> float:
    """Fluency: the unsteered model's perplexity (exp of the mean negative log-likelihood per
    token) of the :func:`greedy_continuation` generated under ``intervention``."""
    seq = greedy_continuation(model, tokens, intervention, n_tokens)
    return float(_perplexity(model, seq[None], tokens.numel())[0])


@torch.no_grad()
def generation_measures(
    model: HookedTransformer,
    tokens: Tensor,
    intervention: Intervention | None,
    target: int,
    *,
    n_tokens: int = 20,
    samples: int = 4,
    seed: int = 0,
) -> dict[str, float]:
    """What the edit does to generated text: a greedy continuation and ``samples`` sampled ones
    (temperature 1, seeded), ``n_tokens`` each, generated with ``intervention`` applied to every
    pass (an ``@last`` edit so steers each generated token). ``target_first_greedy``: 1.0 if the
    greedy continuation's next word is the target token; ``target_first_sampled``: the fraction
    of sampled continuations whose next word is; ``perplexity_greedy`` /
    ``perplexity_sampled`` (mean over samples): the unsteered model's perplexity of the
    continuations (exp of the mean negative log-likelihood per generated token)."""
    if samples < 1:
        raise InputError(f"samples must be >= 1, got {samples}")
    seq = _prompt_with_room(model, tokens, n_tokens)
    start = seq.shape[1]
    generator = torch.Generator(device=seq.device).manual_seed(seed)
    with intervention.apply(model) if intervention is not None else nullcontext():
        greedy = _continue(model, seq, n_tokens, None)
        sampled = _continue(model, seq.expand(samples, -1), n_tokens, generator)
    return {
        "target_first_greedy": float(greedy[0, start] == target),
        "target_first_sampled": float((sampled[:, start] == target).double().mean()),
        "perplexity_greedy": float(_perplexity(model, greedy, start)[0]),
        "perplexity_sampled": float(_perplexity(model, sampled, start).mean()),
    }


def path_length(
    model: HookedTransformer,
    tokens: Tensor,
    intervention: Intervention,
    off_target: OffTarget | None = None,
    *,
    points: int = 16,
    sub: int = 2,
) -> float:
    """The Fisher length (:func:`steerlens.cost.fisher_length`) of the next-token distribution,
    after ``off_target``'s transform, along the path that brings the model from clean to
    ``intervention``: an iterative method's recorded points (``info["path"]``, from 0 to the
    vector it applies, at one residual site at the last position; each segment sampled at
    ``sub`` evenly spaced points, through the blocks after the site only:
    :class:`~steerlens.metric.local.LocalPath`), otherwise the ray of its scale, s from 0 to
    ``intervention.scale`` at ``points`` evenly spaced points. Either starts at the unsteered
    model (for a clamp, scale 0 is not the clean model). (length / FishBack's)² is ρ along the
    method's own path: the matched protocol's ``rho_own``.

    >>> from steerlens.testing import tiny_model
    >>> model = tiny_model()
    >>> v = torch.ones(model.cfg.d_model, dtype=torch.float64)
    >>> iv = Intervention("v", {"blocks.1.hook_resid_pre": v})
    >>> tokens = torch.tensor([1, 2, 3])
    >>> path_length(model, tokens, iv.scaled(0.0))
    0.0
    >>> path_length(model, tokens, iv) >= path_length(model, tokens, iv, points=1)  # chord
    True
    """
    if points < 1 or sub < 1:
        raise InputError(f"points and sub must be >= 1, got points={points}, sub={sub}")
    recorded = intervention.info.get("path")
    if recorded is None:  # from the unsteered model: a clamp at scale 0 is not clean
        scales = [intervention.scale * k / points for k in range(points + 1)]
        logps = [next_logprobs(model, tokens)]
        logps += [next_logprobs(model, tokens, intervention.scaled(s)) for s in scales]
        return fisher_length(outcome_distribution(lp, off_target) for lp in logps)
    site, vector = _recorded_site(intervention, recorded)
    path = vector.new_tensor(recorded)
    ends = zip(path[:-1], path[1:], strict=True)
    samples = [path[0]] + [a + (b - a) * (k / sub) for a, b in ends for k in range(1, sub + 1)]
    # only the blocks after the site, at the last position: a fraction of a forward pass; the
    # path starts at δ = 0, the clean model
    with LocalPath(model, tokens, site) as local, torch.no_grad():
        x0 = local.x0
        return fisher_length(
            outcome_distribution(local.logits(x0 + v.to(x0)), off_target) for v in samples
        )


def _recorded_site(intervention: Intervention, recorded: Any) -> tuple[str, Tensor]:
    """The one site and vector of an intervention whose ``info["path"]`` is walked, after
    checking that the path starts clean and ends at the vector the intervention applies."""
    name = intervention.method
    if len(intervention.vectors) != 1 or intervention.multipliers or intervention.clamps:
        raise InputError(
            f"{name}: a recorded path walks one vector site; this intervention has "
            f"{len(intervention.vectors)} vectors, {len(intervention.multipliers)} multipliers "
            f"and {len(intervention.clamps)} clamps"
        )
    site, vector = next(iter(intervention.vectors.items()))
    if len(recorded) < 1:
        raise InputError(f"{name}: the recorded path has no points")
    start = vector.new_tensor(recorded[0])
    end = vector.new_tensor(recorded[-1])
    applied = intervention.scale * vector
    tol = 1e-6 * max(float(applied.norm()), 1.0)
    if float(start.norm()) > tol or float((end - applied).norm()) > tol:
        raise InputError(
            f"{name}: the recorded path (info['path']) must start at 0 and end at the vector the "
            f"intervention applies (scale × vector); it ends {float((end - applied).norm()):.3g} "
            "away. A rescaled or edited intervention keeps its old path: drop info['path'] to "
            "measure the ray of its scale instead"
        )
    return site, vector


def _kl(logp: Tensor, logq: Tensor) -> float:
    return float((logp.exp() * (logp - logq)).sum().clamp_min(0))


def _merge(logp: Tensor, merge: dict[int, int]) -> Tensor:
    p = logp.exp()
    bases = torch.tensor(list(merge), dtype=torch.long, device=p.device)
    targets = torch.tensor(list(merge.values()), dtype=torch.long, device=p.device)
    merged = p.clone()
    merged.index_add_(0, targets, p[bases])
    keep = torch.ones_like(p, dtype=torch.bool)
    keep[bases] = False
    return merged[keep].clamp_min(1e-300).log()


def outcome_measures(
    clean: Float[Tensor, " d_vocab"],
    steered: Float[Tensor, " d_vocab"],
    target: int,
    merge: dict[int, int] | None = None,
    top_p: float = 0.999,
    *,
    base: int | None = None,
) -> dict[str, float]:
    """The measures of the module docstring from clean and steered log-probabilities. With
    ``base``, the concept is the pair share q(t)/(q(t) + q(b)) and both tokens leave the
    off-target distribution."""
    keep = torch.ones_like(clean, dtype=torch.bool)
    keep[target] = False
    if base is not None:
        keep[base] = False
    p, q = torch.log_softmax(clean[keep], -1), torch.log_softmax(steered[keep], -1)
    order = torch.argsort(p, descending=True)
    mass = torch.cumsum(p[order].exp(), 0)
    top = order[: int((mass < top_p).sum()) + 1]
    rank_p = torch.empty_like(p)
    rank_p[order] = torch.arange(1, p.shape[0] + 1, dtype=p.dtype, device=p.device)
    rank_q = torch.empty_like(q)
    rank_q[torch.argsort(q, descending=True)] = torch.arange(
        1, q.shape[0] + 1, dtype=q.dtype, device=q.device
    )
    rr = float((1 / rank_p[top] - 1 / rank_q[top]).abs().mean())
    prob = steered[target].exp()
    if base is not None:
        prob = prob / (prob + steered[base].exp())
    out = {
        "probability": float(prob),
        "off_target_kl": _kl(p, q),
        "off_target_kl_merged": math.nan,
        "kl_full": _kl(clean, steered),
        "p_target": float(steered[target].exp()),
        "p_base": math.nan if base is None else float(steered[base].exp()),
        "pair_mass": math.nan,
        "rr_diff": rr,
    }
    if base is not None:
        out["pair_mass"] = out["p_target"] + out["p_base"]
    if merge:
        out["off_target_kl_merged"] = _kl(_merge(clean, merge), _merge(steered, merge))
    return out


@dataclass(frozen=True)
class StrengthMatch:
    """Where a fixed direction's scale first reaches a target share, or why it does not.

    ``reason``: ``"crossed on the grid"`` (a grid point reached it; the first such crossing was
    bisected), ``"crossed between grid points"`` (no grid point did, but refining the grid's
    peak did), or ``"never reached"`` (no grid point nor the refined peak reached it; ``scale``
    is then the peak's scale, where the share is highest: a window narrower than the grid's
    spacing and away from its peak cannot be told from none). ``peak_share`` / ``peak_scale``:
    the highest share seen and where; ``evaluations``: how many scales were tried (for every
    target together)."""

    target: float
    scale: float
    reached: bool
    reason: str
    peak_share: float
    peak_scale: float
    evaluations: int


def strength_grid(max_scale: float = 256.0, min_scale: float = 1 / 16, per_octave: int = 4):
    """0, then ``per_octave`` geometric steps per doubling from ``min_scale`` to ``max_scale``."""
    if not 0 < min_scale < max_scale:
        raise InputError(f"need 0 < min_scale < max_scale, got {min_scale}, {max_scale}")
    if per_octave < 1:
        raise InputError(f"per_octave must be >= 1, got {per_octave}")
    n = math.ceil(per_octave * math.log2(max_scale / min_scale))
    return [0.0] + [min_scale * (max_scale / min_scale) ** (i / n) for i in range(n + 1)]


def strength_search(
    probability: Callable[[float], float],
    targets: Sequence[float],
    *,
    max_scale: float = 256.0,
    min_scale: float = 1 / 16,
    per_octave: int = 4,
    tol: float = 1e-4,
    iters: int = 30,
) -> dict[float, StrengthMatch]:
    """For each target, the smallest scale on a fine grid (:func:`strength_grid`) whose
    ``probability`` reaches it, bisected against the grid point before it until the upper end is
    within ``tol`` above the target (or ``iters`` halvings). A share need not rise monotonically
    with the scale (CAA's does not), so the grid is walked in full instead of doubling until a
    first success; where no grid point reaches a target, the interval around the grid's peak is
    refined (golden section) in case a narrow window lies between grid points. Every scale is
    evaluated at most once for all targets together.

    >>> out = strength_search(lambda s: s / 10, [0.5])
    >>> m = out[0.5]
    >>> m.reached and 5.0 <= m.scale < 5.001, m.reason
    (True, 'crossed on the grid')
    >>> window = strength_search(lambda s: 0.9 * math.exp(-((s - 3.1) ** 2) / 0.002), [0.5])
    >>> window[0.5].reached, window[0.5].reason
    (True, 'crossed between grid points')
    """
    if not targets or any(not 0 < t < 1 for t in targets):
        raise InputError(f"target probabilities must be in (0, 1), got {list(targets)}")
    grid = strength_grid(max_scale, min_scale, per_octave)
    seen: dict[float, float] = {}

    def at(scale: float) -> float:
        if scale not in seen:
            seen[scale] = float(probability(scale))
        return seen[scale]

    shares = [at(s) for s in grid]
    peak = int(np.argmax(shares))
    lo_i, hi_i = max(peak - 1, 0), min(peak + 1, len(grid) - 1)
    a, b = grid[lo_i], grid[hi_i]
    golden = (math.sqrt(5) - 1) / 2
    for _ in range(24 if max(targets) > shares[peak] else 0):
        c, d = b - golden * (b - a), a + golden * (b - a)
        if at(c) >= at(d):
            b = d
        else:
            a = c
    best_scale = max(seen, key=lambda s: seen[s])
    out = {}
    for target in targets:
        first = next((i for i, p in enumerate(shares) if p >= target), None)
        if first is not None:
            lo, hi, reason = grid[max(first - 1, 0)], grid[first], "crossed on the grid"
        elif seen[best_scale] >= target:
            lo, hi, reason = grid[lo_i], best_scale, "crossed between grid points"
        else:
            out[target] = StrengthMatch(
                target, best_scale, False, "never reached", seen[best_scale], best_scale, 0
            )
            continue
        if hi == 0.0:
            out[target] = StrengthMatch(target, 0.0, True, reason, seen[best_scale], best_scale, 0)
            continue
        p_hi = at(hi)
        for _ in range(iters):
            if p_hi - target <= tol:
                break
            mid = (lo + hi) / 2
            if at(mid) >= target:
                hi, p_hi = mid, seen[mid]
            else:
                lo = mid
        out[target] = StrengthMatch(target, hi, True, reason, seen[best_scale], best_scale, 0)
    return {t: replace(m, evaluations=len(seen)) for t, m in out.items()}


def match_strength(
    probability: Callable[[float], float],
    target: float,
    *,
    max_scale: float = 256.0,
    iters: int = 30,
    tol: float = 1e-4,
) -> tuple[float, bool]:
    """(scale, reached) of :func:`strength_search` for one target: the first scale on its grid
    up to ``max_scale`` where ``probability`` reaches ``target``, bisected to ``tol``; where it
    never does, (the scale of the highest probability seen, False).

    >>> scale, ok = match_strength(lambda s: s / 10, 0.5)
    >>> ok and 5.0 <= scale < 5.001
    True
    """
    if not 0 < target < 1:
        raise InputError(f"target probability must be in (0, 1), got {target}")
    found = strength_search(probability, [target], max_scale=max_scale, iters=iters, tol=tol)
    return found[target].scale, found[target].reached


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


#: the divergences every ratio table reports side by side, with their short names: the
#: complement of the pair (base and target removed, the rest renormalized: the distribution
#: whose Fisher metric FishBack descends by default), the pair merge (each base token's mass
#: merged into its target, Park et al.'s definition, which FishBack does not descend) and the
#: whole next-token distribution
KL_MEASURES: dict[str, str] = {
    "off_target_kl": "complement KL",
    "off_target_kl_merged": "pair-merge KL",
    "kl_full": "whole-distribution KL",
}


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
    frame: Any = records
    if measures is None:
        measures = [m for m in KL_MEASURES if m in frame]
    missing = [c for c in [*measures, *by] if c not in frame]
    if missing:
        raise InputError(f"records have no column(s) {missing}; they have {list(frame.columns)}")
    if not 0 < level < 1:
        raise InputError(f"level must be in (0, 1), got {level}")
    keys = ["concept", "layer", "context", "target_probability"]
    base = frame[(frame["method"] == baseline) & frame["reached"]][keys + list(measures)]
    others = frame[(frame["method"] != baseline) & frame["reached"]]
    paired = others.merge(base, on=keys, suffixes=("", "_baseline"))
    rng = np.random.default_rng(seed)
    tail = (1 - level) / 2
    rows = []
    for measure in measures:
        ratio = paired[measure] / paired[f"{measure}_baseline"]
        ok = paired[ratio.gt(0) & np.isfinite(ratio)].assign(_log=np.log(ratio))
        for key, group in ok.groupby(list(by), sort=True):
            head = dict(zip(by, key if isinstance(key, tuple) else (key,), strict=True))
            sums = group.groupby("context")["_log"].agg(["sum", "count"]).to_numpy()
            lo = hi = math.nan
            if len(sums) >= 2:
                pick = rng.integers(0, len(sums), (n_boot, len(sums)))
                means = sums[pick, 0].sum(1) / sums[pick, 1].sum(1)
                lo, hi = (float(np.exp(np.quantile(means, q))) for q in (tail, 1 - tail))
            logs = group["_log"].to_numpy()
            rows.append(
                head
                | {
                    "measure": measure,
                    "runs": len(group),
                    "contexts": len(sums),
                    "ratio": float(np.exp(logs.mean())),
                    "ratio_ci_low": lo,
                    "ratio_ci_high": hi,
                    "median_ratio": float(np.exp(np.median(logs))),
                    "baseline_ahead": float((logs > 0).mean()),
                }
            )
    return pd.DataFrame(rows)


def ratio_table(
    ratios: pd.DataFrame, by: Sequence[str] = ("method", "layer"), baseline: str = "fishback"
) -> pd.DataFrame:
    """:func:`paired_ratios` laid out for reading: one row per group of ``by``, and per measure
    the ratio over ``baseline`` with its interval and in how many runs the baseline paid less,
    side by side."""
    frame: Any = ratios
    parts = []
    for measure, group in frame.groupby("measure", sort=False):
        name = KL_MEASURES.get(str(measure), str(measure))
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
