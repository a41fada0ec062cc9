"""One streaming read of a vector index into what curation keeps in memory: a compact sketch per row.

Curation compares every row with its neighbours and with the selected rows, many times over; the
index's float32 vectors (2 KB a row at 512-d: 20 GB at 10,000,000 rows) are read once, in blocks
of `CHUNK_ROWS` consecutive rows (``VectorIndex.vectors`` of a contiguous range: one ``pread``,
no memory map left resident), and each block is reduced to its *sketch*:

- up to `EXACT_ROWS` rows, the vectors themselves (float32): every distance is exact;
- above, a linear map to ``p`` values stored as float16, ``p`` as large as `SKETCH_BYTES` allows
  and at most `MAX_SKETCH_DIM`: the top principal components of a sample (exact distances within
  that subspace) plus a Johnson–Lindenstrauss projection of the rest (`RESIDUAL_SHARE` of ``p``),
  so that the squared distance between two sketches estimates the true one without the bias of a
  plain PCA cut. 10,000,000 × 512 becomes 10,000,000 × 128 float16: 2.5 GB.

The sample that fits the map (and the clusters of `representativeness`) is `SAMPLE_ROWS` rows in
`SAMPLE_BLOCKS` contiguous runs spread over the index: read without touching the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from ..vector_index import VectorIndex

__all__ = [
    "CHUNK_ROWS",
    "EXACT_ROWS",
    "MAX_SKETCH_DIM",
    "SAMPLE_ROWS",
    "SKETCH_BYTES",
    "Projection",
    "Sketch",
    "blocks",
    "build_sketch",
    "sample_rows",
]

#: Rows read from the index at once (32,768 × 512 float32 = 64 MB).
CHUNK_ROWS = 32_768
#: Rows of the sample that fits the projection and the clusters.
SAMPLE_ROWS = 65_536
#: Contiguous runs the sample is read in, spread evenly over the index.
SAMPLE_BLOCKS = 64
#: Up to this many rows, the sketch is the vectors themselves (exact distances).
EXACT_ROWS = 250_000
#: Memory the sketch may take above `EXACT_ROWS` rows (float16 values).
SKETCH_BYTES = int(2.5 * 2**30)
#: The sketch's width at most (the cost of each comparison grows with it).
MAX_SKETCH_DIM = 256
#: Share of the sketch's values given to the random projection of what the principal components miss.
RESIDUAL_SHARE = 0.25


def blocks(index: VectorIndex, chunk: int = CHUNK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
    """``(first_row, vectors)`` over the whole index, ``chunk`` consecutive rows at a time (read, not mapped)."""
    for start in range(0, index.rows, chunk):
        yield start, index.vectors(np.arange(start, min(index.rows, start + chunk)))


def sample_rows(rows: int, size: int = SAMPLE_ROWS, runs: int = SAMPLE_BLOCKS) -> np.ndarray:
    """Row numbers of the sample: every row up to ``size``, else ``runs`` contiguous runs spread evenly."""
    if rows <= size:
        return np.arange(rows)
    length = size // runs
    starts = np.linspace(0, rows - length, runs).astype(np.int64)
    return np.unique((starts[:, None] + np.arange(length)[None, :]).ravel())


@dataclass
class Projection:
    """The linear map from a vector to its sketch (``matrix`` None: the vector itself)."""

    mean: np.ndarray | None
    matrix: np.ndarray | None

    @property
    def exact(self) -> bool:
        """Whether sketches are the vectors themselves."""
        return self.matrix is None

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        """The sketches of these vectors (float32)."""
        if self.matrix is None:
            return np.asarray(vectors, dtype=np.float32)
        assert self.mean is not None
        return ((vectors - self.mean) @ self.matrix.T).astype(np.float32)

    @classmethod
    def fit(cls, sample: np.ndarray, width: int, seed: int) -> Projection:
        """Principal components of ``sample`` plus a random projection of the rest, ``width`` values in all."""
        dim = sample.shape[1]
        if width >= dim:
            return cls(None, None)
        mean = sample.mean(axis=0, dtype=np.float64)
        centred = sample - mean
        _, vectors = np.linalg.eigh(centred.T @ centred / len(sample))  # ascending eigenvalues
        residual = max(1, int(width * RESIDUAL_SHARE))
        top = vectors[:, ::-1][:, : width - residual].T  # (width - residual, dim)
        gaussian = np.random.default_rng(seed).standard_normal((residual, dim)) / np.sqrt(residual)
        rest = gaussian @ (np.eye(dim) - top.T @ top)  # JL over the part the components miss
        return cls(mean.astype(np.float32), np.vstack([top, rest]).astype(np.float32))


def sketch_width(rows: int, dim: int) -> int:
    """How many values a row's sketch holds (``dim``: exact)."""
    if rows <= EXACT_ROWS:
        return dim
    fits = SKETCH_BYTES // (2 * rows)
    return int(min(dim, MAX_SKETCH_DIM, max(32, fits // 32 * 32)))


@dataclass
class Sketch:
    """Every row's sketch (``values``: rows × width, float32 when exact else float16) and their squared norms."""

    values: np.ndarray
    norms: np.ndarray
    projection: Projection

    @property
    def rows(self) -> int:
        """How many rows."""
        return len(self.values)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """These rows' sketches as float32."""
        return np.asarray(self.values[rows], dtype=np.float32)

    def span(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as float32."""
        return np.asarray(self.values[start:stop], dtype=np.float32)


def build_sketch(
    index: VectorIndex,
    sample: np.ndarray,
    seed: int,
    also: Callable[[int, np.ndarray], None] | None = None,
) -> Sketch:
    """Stream the index once into its `Sketch`; ``also(first_row, vectors)`` sees every block on the way."""
    rows, dim = index.rows, int(index.dim or 0)
    projection = Projection.fit(sample, sketch_width(rows, dim), seed)
    width = dim if projection.exact else int(projection.matrix.shape[0])  # type: ignore[union-attr]
    values = np.empty((rows, width), dtype=np.float32 if projection.exact else np.float16)
    norms = np.empty(rows, dtype=np.float32)
    for start, vectors in blocks(index):
        sketched = projection.apply(vectors)
        values[start : start + len(vectors)] = sketched
        stored = np.asarray(values[start : start + len(vectors)], dtype=np.float32)  # norms of what is kept
        norms[start : start + len(vectors)] = np.einsum("nd,nd->n", stored, stored)
        if also is not None:
            also(start, vectors)
    return Sketch(values, norms, projection)
