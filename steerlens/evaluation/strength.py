"""Matching strength: the scale at which a fixed-direction method first reaches a target
share, found on a fine grid and bisected.

Iterative methods stop at the target themselves (one run serves every target through
checkpoints); a fixed-direction method's scale is found here. A context where a method cannot
reach a target (within ``max_scale``) is a row with ``reached=False``, never dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from steerlens.errors import InputError


@dataclass(frozen=True)
class StrengthMatch:
    """Where a fixed direction's scale first reaches a target share, or why it does not.

    ``reason``: ``"crossed on the grid"`` (a grid point reached it; the first such crossing was
    bisected), ``"crossed between grid points"`` (no grid point did, but refining the grid's
    peak did), or ``"never reached"`` (no grid point nor the refined peak reached it; ``scale``
    is then the peak's scale, where the share is highest: a window narrower than the grid's
    spacing and away from its peak cannot be told from none). ``peak_share`` / ``peak_scale``:
    the highest share seen and where; ``evaluations``: how many scales were tried (for every
    target together); ``grid_end``: the grid's last scale (beyond ``max_scale`` where the grid
    was extended: :func:`strength_search`'s ``extend_to``)."""

    target: float
    scale: float
    reached: bool
    reason: str
    peak_share: float
    peak_scale: float
    evaluations: int
    grid_end: float = math.nan


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
    many: Callable[[Sequence[float]], Sequence[float]] | None = None,
    extend_to: float | None = None,
) -> dict[float, StrengthMatch]:
    """For each target, the smallest scale on a fine grid (:func:`strength_grid`) whose
    ``probability`` reaches it, bisected against the grid point before it until the upper end is
    within ``tol`` above the target (or ``iters`` halvings). A share need not rise monotonically
    with the scale (CAA's does not), so the grid is walked in full instead of doubling until a
    first success; where no grid point reaches a target, the interval around the grid's peak is
    refined (golden section) in case a narrow window lies between grid points. Every scale is
    evaluated at most once for all targets together. ``many``, if given, evaluates
    ``probability`` at many scales in one call (e.g. batched); the grid is walked with it.

    ``extend_to``: where the share peaks at the grid's last point short of the highest target
    (it is still rising at the end), the grid is extended an octave at a time (``per_octave``
    points each, the last one capped at ``extend_to``) until the peak is no longer the last
    point, the highest target is reached, or the grid reaches ``extend_to``.

    >>> out = strength_search(lambda s: s / 10, [0.5])
    >>> m = out[0.5]
    >>> m.reached and 5.0 <= m.scale < 5.001, m.reason
    (True, 'crossed on the grid')
    >>> far = strength_search(lambda s: s / 1000, [0.5], extend_to=4096.0)
    >>> far[0.5].reached, far[0.5].grid_end, strength_search(lambda s: s / 1000, [0.5])[0.5].reached
    (True, 512.0, False)
    >>> window = strength_search(lambda s: 0.9 * math.exp(-((s - 3.1) ** 2) / 0.002), [0.5])
    >>> window[0.5].reached, window[0.5].reason
    (True, 'crossed between grid points')
    """
    if not targets or any(not 0 < t < 1 for t in targets):
        raise InputError(f"target probabilities must be in (0, 1), got {list(targets)}")
    if extend_to is not None and not extend_to > 0:
        raise InputError(f"extend_to must be a positive scale, got {extend_to}")
    grid = strength_grid(max_scale, min_scale, per_octave)
    seen: dict[float, float] = {}

    def at(scale: float) -> float:
        if scale not in seen:
            seen[scale] = float(probability(scale))
        return seen[scale]

    if many is not None:
        seen.update(zip(grid, (float(p) for p in many(grid)), strict=True))
    shares = [at(s) for s in grid]
    peak = int(np.argmax(shares))
    while (
        extend_to is not None
        and peak == len(grid) - 1
        and shares[peak] < max(targets)
        and grid[-1] < extend_to
    ):
        end = grid[-1]
        steps = range(1, per_octave + 1)
        more = sorted({min(end * 2 ** (i / per_octave), extend_to) for i in steps})
        if many is not None:
            seen.update(zip(more, (float(p) for p in many(more)), strict=True))
        grid += more
        shares += [at(s) for s in more]
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
    return {t: replace(m, evaluations=len(seen), grid_end=grid[-1]) for t, m in out.items()}


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
