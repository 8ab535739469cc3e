"""The Fisher factor of the output distribution, in the coordinates of the unembedding's input.

The next-token distribution p = softmax(z), z = u W_U + b_U (optionally soft-capped), is first
mapped to a distribution q over *outcomes*: each outcome is a set of tokens (a singleton by
default), and tokens outside every outcome are dropped and q renormalized. This one construction
gives the plain metric, the off-target metric of a token set (its complement, renormalized), and
the dual-steering pair merge (each base token's mass merged into its target).

With m_A = W_U (s ⊙ p)|_A (s the soft-cap derivative, 1 without a cap), P_A = Σ_{y∈A} p_y and the
universe U = ∪ outcomes, Z = P_U, the Fisher factor row of outcome j is

    √q_j ∇_u log q_j = √q_j (m_j / P_j − m_U / Z),

so only the kept outcomes' columns of W_U are touched. ``vocab="auto"`` keeps the top-K outcomes
holding 1 − ε of q plus one exact "rest" outcome (a coarse-graining: a lower bound on G, exact as
ε → 0); ``vocab="full"`` forms the exact d×d matrix Σ_j q_j μ_j μ_jᵀ − μ_U μ_Uᵀ (cost V·d²) and
factors it.

The *sampled* Fisher instead draws k outcomes y_1..y_k ~ q i.i.d. and keeps the score rows
∇_u log q_{y_i} / √k: since E_{y~q}[∇ log q_y ∇ log q_yᵀ] is the Fisher, their Gram is an unbiased
estimate of it, from k rows whatever the vocabulary (:func:`sampled_factor`). Its rows come from
:func:`outcome_factor`, which weights any given outcomes; weighting every outcome by q_y gives
the exact metric, which is how the tests check the estimator's expectation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from steerlens.errors import ConceptError, InputError
from steerlens.metric.info import MetricInfo

VOCAB_MODES = ("auto", "full")
#: dtypes the top-K Gram can be formed in (``precision`` of :func:`unembed_factor`)
PRECISIONS = ("float64", "float32")


def check_precision(precision: str) -> None:
    """Raise :class:`InputError` unless ``precision`` is one of :data:`PRECISIONS`."""
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")


#: the default probability mass left out of the top-K outcomes. Once K + 1 > d the factor is
#: compressed to d rows anyway, so a smaller dropped mass costs only the K×d Gram; its error
#: against ``vocab="full"`` over every site is in ``bench/results/metric_sweep.md``.
DEFAULT_DROPPED_MASS = 1e-4


@dataclass(frozen=True)
class OffTarget:
    """A transform of the next-token distribution before its Fisher metric is taken.

    ``exclude``: token ids dropped, the rest renormalized (the off-target distribution of a
    token-set concept). ``merge``: (base, target) id pairs; each base token's mass is merged into
    its target and the base dropped (the dual-steering definition).

    >>> OffTarget.complement([3, 5]).name
    'complement of 2 tokens'
    """

    exclude: tuple[int, ...] = ()
    merge: tuple[tuple[int, int], ...] = ()

    @classmethod
    def complement(cls, token_ids: Iterable[int]) -> OffTarget:
        ids = tuple(sorted({int(t) for t in token_ids}))
        if not ids:
            raise ConceptError("the off-target complement needs at least one token id")
        return cls(exclude=ids)

    @classmethod
    def pair_merge(cls, pairs: Mapping[int, int] | Iterable[tuple[int, int]]) -> OffTarget:
        items: list[Any] = list(pairs.items()) if isinstance(pairs, Mapping) else list(pairs)
        merged = tuple((int(b), int(t)) for b, t in items)
        if not merged:
            raise ConceptError("the pair merge needs at least one (base, target) pair")
        bases = {b for b, _ in merged}
        if bases & {t for _, t in merged}:
            raise ConceptError("a token cannot be both a base and a target in a pair merge")
        return cls(merge=merged)

    @property
    def name(self) -> str:
        parts = []
        if self.exclude:
            parts.append(f"complement of {len(self.exclude)} tokens")
        if self.merge:
            parts.append(f"merge of {len(self.merge)} pairs")
        return " + ".join(parts) or "none"

    def check(self, d_vocab: int) -> None:
        ids = list(self.exclude) + [i for pair in self.merge for i in pair]
        bad = [i for i in ids if not 0 <= i < d_vocab]
        if bad:
            raise InputError(f"token ids {bad[:5]} are out of range for a vocabulary of {d_vocab}")
        if set(self.exclude) >= set(range(d_vocab)):
            raise ConceptError("the off-target transform excludes the whole vocabulary")


def complement_kl(
    clean: Float[Tensor, " d_vocab"], steered: Float[Tensor, " d_vocab"], exclude: Iterable[int]
) -> float:
    """KL(p ‖ q) in nats between two next-token distributions (given as logits or
    log-probabilities) renormalized on every token but ``exclude``: the off-target KL of a
    token-set concept.

    >>> round(complement_kl(torch.tensor([0.0, 0.0, 9.0]), torch.tensor([0.0, 1.0, 0.0]), [2]), 4)
    0.1201
    """
    keep = torch.ones_like(clean, dtype=torch.bool)
    keep[list(exclude)] = False
    p = torch.log_softmax(clean[keep].double(), -1)
    q = torch.log_softmax(steered[keep].double(), -1)
    return float((p.exp() * (p - q)).sum().clamp_min(0))


def outcome_distribution(
    logits: Float[Tensor, " d_vocab"], off: OffTarget | None = None
) -> Float[Tensor, " d_vocab"]:
    """The next-token distribution after ``off``'s transform (float64, on the vocabulary's
    indices; dropped and merged-away tokens hold 0): the distribution whose Fisher metric the
    engine pulls back and whose KL the protocol measures.

    >>> outcome_distribution(torch.tensor([0.0, 0.0, 9.0]), OffTarget.complement([2])).tolist()
    [0.5, 0.5, 0.0]
    """
    mass, _, _ = _outcomes(torch.softmax(logits.double(), -1), off)
    return mass / mass.sum()


def _outcomes(
    p: Float[Tensor, " d_vocab"], off: OffTarget | None
) -> tuple[Tensor, Int[Tensor, " d_vocab"], list[tuple[int, int]]]:
    """Outcome masses keyed by representative token, the representative of each token (-1 if
    dropped), and the merged (member, representative) pairs."""
    vocab = p.shape[0]
    rep = torch.arange(vocab, device=p.device)
    merged: list[tuple[int, int]] = []
    if off is not None:
        off.check(vocab)
        if off.exclude:
            rep[list(off.exclude)] = -1
        for base, target in off.merge:
            if rep[target] >= 0:
                rep[base] = target
                merged.append((base, target))
            else:
                rep[base] = -1
    keep = rep >= 0
    mass = torch.zeros_like(p).index_add_(0, rep[keep], p[keep])
    return mass, rep, merged


def unembed_factor(
    logits: Float[Tensor, " d_vocab"],
    w_u: Float[Tensor, "d_model d_vocab"],
    *,
    vocab: str = "auto",
    dropped_mass: float = DEFAULT_DROPPED_MASS,
    off_target: OffTarget | None = None,
    softcap: float | None = None,
    precision: str = "float64",
) -> tuple[Float[Tensor, "n_rows d_model"], MetricInfo]:
    """Fisher factor rows of the (transformed) next-token distribution w.r.t. the unembedding
    input u, in float64, and what was kept (``vocab``, ``dropped_mass``, ``top_k``,
    ``off_target``).

    ``precision="float32"`` forms the top-K columns and their d×d Gram in float32 (cheaper;
    timings in ``bench/results/fishback_floor.md``): its absolute error, ~1e-7 of the top
    eigenvalue, is harmless under a damped solve (FishBack's ridge is 1e-2 of the mean
    eigenvalue) but not for the smallest eigenvalues, so the metric engine keeps float64."""
    if vocab not in VOCAB_MODES:
        raise InputError(f"unknown vocab mode {vocab!r}; valid: {VOCAB_MODES}")
    check_precision(precision)
    if not 0 <= dropped_mass < 1:
        raise InputError(f"dropped_mass must be in [0, 1), got {dropped_mass}")
    named = off_target.name if off_target else None
    logits = logits.double()
    # By default everything in float64: the metric's spectrum spans ~12 decades and some sites
    # (single heads) live in its small directions, where a float32 Gram's absolute error (~1e-7
    # of the top eigenvalue) is a large relative error. W_U is promoted in vocabulary chunks.
    w = w_u
    p = torch.softmax(logits, -1)
    s = 1 - (logits / softcap).pow(2) if softcap else torch.ones_like(p)
    sp = s * p
    mass, rep, merged = _outcomes(p, off_target)
    total = mass.sum()
    if total <= 0:
        raise ConceptError("the off-target distribution has zero probability mass")
    in_u = rep >= 0
    sp_u = torch.where(in_u, sp, torch.zeros_like(sp))
    dt = torch.float32 if precision == "float32" and vocab == "auto" else torch.float64
    m_u = _chunked_matvec(w, sp_u, dt)
    mu_u = m_u / total
    q = mass / total
    if vocab == "full":
        rows = _full_factor(w, sp, s, in_u, merged, mass, total, mu_u)
        return rows, MetricInfo("full", 0.0, int((mass > 0).sum()), off_target=named)
    order = torch.argsort(q, descending=True)
    cum = torch.cumsum(q[order], 0)
    k = int(torch.searchsorted(cum, cum.new_tensor(1 - dropped_mass)).item()) + 1
    k = min(k, int((q > 0).sum()))
    top = order[:k]
    p_top = mass[top]
    p_rest = total - p_top.sum()
    rest_q = float(p_rest / total)
    info = MetricInfo("auto", max(rest_q, 0.0), k, off_target=named)
    gram = k + 1 > w.shape[0]  # then the same metric from at most d rows, via the d×d Gram
    if gram:
        top = top.sort().values  # the Gram ignores order; sorted columns gather faster
        p_top = mass[top]
    # column j of x: √q_j (m_j / P_j − μ_U), m_j = s_j p_j w_j (plus merged members' terms)
    root_q = (p_top / total).sqrt()
    # a tied unembedding is W_E transposed: gather its rows, not strided columns
    x = (w.T[top].T if w.stride(0) < w.stride(1) else w[:, top]).to(dt)
    x *= (sp[top] * root_q / p_top).to(dt)
    pos_in_top = {int(t): i for i, t in enumerate(top.tolist())} if merged else {}
    for base, target in merged:
        if target in pos_in_top:
            i = pos_in_top[target]
            x[:, i] += (w[:, base].double() * sp[base] * root_q[i] / p_top[i]).to(dt)
    x.addr_(mu_u.to(dt), root_q.to(dt), alpha=-1)
    rest = None
    if rest_q > 1e-12:
        if precision == "float64":
            m_rest = m_u - x.double() @ (p_top / root_q) - mu_u * p_top.sum()
        else:  # summed directly: m_u − Σ m_top would cancel to ~1e-7 / p_rest relative error
            in_top = torch.zeros_like(in_u)
            in_top[top] = True
            in_rest = in_u & ~in_top[rep.clamp_min(0)]  # tokens whose outcome is not kept
            m_rest = _chunked_matvec(w, torch.where(in_rest, sp, torch.zeros_like(sp)), dt)
        rest = (p_rest / total).sqrt() * (m_rest / p_rest - mu_u)
    if gram:
        g = (x @ x.T).double()
        if rest is not None:
            g += torch.outer(rest, rest)
        return _gram_factor(g), info
    rows = x.T.double()
    if rest is not None:
        rows = torch.cat([rows, rest.unsqueeze(0)], 0)
    return rows.contiguous(), info


_CHUNK = 8192  # vocabulary columns of W_U promoted at a time


def _chunked_matvec(w: Tensor, v: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """W v in float64, each chunk of ``w``'s columns multiplied in ``dtype`` (a half-precision
    W_U is promoted, never used as it is; one product when ``w`` already has that dtype)."""
    if w.dtype == dtype:
        return (w @ v.to(dtype)).double()
    out = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
    for start in range(0, w.shape[1], _CHUNK):
        chunk = w[:, start : start + _CHUNK].to(dtype)
        out += (chunk @ v[start : start + _CHUNK].to(dtype)).double()
    return out


def _gram_factor(gram: Tensor) -> Tensor:
    """Rows B (at most d, largest first) with BᵀB = ``gram``, from its eigendecomposition."""
    evals, evecs = torch.linalg.eigh((gram + gram.T) / 2)
    evals = evals.clamp_min(0)
    keep = evals > evals.max() * 1e-14
    return (evals[keep].sqrt().unsqueeze(1) * evecs[:, keep].T).flip(0).contiguous()


def _full_factor(
    w: Tensor,
    sp: Tensor,
    s: Tensor,
    in_u: Tensor,
    merged: list[tuple[int, int]],
    mass: Tensor,
    total: Tensor,
    mu_u: Tensor,
) -> Tensor:
    """The exact d×d matrix Σ_j q_j μ_j μ_jᵀ − μ_U μ_Uᵀ over all outcomes, as ≤ d factor rows.

    A singleton outcome y contributes p_y s_y² w_y w_yᵀ; a merged group A contributes
    m_A m_Aᵀ / P_A with m_A = Σ_{y∈A} s_y p_y w_y."""
    single = in_u.clone()
    groups = sorted({t for _, t in merged})
    if groups:
        single[groups] = False
        single[[b for b, _ in merged]] = False
    weights = torch.where(single, sp * s, torch.zeros_like(sp))
    gram = torch.zeros(w.shape[0], w.shape[0], dtype=torch.float64, device=w.device)
    for start in range(0, w.shape[1], _CHUNK):
        chunk = w[:, start : start + _CHUNK].double()
        gram += (chunk * weights[start : start + _CHUNK]) @ chunk.T
    for target in groups:
        members = [target] + [b for b, t in merged if t == target]
        m = w[:, members].double() @ sp[members]
        gram += torch.outer(m, m) / mass[target]
    return _gram_factor(gram / total - torch.outer(mu_u, mu_u))


def outcome_factor(
    logits: Float[Tensor, " d_vocab"],
    w_u: Float[Tensor, "d_model d_vocab"],
    outcomes: Int[Tensor, " n_rows"],
    weights: Float[Tensor, " n_rows"],
    *,
    off_target: OffTarget | None = None,
    softcap: float | None = None,
) -> Float[Tensor, "n_rows d_model"]:
    """Rows √w_j ∇_u log q_{y_j} (float64) for outcomes named by their representative token
    ids (a merge's target stands for its group), so that the rows' Gram is Σ_j w_j s_j s_jᵀ with
    s_j the score of outcome y_j. Weights q_y over every outcome give the exact Fisher; the
    counts of k draws over k give :func:`sampled_factor`. A float32 W_U gives μ_U in float32.

    >>> logits = torch.tensor([0.0, 1.0, 2.0])
    >>> w = torch.eye(3, dtype=torch.float64)
    >>> q = outcome_distribution(logits)
    >>> rows = outcome_factor(logits, w, torch.arange(3), q)
    >>> torch.allclose(rows.T @ rows, torch.diag(q) - torch.outer(q, q))
    True
    """
    p = torch.softmax(logits.double(), -1)
    sp = p * (1 - (logits.double() / softcap).pow(2) if softcap else 1)
    mass, rep, merged = _outcomes(p, off_target)
    total = mass.sum()
    if total <= 0:
        raise ConceptError("the off-target distribution has zero probability mass")
    outcomes = outcomes.to(device=p.device, dtype=torch.long)
    safe = outcomes.clamp(0, p.shape[0] - 1)
    valid = (outcomes == safe) & (rep[safe] == safe) & (mass[safe] > 0)
    if not bool(valid.all()):
        bad = outcomes[~valid][:5].tolist()
        raise InputError(
            f"outcomes {bad} are not outcomes of positive mass: pass representative token ids "
            "that the transform keeps (not dropped, not a merged-away base)"
        )
    # a float32 W_U is not promoted for μ_U (a V×d copy per prompt): its ~1e-7 relative error
    # is far below a sampled estimate's own, and float64 models stay exact
    dt = torch.float64 if w_u.dtype == torch.float64 else torch.float32
    mu_u = _chunked_matvec(w_u, torch.where(rep >= 0, sp, torch.zeros_like(sp)), dt) / total
    # μ_y = m_y / P_y, m_y = Σ_{t in y} s_t p_t w_t: the outcome's own column, then merged members
    cols = w_u[:, outcomes].double() * (sp[outcomes] / mass[outcomes])
    for base, target in merged:
        hit = outcomes == target
        if bool(hit.any()):
            cols[:, hit] += (w_u[:, base].double() * (sp[base] / mass[target])).unsqueeze(1)
    rows = (cols - mu_u.unsqueeze(1)).T
    return (rows * weights.to(rows).sqrt().unsqueeze(1)).contiguous()


def sampled_factor(
    logits: Float[Tensor, " d_vocab"],
    w_u: Float[Tensor, "d_model d_vocab"],
    samples: int,
    generator: torch.Generator,
    *,
    off_target: OffTarget | None = None,
    softcap: float | None = None,
) -> tuple[Float[Tensor, "n_rows d_model"], MetricInfo]:
    """The sampled Fisher factor: ``samples`` outcomes drawn i.i.d. from the model's own
    (transformed) next-token distribution q with ``generator``, one score row per distinct
    outcome weighted by its count / ``samples``. Its Gram is unbiased for the exact Fisher
    (``vocab="full"``) and has at most ``samples`` rows."""
    q = outcome_distribution(logits, off_target)
    draws = torch.multinomial(q, samples, replacement=True, generator=generator)
    outcomes, counts = torch.unique(draws, return_counts=True)
    rows = outcome_factor(
        logits, w_u, outcomes, counts.double() / samples, off_target=off_target, softcap=softcap
    )
    named = off_target.name if off_target else None
    info = MetricInfo("sampled", 0.0, int(outcomes.numel()), off_target=named, samples=samples)
    return rows, info
