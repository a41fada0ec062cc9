"""Uniqueness: how far a row lies from its nearest neighbours, as FiftyOne Brain defines it.

FiftyOne Brain's ``compute_uniqueness`` takes each sample's cosine distances to its 3 nearest
neighbours, weights them 0.6 / 0.3 / 0.1, averages, and divides by the largest such value: 1 is the
most unique row, near 0 a row with close copies. The same formula over `neighbours`' distances.
"""

from __future__ import annotations

import numpy as np

__all__ = ["WEIGHTS", "uniqueness"]

#: Weights of the 1st, 2nd and 3rd nearest neighbour's distance.
WEIGHTS = np.array([0.6, 0.3, 0.1], dtype=np.float64)


def uniqueness(distances: np.ndarray) -> np.ndarray:
    """Scores in [0, 1] from ``(rows, 3)`` cosine distances to the nearest rows, nearest first.

    With 3 rows or fewer every row scores 1, as in FiftyOne Brain.

    Examples:
        >>> uniqueness(np.array([[0.1, 0.2, 0.3], [0.2, 0.4, 0.6]])).round(2).tolist()
        [0.5, 1.0]
    """
    if len(distances) <= len(WEIGHTS):
        return np.ones(len(distances), dtype=np.float32)
    raw = (np.asarray(distances, dtype=np.float64) * WEIGHTS).mean(axis=1)
    top = raw.max()
    return (raw / top if top > 0 else np.zeros_like(raw)).astype(np.float32)
