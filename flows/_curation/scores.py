"""The whole curation of one source: every score, computed once and cached by the rows' content.

`compute_scores` streams the index once (the sample first: the sketch's map and the k-means
clusters), then works on the in-memory sketch: neighbours (uniqueness, candidate pairs),
pairs confirmed on the index's vectors (duplicate groups, leaks), the k-centre selection with
duplicates skipped. `cached_scores` keys the result by the rows' identities, model, version and
splits (`Source.digest`) and every parameter that changes a score, in the flows' content cache
(`_steps.cache`): a rerun over the same rows reads the scores back and computes none.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields

import faiss
import numpy as np

from .._steps.cache import ContentCache, content_key
from .duplicates import copy_pairs, exact_similarity, groups
from .leaks import leaks
from .neighbours import nearest_neighbours
from .representativeness import Clusters
from .selection import k_centre
from .sketch import build_sketch, sample_rows
from .sources import Source
from .uniqueness import uniqueness

__all__ = ["FORMAT", "Scores", "Settings", "cached_scores", "compute_scores"]

#: Bump when a score's meaning changes (it is in every key).
FORMAT = "1"
#: How far below the lower threshold a pair's estimated similarity may lie and still be checked
#: on the exact vectors: exact sketches (float32), and projected ones.
EXACT_MARGIN, SKETCH_MARGIN = 0.01, 0.08


@dataclass(frozen=True)
class Settings:
    """The parameters that change a score."""

    threshold: float
    leak_threshold: float
    k: int
    budget: int
    seed: int


@dataclass
class Scores:
    """Per row: the scores; and what the run measured on the way."""

    uniqueness: np.ndarray
    representativeness: np.ndarray
    cluster: np.ndarray
    group: np.ndarray
    representative: np.ndarray
    leak_with: np.ndarray
    pick: np.ndarray  # selection rank, -1: not selected
    radius: float = 0.0  # coverage radius of the selection (cosine distance)
    passes: int = 0
    lists: int = 0
    sketch_width: int = 0
    pairs_checked: int = 0

    def dump(self) -> bytes:
        """The scores as one cache entry."""
        buffer = io.BytesIO()
        arrays = {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), np.ndarray)}
        facts = {k: v for k, v in asdict(self).items() if k not in arrays}
        np.savez(buffer, facts=np.frombuffer(json.dumps(facts).encode(), dtype=np.uint8), **arrays)
        return buffer.getvalue()

    @classmethod
    def load(cls, data: bytes, rows: int) -> Scores | None:
        """The scores of a cache entry, or None when it is not one for ``rows`` rows."""
        try:
            with np.load(io.BytesIO(data)) as stored:
                facts = json.loads(bytes(stored["facts"]).decode())
                arrays = {f.name: stored[f.name] for f in fields(cls) if f.name not in facts}
        except (OSError, ValueError, KeyError):
            return None
        if any(len(a) != rows for a in arrays.values()):
            return None
        return cls(**arrays, **facts)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """faiss's OpenMP pool at one thread: on shared cores its spinning threads cost more than they give."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def compute_scores(source: Source, settings: Settings, progress: Callable[[str], None] = lambda _: None) -> Scores:
    """Every score of ``source``'s rows (see the module docs)."""
    index, rows = source.index, source.index.rows
    if rows == 0:
        empty = np.empty(0, dtype=np.int64)
        return Scores(
            np.empty(0, np.float32),
            np.empty(0, np.float32),
            np.empty(0, np.int16),
            empty,
            empty,
            empty,
            np.empty(0, np.int32),
        )
    with _one_thread():
        sample = index.vectors(sample_rows(rows))
        clusters = Clusters(sample, rows)
        progress("sample read, clusters fitted")
        sketch = build_sketch(index, sample, settings.seed, also=clusters.observe)
        del sample
        progress(f"sketch built ({sketch.values.shape[1]} values a row)")
        margin = EXACT_MARGIN if sketch.projection.exact else SKETCH_MARGIN
        floor = min(settings.threshold, settings.leak_threshold) - margin
        found = nearest_neighbours(sketch, settings.k, floor, settings.seed)
        progress(f"neighbours found over {found.lists} lists")
        similarity = exact_similarity(index, found.pairs)
        near = found.pairs[similarity >= settings.threshold]
        group, representative = groups(rows, np.concatenate([near, copy_pairs(source.keys)]))
        leaking = similarity >= settings.leak_threshold
        leak_with = leaks(source.splits, source.keys, found.pairs[leaking], similarity[leaking])
        eligible = (representative < 0) | (representative == np.arange(rows))
        selection = k_centre(sketch, settings.budget, eligible)
        progress(f"{len(selection.picks)} rows selected in {selection.passes} passes")
    pick = np.full(rows, -1, dtype=np.int32)
    pick[np.asarray(selection.picks, dtype=np.int64)] = np.arange(len(selection.picks), dtype=np.int32)
    return Scores(
        uniqueness=uniqueness(found.distances),
        representativeness=clusters.representativeness(),
        cluster=clusters.cluster,
        group=group,
        representative=representative,
        leak_with=leak_with,
        pick=pick,
        radius=selection.radius,
        passes=selection.passes,
        lists=found.lists,
        sketch_width=int(sketch.values.shape[1]),
        pairs_checked=len(found.pairs),
    )


def cached_scores(
    cache: ContentCache, source: Source, settings: Settings, progress: Callable[[str], None] = lambda _: None
) -> tuple[Scores, bool]:
    """``(scores, from_cache)``: the stored scores of these rows and settings, else computed and stored."""
    index = source.index
    model = {"family": index.family, "version": index.version, "dim": index.dim}
    key = content_key("curate", source.digest, model, {"format": FORMAT, **asdict(settings)})
    stored = cache.get(key)
    if stored is not None:
        scores = Scores.load(stored, index.rows)
        if scores is not None:
            return scores, True
    scores = compute_scores(source, settings, progress)
    cache.put(key, scores.dump())
    return scores, False
