"""Reading an opened vector index's rows: its segments memory-mapped, their metadata, its IVF-PQ.

`_OpenIndex` holds the state a manifest names, opened for reading: the segments' vectors
(memory-mapped, plus a file handle each for ``pread``), their metadata tables (read on first use)
and the IVF-PQ. `VectorIndex` builds search and add on it; an add also opens one over its staged
manifest to train and fill a new IVF-PQ.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from prefect_roboflow.blocks.exceptions import InvalidInputError

from .store import META_SCHEMA, _Manifest, _Store

__all__ = ["PREAD_MAX_RUNS", "SCAN_BLOCK", "RowBatch", "_OpenIndex"]

#: Rows scored at once by an exact scan (bounds the scan's memory to block × queries floats).
SCAN_BLOCK = 32_768
#: Reads of up to this many runs of adjacent rows use ``pread`` (a query's re-ranking, a block of
#: rows); more scattered ones gather through the memory map.
PREAD_MAX_RUNS = 2_048

_Self = TypeVar("_Self", bound="_OpenIndex")


@dataclass
class RowBatch:
    """Rows to add: references, content hashes and one vector each (detection index optional)."""

    image_refs: Sequence[str]
    image_sha256s: Sequence[str | None]
    vectors: Any  # array-like (n, dim)
    detection_indices: Sequence[int | None] | None = None


class _OpenIndex:
    """The files one manifest names, opened for reading (closed by `close`)."""

    def __init__(self, store: _Store, manifest: _Manifest) -> None:
        self._store = store
        self._manifest = manifest
        self._vectors: list[np.ndarray] = []
        self._offsets = np.zeros(1, dtype=np.int64)
        self._meta: dict[int, pa.Table] = {}
        self._ann: Any = None
        self._files: list[Any] = []
        self._load()

    def _load(self) -> None:
        m = self._manifest
        try:
            paths = [self._store.local_file(f"{s.name}.npy") for s in m.segments]
            self._vectors = [np.load(path, mmap_mode="r") for path in paths]
            self._files = [open(path, "rb") for path in paths]  # noqa: SIM115  (closed by `close`)
            if m.ann is not None:
                self._ann = _read_ann(self._store, m.ann["file"])
        except (OSError, ValueError, RuntimeError) as error:
            raise InvalidInputError("path", f"{self._store.location} is a corrupt vector index: {error}") from None
        for seg, vectors in zip(m.segments, self._vectors, strict=True):
            if vectors.shape != (seg.rows, m.dim) or vectors.dtype != np.float32:
                raise InvalidInputError(
                    "path",
                    f"{self._store.location}: {seg.name}.npy is {vectors.shape}, manifest says ({seg.rows}, {m.dim})",
                )
        self._offsets = np.cumsum([0] + [s.rows for s in m.segments], dtype=np.int64)

    # -- facts --------------------------------------------------------------------------------

    @property
    def path(self) -> str:
        """Where the index lives."""
        return self._store.location

    @property
    def rows(self) -> int:
        """How many rows the index holds."""
        return self._manifest.rows

    @property
    def dim(self) -> int | None:
        """The vectors' dimension (``None`` while empty)."""
        return self._manifest.dim

    @property
    def family(self) -> str | None:
        """The model family of every row (``None`` while empty)."""
        return self._manifest.family

    @property
    def version(self) -> str | None:
        """The model version of every row (``None`` while empty)."""
        return self._manifest.version

    @property
    def exact_below(self) -> int:
        """Searches are exact below this many rows."""
        return self._manifest.exact_below

    @property
    def ann_rows(self) -> int:
        """Rows covered by the IVF-PQ (the rest, if any, are scanned exactly)."""
        return int(self._manifest.ann["rows"]) if self._manifest.ann else 0

    def __len__(self) -> int:
        return self.rows

    def close(self) -> None:
        """Release the open segment files (also done when the object is collected)."""
        for handle in self._files:
            handle.close()
        self._files, self._vectors = [], []

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading rows ---------------------------------------------------------------------------

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """The stored (normalised) vectors of these row numbers, in order.

        A query's few rows are read with ``pread``, not through the memory map: a mapped page read
        once stays in the process's RSS (with the kernel's read-ahead around it), so re-ranking
        through the map would grow a long-lived searcher towards the whole vectors file. Large
        scattered batches (dedup's re-ranking) gather through the map.
        """
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim or 0), dtype=np.float32)
        seg_of = np.searchsorted(self._offsets, rows, side="right") - 1
        for s in np.unique(seg_of):
            mask = seg_of == s
            local = rows[mask] - self._offsets[s]
            runs = 1 + int(np.count_nonzero(np.diff(np.sort(local)) != 1)) if len(local) else 0
            if runs <= PREAD_MAX_RUNS:  # a query's candidates, or a contiguous block
                out[mask] = _pread_rows(self._files[s], self._vectors[s], local)
            else:  # scattered batch reads (dedup's re-ranking): one vectorised gather through the map
                order = np.argsort(local, kind="stable")
                picked = np.empty((len(local), out.shape[1]), dtype=np.float32)
                picked[order] = self._vectors[s][local[order]]
                out[mask] = picked
        return out

    def iter_vectors(self, chunk: int = SCAN_BLOCK) -> Iterator[tuple[int, np.ndarray]]:
        """``(first_row, vectors)`` over the whole index in order, ``chunk`` rows at a time."""
        for s, vectors in enumerate(self._vectors):
            for start in range(0, len(vectors), chunk):
                yield int(self._offsets[s]) + start, np.asarray(vectors[start : start + chunk])

    def metadata(self, rows: np.ndarray) -> pa.Table:
        """``image_ref, image_sha256, detection_index`` of these row numbers, in order."""
        rows = np.asarray(rows, dtype=np.int64)
        seg_of = np.searchsorted(self._offsets, rows, side="right") - 1
        parts, positions = [], []
        for s in np.unique(seg_of):
            idx = np.flatnonzero(seg_of == s)
            parts.append(self._segment_meta(int(s)).take(pa.array(rows[idx] - self._offsets[s])))
            positions.append(idx)
        if not parts:
            return META_SCHEMA.empty_table().select(["image_ref", "image_sha256", "detection_index"])
        table = pa.concat_tables(parts)
        return table.take(pa.array(np.argsort(np.concatenate(positions), kind="stable")))

    def _segment_meta(self, s: int) -> pa.Table:
        if s not in self._meta:
            name = self._manifest.segments[s].name
            source = self._store.local_file(f"{name}.parquet")
            self._meta[s] = pq.read_table(source, columns=["image_ref", "image_sha256", "detection_index"])
        return self._meta[s]


def _pread_rows(handle: Any, mapped: np.ndarray, local: np.ndarray) -> np.ndarray:
    """Rows ``local`` of one segment's vectors file, read with one ``pread`` per run of adjacent rows."""
    dim = mapped.shape[1]
    row_bytes = dim * 4
    base = int(getattr(mapped, "offset", 0))
    out = np.empty((len(local), dim), dtype=np.float32)
    order = np.argsort(local, kind="stable")
    ordered = local[order]
    breaks = np.flatnonzero(np.diff(ordered) != 1) + 1
    fd = handle.fileno()
    for run in np.split(np.arange(len(ordered)), breaks):
        if len(run) == 0:
            continue
        first = int(ordered[run[0]])
        data = os.pread(fd, row_bytes * len(run), base + first * row_bytes)
        out[order[run]] = np.frombuffer(data, dtype=np.float32).reshape(len(run), dim)
    return out


def _read_ann(store: _Store, name: str) -> Any:
    return faiss.read_index(str(store.local_file(name)))  # a remote file streamed once into the read cache
