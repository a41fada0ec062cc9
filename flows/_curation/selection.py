"""Which rows to label next: k-centre greedy (farthest-point) selection over the sketch.

Greedy k-centre picks, again and again, the row farthest from everything picked so far, so the
picks cover the data: every row lies within the *coverage radius* (the largest distance of any row
to its nearest pick) of a pick, and the radius is within twice the best possible. Rows that are a
duplicate group's non-representative members are never picked (their representative stands for
them); rows already labelled can be given as picks to start from.

The greedy is exact, but does not pass over every row once per pick: after a pass has updated
every row's distance to the picks, the `POOL_ROWS` farthest rows are a pool, and picks are taken
from the pool (updating only the pool) as long as the pool's farthest row is at least as far as the
pool's threshold — the farthest any row outside it can be, since distances only shrink. Then one
pass (a matrix product with the new picks) updates every row. Same picks, a few passes instead of
one per pick.
"""

from __future__ import annotations

import numpy as np

from .sketch import Sketch

__all__ = ["POOL_ROWS", "Selection", "k_centre"]

#: The farthest rows picks are taken from between passes over every row.
POOL_ROWS = 8_192
#: Rows compared with the new picks at once in a pass.
PASS_BLOCK = 131_072


class Selection:
    """The picks, in order, and the coverage radius (cosine distance) after them."""

    def __init__(self, picks: list[int], radius: float, passes: int) -> None:
        self.picks = picks
        self.radius = radius
        self.passes = passes


def k_centre(sketch: Sketch, budget: int, eligible: np.ndarray, start: list[int] | None = None) -> Selection:
    """Pick up to ``budget`` rows among ``eligible`` (a mask) by greedy k-centre over the sketch.

    The first pick is the eligible row nearest the mean of all rows, unless ``start`` gives rows
    already chosen (they count as picks, and are not returned).
    """
    nearest = np.full(sketch.rows, np.inf, dtype=np.float32)  # squared distance to the nearest pick
    picks: list[int] = []
    passes = 0
    candidates = int(eligible.sum())
    if sketch.rows == 0:
        return Selection([], 0.0, 0)
    if start:
        _update(sketch, nearest, np.asarray(start, dtype=np.int64))
        passes += 1
    elif budget > 0 and candidates:
        first = _central(sketch, eligible)
        picks.append(first)
        _update(sketch, nearest, np.array([first]))
        passes += 1
    while len(picks) < min(budget, candidates):
        score = np.where(eligible, nearest, -np.inf)
        size = min(POOL_ROWS, candidates)
        pool = np.argpartition(-score, size - 1)[:size]
        threshold = -np.inf if size == candidates else float(score[pool].min())
        values = sketch.take(pool)
        norms = sketch.norms[pool]
        distance = score[pool].copy()
        chosen: list[int] = []
        while len(picks) + len(chosen) < budget:
            best = int(np.argmax(distance))
            if distance[best] <= 0.0 or distance[best] < threshold:
                break
            chosen.append(int(pool[best]))
            squared = norms + norms[best] - 2.0 * (values @ values[best])
            np.minimum(distance, np.maximum(squared, 0.0), out=distance)
            distance[best] = -np.inf
        if not chosen:  # every eligible row coincides with a pick
            break
        picks.extend(chosen)
        _update(sketch, nearest, np.asarray(chosen, dtype=np.int64))
        passes += 1
    radius = float(np.sqrt(max(0.0, float(nearest.max())))) if np.isfinite(nearest).all() else float("inf")
    return Selection(picks, radius * radius / 2.0, passes)  # squared chord / 2 = cosine distance


def _central(sketch: Sketch, eligible: np.ndarray) -> int:
    total = np.zeros(sketch.values.shape[1], dtype=np.float64)
    for start in range(0, sketch.rows, PASS_BLOCK):
        total += sketch.span(start, start + PASS_BLOCK).sum(axis=0, dtype=np.float64)
    mean = (total / sketch.rows).astype(np.float32)
    best, best_row = np.inf, -1
    for start in range(0, sketch.rows, PASS_BLOCK):
        values = sketch.span(start, start + PASS_BLOCK)
        squared = sketch.norms[start : start + len(values)] - 2.0 * values @ mean
        squared[~eligible[start : start + len(values)]] = np.inf
        here = int(np.argmin(squared))
        if squared[here] < best:
            best, best_row = float(squared[here]), start + here
    return best_row


def _update(sketch: Sketch, nearest: np.ndarray, picks: np.ndarray) -> None:
    """Every row's squared distance to its nearest pick, with ``picks`` added."""
    centres = sketch.take(picks)
    centre_norms = sketch.norms[picks]
    for start in range(0, sketch.rows, PASS_BLOCK):
        values = sketch.span(start, start + PASS_BLOCK)
        squared = sketch.norms[start : start + len(values), None] + centre_norms[None, :] - 2.0 * values @ centres.T
        np.minimum(
            nearest[start : start + len(values)],
            np.maximum(squared.min(axis=1), 0.0),
            out=nearest[start : start + len(values)],
        )
