"""Near-duplicate groups, as `find_duplicates` defines them: the connected components of exact
copies (one sha256 and detection) and of neighbour pairs whose cosine similarity reaches the threshold.

The candidate pairs come from `neighbours` (each row's ``k`` nearest over the sketch, pairs at or
above a floor below the threshold); their similarity is then taken from the index's own vectors
(`exact_similarity`), so a group is never joined on an estimate. Components come from
`scipy.sparse.csgraph.connected_components`; a group's representative is its lowest row number,
as in `find_duplicates`, so a chain of near copies forms one group with a stable representative.
"""

from __future__ import annotations

import numpy as np

from ..vector_index import VectorIndex

__all__ = ["PAIR_BLOCK", "copy_pairs", "exact_similarity", "groups"]

#: Pairs whose vectors are read at once (at most twice as many rows: one ``pread`` run each).
PAIR_BLOCK = 1_000


def exact_similarity(index: VectorIndex, pairs: np.ndarray) -> np.ndarray:
    """The cosine similarity of each pair of rows, from the index's stored (unit) vectors."""
    out = np.empty(len(pairs), dtype=np.float32)
    for start in range(0, len(pairs), PAIR_BLOCK):
        block = pairs[start : start + PAIR_BLOCK]
        rows, where = np.unique(block, return_inverse=True)
        vectors = index.vectors(rows)
        where = where.reshape(block.shape)
        out[start : start + len(block)] = np.einsum("nd,nd->n", vectors[where[:, 0]], vectors[where[:, 1]])
    return np.clip(out, -1.0, 1.0)


def copy_pairs(keys: np.ndarray) -> np.ndarray:
    """Pairs joining each row to the first row of its key (-1: no key), as ``(first, row)``."""
    rows = np.flatnonzero(keys >= 0)
    if len(rows) == 0:
        return np.empty((0, 2), dtype=np.int64)
    order = rows[np.argsort(keys[rows], kind="stable")]
    sorted_keys = keys[order]
    starts = np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]
    first = order[np.flatnonzero(starts)][np.cumsum(starts) - 1]
    linked = first != order
    return np.stack([first[linked], order[linked]], axis=1).astype(np.int64)


def groups(rows: int, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(group, representative)`` per row: a dense group number and the group's lowest row, both -1
    for a row in no pair."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    group = np.full(rows, -1, dtype=np.int64)
    representative = np.full(rows, -1, dtype=np.int64)
    if len(pairs) == 0:
        return group, representative
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(rows, rows))
    _, component = connected_components(graph, directed=False)
    lowest = np.full(component.max() + 1, rows, dtype=np.int64)
    np.minimum.at(lowest, component, np.arange(rows))
    sizes = np.bincount(component)
    grouped = sizes[component] > 1
    # groups numbered by their representative's row: the same rows give the same numbers
    numbered = np.unique(lowest[component[grouped]])
    group[grouped] = np.searchsorted(numbered, lowest[component[grouped]])
    representative[grouped] = lowest[component[grouped]]
    return group, representative
