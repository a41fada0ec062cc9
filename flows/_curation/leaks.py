"""Leaks between splits: a row with a near copy in another split (FiftyOne Brain's leaky splits).

A row leaks when a row of another split is an exact copy of it (one sha256 and detection) or a
neighbour whose cosine similarity, from the index's vectors, reaches ``leak_threshold``. Each
leaking row names its most similar partner in another split. Rows without a split never leak.
"""

from __future__ import annotations

import numpy as np

__all__ = ["leaks"]


def leaks(splits: np.ndarray, keys: np.ndarray, pairs: np.ndarray, similarities: np.ndarray) -> np.ndarray:
    """Each row's partner in another split (-1: no leak).

    Args:
        splits: Each row's split code (-1: none).
        keys: Each row's exact-copy key (sha256 and detection; -1: none).
        pairs: Confirmed near pairs ``(a, b)`` at or above the leak threshold.
        similarities: Their cosine similarity.
    """
    rows = len(splits)
    a, b, s = _copy_partners(splits, keys)
    across = (splits[pairs[:, 0]] != splits[pairs[:, 1]]) & (splits[pairs[:, 0]] >= 0) & (splits[pairs[:, 1]] >= 0)
    near = pairs[across]
    row = np.concatenate([a, near[:, 0], near[:, 1]])
    partner = np.concatenate([b, near[:, 1], near[:, 0]])
    similarity = np.concatenate([s, similarities[across], similarities[across]])
    out = np.full(rows, -1, dtype=np.int64)
    if len(row):
        order = np.lexsort((partner, -similarity, row))  # per row: most similar first, then lowest partner
        first = np.unique(row[order], return_index=True)[1]
        out[row[order][first]] = partner[order][first]
    return out


def _copy_partners(splits: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For rows whose exact copies span several splits: a copy in another split (similarity 1)."""
    rows = np.flatnonzero((keys >= 0) & (splits >= 0))
    if len(rows) == 0:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, np.empty(0, dtype=np.float32)
    order = rows[np.lexsort((rows, splits[rows], keys[rows]))]  # by key, then split, then row
    key, split = keys[order], splits[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    ends = np.r_[starts[1:], len(order)] - 1
    group = np.cumsum(np.r_[True, key[1:] != key[:-1]]) - 1
    low_split, high_split = split[starts][group], split[ends][group]
    spans = low_split != high_split
    partner = np.where(split == low_split, order[ends][group], order[starts][group])
    return order[spans], partner[spans], np.ones(int(spans.sum()), dtype=np.float32)
