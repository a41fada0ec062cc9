"""Every row's nearest neighbours over the sketch, list by list: what uniqueness, duplicates and leaks read.

Rows are split into lists of about `LIST_ROWS` by a two-level k-means of their sketches (a first
level of √lists centres trained on a sample, then each first-level cluster split by its own
k-means), so no step compares all rows with all centres. Each list's rows are then compared
exactly (one BLAS product and a heap, `faiss.knn`) with the rows of the `NPROBE` lists whose
centres are nearest its own: one matrix product per list instead of a search per row. Up to
`EXACT_SEARCH_ROWS` rows everything is one list and the search is exact.

Per row this keeps the cosine distances to its `UNIQUENESS_NEIGHBOURS` nearest rows (self
excluded) and the pairs whose estimated similarity reaches ``floor``: candidates that
`duplicates` and `leaks` confirm with the exact vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from .sketch import Sketch, sample_rows

__all__ = ["LIST_ROWS", "NPROBE", "UNIQUENESS_NEIGHBOURS", "Neighbours", "nearest_neighbours"]

#: Rows per list, on average.
LIST_ROWS = 512
#: Lists each list's rows are compared with, on average (its own included).
NPROBE = 8
#: Neighbours uniqueness weighs (FiftyOne Brain's K = 3).
UNIQUENESS_NEIGHBOURS = 3
#: Rows a k-means is trained on per centre.
TRAIN_PER_CENTRE = 64
#: Up to this many rows every row is compared with every row: the search is exact.
EXACT_SEARCH_ROWS = 32_768
#: A list is split again above this many times `LIST_ROWS` rows.
MAX_LIST_FACTOR = 4
#: Rows each list's rows are compared with, about (`NPROBE` lists of `LIST_ROWS`).
CANDIDATE_ROWS = 4_096
#: Centres near a list's own among which its rows vote, and the votes of each row.
NEAR_CENTRES, VOTES = 64, 4
#: Next-nearest lists each row is also a candidate of.
SPILL = 2


@dataclass
class Neighbours:
    """What the neighbour search kept: distances for uniqueness and candidate pairs."""

    distances: np.ndarray  # (rows, 3) cosine distances to the nearest rows, nearest first
    pairs: np.ndarray  # (m, 2) row numbers, first < second, once each
    similarities: np.ndarray  # (m,) their estimated cosine similarity
    lists: int


def _kmeans(points: np.ndarray, centres: int, seed: int) -> np.ndarray:
    """Centres of ``points`` by faiss's k-means (single-threaded: the cores are shared)."""
    kmeans = faiss.Kmeans(points.shape[1], centres, niter=12, seed=seed, verbose=False)
    kmeans.train(np.ascontiguousarray(points, dtype=np.float32))
    return np.asarray(kmeans.centroids, dtype=np.float32)


def _nearest_centre(sketch: Sketch, rows: np.ndarray | None, centres: np.ndarray) -> np.ndarray:
    """Index of each row's nearest centre (all rows when ``rows`` is None), in blocks."""
    total = sketch.rows if rows is None else len(rows)
    out = np.empty(total, dtype=np.int64)
    for start in range(0, total, 65_536):
        stop = min(total, start + 65_536)
        points = sketch.span(start, stop) if rows is None else sketch.take(rows[start:stop])
        _, found = faiss.knn(points, centres, 1)
        out[start:stop] = found[:, 0]
    return out


def partition(sketch: Sketch, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(order, bounds, centres)``: rows sorted by list, list ``i`` = ``order[bounds[i]:bounds[i+1]]``.

    Two levels of k-means (√lists centres, then each first-level cluster split by its own), and a
    list still over `MAX_LIST_FACTOR` × `LIST_ROWS` rows split once more, so lists stay near
    `LIST_ROWS` and no list's comparisons dominate the run.
    """
    rows = sketch.rows
    lists = rows // LIST_ROWS
    if rows <= EXACT_SEARCH_ROWS or lists <= NPROBE:
        return np.arange(rows), np.array([0, rows]), sketch.take(np.arange(min(rows, 1)))
    first = max(2, int(np.sqrt(lists)))
    sample = sample_rows(rows, min(rows, first * TRAIN_PER_CENTRE * 4))
    coarse = _nearest_centre(sketch, None, _kmeans(sketch.take(sample), first, seed))
    assignment = np.empty(rows, dtype=np.int64)
    centres: list[np.ndarray] = []
    pending = [(members, 1) for members in _members(coarse, first)]
    rng = np.random.default_rng(seed)
    while pending:
        members, depth = pending.pop(0)
        parts = max(1, round(len(members) / LIST_ROWS))
        if parts == 1 or depth > 2:
            assignment[members] = len(centres)
            centres.append(sketch.take(members).mean(axis=0))
            continue
        train = (
            members
            if len(members) <= parts * TRAIN_PER_CENTRE
            else rng.choice(members, parts * TRAIN_PER_CENTRE, replace=False)
        )
        fine = _kmeans(sketch.take(np.sort(train)), parts, seed + len(centres) + 1)
        part_of = _nearest_centre(sketch, members, fine)
        for p, positions in enumerate(_members(part_of, parts)):
            part = members[positions]
            if len(part) > MAX_LIST_FACTOR * LIST_ROWS:
                pending.append((part, depth + 1))
            elif len(part):
                assignment[part] = len(centres)
                centres.append(fine[p])
    order = np.argsort(assignment, kind="stable")
    bounds = np.searchsorted(assignment[order], np.arange(len(centres) + 1))
    return order, bounds, np.vstack(centres).astype(np.float32)


def _members(labels: np.ndarray, count: int) -> list[np.ndarray]:
    """Positions in ``labels`` holding each label ``0..count-1``."""
    order = np.argsort(labels, kind="stable")
    edges = np.searchsorted(labels[order], np.arange(count + 1))
    return [order[edges[i] : edges[i + 1]] for i in range(count)]


def _plan(
    sketch: Sketch, order: np.ndarray, bounds: np.ndarray, centres: np.ndarray
) -> tuple[list[np.ndarray], np.ndarray]:
    """``(probes, spill)``: per list, the lists its rows are compared with (its own first, then
    those its rows' `VOTES` nearest centres name most often, until they hold `CANDIDATE_ROWS` rows);
    per row, its `SPILL` next-nearest lists (-1: none), where it is also a candidate.

    In many dimensions most rows lie near the border of their list's cell, so two near copies
    often fall into neighbouring lists; as each row is also a candidate of its next-nearest
    lists, a near copy across a border is still compared with its original.
    """
    lists, sizes = len(bounds) - 1, np.diff(bounds)
    near_all = faiss.knn(centres, centres, min(lists, NEAR_CENTRES))[1]
    probes: list[np.ndarray] = []
    spill = np.full((sketch.rows, SPILL), -1, dtype=np.int64)
    for here in range(lists):
        queries = order[bounds[here] : bounds[here + 1]]
        near = near_all[here]
        if len(queries) == 0:
            probes.append(np.array([here]))
            continue
        votes = faiss.knn(sketch.take(queries), centres[near], min(len(near), VOTES))[1]
        named = near[votes]
        others = np.where(named == here, -1, named)
        others = np.take_along_axis(others, np.argsort(others < 0, axis=1, kind="stable"), axis=1)  # own list out
        spill[queries, : min(SPILL, others.shape[1])] = others[:, :SPILL]
        counts = np.bincount(votes.ravel(), minlength=len(near))
        counts[near == here] = np.iinfo(counts.dtype).max  # its own list first
        ranked = near[np.argsort(-counts, kind="stable")]
        held = np.cumsum(sizes[ranked])
        probes.append(ranked[: max(1, int(np.searchsorted(held, CANDIDATE_ROWS)) + 1)])
    return probes, spill


def nearest_neighbours(sketch: Sketch, k: int, floor: float, seed: int) -> Neighbours:
    """Each row's ``k`` nearest rows over the sketch: uniqueness distances and pairs at or above ``floor``.

    Similarities are ``1 - d² / 2`` of the sketches' squared distance ``d²`` (exact for unit vectors
    when the sketch is exact; an estimate otherwise).
    """
    rows = sketch.rows
    order, bounds, centres = partition(sketch, seed)
    lists = len(bounds) - 1
    if lists > 1:
        probes, spill = _plan(sketch, order, bounds, centres)
        flat = spill.ravel()
        by_list = np.argsort(flat, kind="stable")
        spilled = by_list // SPILL  # row numbers, grouped by the list they spill into
        spill_bounds = np.searchsorted(flat[by_list], np.arange(lists + 1))
    else:
        probes, spilled, spill_bounds = [np.array([0])], np.empty(0, np.int64), np.zeros(2, np.int64)
    distances = np.ones((rows, UNIQUENESS_NEIGHBOURS), dtype=np.float32)
    found_pairs: list[np.ndarray] = []
    found_sims: list[np.ndarray] = []
    for here in range(lists):
        queries = order[bounds[here] : bounds[here + 1]]
        if len(queries) == 0:
            continue
        guests = spilled[spill_bounds[here] : spill_bounds[here + 1]]
        candidates = np.concatenate([order[bounds[p] : bounds[p + 1]] for p in probes[here]] + [guests])
        wanted = min(k + 1, len(candidates))
        squared, found = faiss.knn(sketch.take(queries), sketch.take(candidates), wanted)
        neighbour = np.where(found >= 0, candidates[np.maximum(found, 0)], -1)
        similarity = 1.0 - np.maximum(squared, 0.0) / 2.0
        similarity[found < 0] = -np.inf
        keep = _without_self(neighbour, queries)
        neighbour = neighbour[keep].reshape(len(queries), wanted - 1)
        similarity = similarity[keep].reshape(len(queries), wanted - 1)
        width = min(UNIQUENESS_NEIGHBOURS, wanted - 1)
        distances[queries, :width] = np.clip(1.0 - similarity[:, :width], 0.0, 2.0)
        close = (similarity >= floor) & (neighbour >= 0)
        if close.any():
            a = np.repeat(queries, wanted - 1).reshape(close.shape)[close]
            b = neighbour[close]
            found_pairs.append(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1))
            found_sims.append(similarity[close])
    pairs, similarities = _unique_pairs(found_pairs, found_sims)
    return Neighbours(distances, pairs, similarities, lists)


def _without_self(neighbour: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Mask dropping each query's own row from its hits (or its last hit when an exact copy pushed it out)."""
    is_self = neighbour == queries[:, None]
    missing = ~is_self.any(axis=1)
    is_self[missing, -1] = True
    first = np.argmax(is_self, axis=1)  # only one dropped even if listed twice
    drop = np.zeros_like(is_self)
    drop[np.arange(len(queries)), first] = True
    return ~drop


def _unique_pairs(pairs: list[np.ndarray], sims: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    if not pairs:
        return np.empty((0, 2), dtype=np.int64), np.empty(0, dtype=np.float32)
    stacked, similarity = np.concatenate(pairs), np.concatenate(sims)
    distinct = stacked[:, 0] != stacked[:, 1]  # a row listed as its own neighbour (an exact copy's tie)
    stacked, similarity = stacked[distinct], similarity[distinct]
    keys, first = np.unique(stacked, axis=0, return_index=True)
    return keys.astype(np.int64), similarity[first].astype(np.float32)
