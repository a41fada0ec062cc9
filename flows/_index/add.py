"""Adding rows to a vector index: new segments, the IVF-PQ (extended or retrained), the commit.

`_commit_add` is the body of `VectorIndex.add`: it deletes what a crashed add left, skips rows the
index already holds, writes the new rows as immutable segments of up to `SEGMENT_ROWS` rows,
extends the IVF-PQ with them (or trains a new one once the index has grown `RETRAIN_GROWTH`-fold,
or first reaches ``exact_below`` rows), and replaces the manifest last: the commit point.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from prefect_roboflow.blocks.exceptions import InvalidInputError

from .._steps.vectors import normalise
from .rows import SCAN_BLOCK, RowBatch, _OpenIndex
from .store import MANIFEST, META_SCHEMA, _Manifest, _new_name, _Segment, _Store

__all__ = ["RETRAIN_GROWTH", "SEGMENT_ROWS", "_commit_add"]

#: Rows per segment file written by one add.
SEGMENT_ROWS = 100_000
#: Retrain the IVF-PQ once the index holds this many times the rows it was trained on.
RETRAIN_GROWTH = 4


def _commit_add(
    index: _OpenIndex, batches: Iterable[RowBatch], family: str, version: str
) -> tuple[int, int, bool, _Manifest]:
    """Write the new rows' segments and IVF-PQ, then the manifest (the commit).

    Returns:
        ``(added, skipped, retrained, manifest)``: the index's manifest unchanged when nothing was added.
    """
    store, old = index._store, index._manifest
    _remove_orphans(store, old)
    new = replace(old, segments=list(old.segments), family=family, version=version, generation=old.generation + 1)
    writer = _SegmentWriter(store, new, family, version)
    keys = _existing_keys(index)
    skipped = 0
    for batch in batches:
        refs, shas, dets, vectors = _checked_batch(batch, new.dim)
        new.dim = vectors.shape[1]
        keep = []
        for i, key in enumerate(zip(shas, refs, dets, strict=True)):
            if key in keys:
                skipped += 1
            else:
                keys.add(key)
                keep.append(i)
        writer.append([refs[i] for i in keep], [shas[i] for i in keep], [dets[i] for i in keep], vectors[keep])
    added = writer.finish()
    if added == 0:
        return 0, skipped, False, old
    new.ann, retrained = _updated_ann(store, new, index._ann)
    store.put_bytes(MANIFEST, new.to_json())  # the commit point
    if old.ann and (new.ann is None or old.ann["file"] != new.ann["file"]):
        store.delete(old.ann["file"])
    return added, skipped, retrained, new


def _remove_orphans(store: _Store, manifest: _Manifest) -> None:
    """Delete what a crashed add left: files the manifest does not name (this folder is the index's)."""
    keep = {MANIFEST} | {f"{s.name}{ext}" for s in manifest.segments for ext in (".npy", ".parquet")}
    if manifest.ann:
        keep.add(manifest.ann["file"])
    for name in store.names():
        if name not in keep:
            store.delete(name)


def _existing_keys(index: _OpenIndex) -> set[tuple[str | None, str, int | None]]:
    keys: set[tuple[str | None, str, int | None]] = set()
    for s in range(len(index._manifest.segments)):
        meta = index._segment_meta(s)
        keys.update(
            zip(
                meta.column("image_sha256").to_pylist(),
                meta.column("image_ref").to_pylist(),
                meta.column("detection_index").to_pylist(),
                strict=True,
            )
        )
    return keys


def _checked_batch(
    batch: RowBatch, dim: int | None
) -> tuple[list[str], list[str | None], list[int | None], np.ndarray]:
    refs, shas = list(batch.image_refs), list(batch.image_sha256s)
    dets = list(batch.detection_indices) if batch.detection_indices is not None else [None] * len(refs)
    vectors = np.asarray(batch.vectors, dtype=np.float32)
    if vectors.ndim != 2 or not len(refs) == len(shas) == len(dets) == len(vectors):
        raise InvalidInputError(
            "rows",
            f"image_refs ({len(refs)}), image_sha256s ({len(shas)}), detection_indices ({len(dets)}) and "
            f"vectors {vectors.shape} must describe the same rows",
        )
    if dim is not None and vectors.shape[1] != dim:
        raise InvalidInputError("vectors", f"dimension {vectors.shape[1]}; the index holds dimension {dim}")
    if any(not isinstance(r, str) or not r for r in refs):
        raise InvalidInputError("image_refs", "every reference must be a non-empty str")
    return refs, shas, [None if d is None else int(d) for d in dets], normalise(vectors, "vectors")


class _SegmentWriter:
    """Buffers new rows and writes them as segments of up to `SEGMENT_ROWS` rows."""

    def __init__(self, store: _Store, manifest: _Manifest, family: str, version: str) -> None:
        self.store, self.manifest, self.family, self.version = store, manifest, family, version
        self.parts: list[tuple[list[str], list[str | None], list[int | None], np.ndarray]] = []
        self.buffered = 0
        self.added = 0

    def append(self, refs: list[str], shas: list[str | None], dets: list[int | None], vectors: np.ndarray) -> None:
        if refs:
            self.parts.append((refs, shas, dets, vectors))
            self.buffered += len(refs)
        if self.buffered >= SEGMENT_ROWS:
            self._flush()

    def finish(self) -> int:
        if self.buffered:
            self._flush()
        return self.added

    def _flush(self) -> None:
        refs = [r for p in self.parts for r in p[0]]
        shas = [s for p in self.parts for s in p[1]]
        dets = [d for p in self.parts for d in p[2]]
        vectors = np.concatenate([p[3] for p in self.parts])
        name = _new_name("seg", self.manifest.generation)
        with self.store.scratch(f"{name}.npy") as tmp:
            with open(tmp, "wb") as handle:  # np.save(path) would append ".npy" to the name
                np.save(handle, vectors)
            self.store.put_file(f"{name}.npy", tmp)
        n = len(refs)
        meta = pa.table([refs, shas, dets, [self.family] * n, [self.version] * n], schema=META_SCHEMA)
        with self.store.scratch(f"{name}.parquet") as tmp:
            pq.write_table(meta, tmp, compression="zstd")
            self.store.put_file(f"{name}.parquet", tmp)
        self.manifest.segments.append(_Segment(name, n))
        self.added += n
        self.parts, self.buffered = [], 0


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """faiss's OpenMP pool at ``n`` threads (its k-means crawls when other processes share the cores)."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _updated_ann(store: _Store, manifest: _Manifest, current: Any) -> tuple[dict[str, Any] | None, bool]:
    """The IVF-PQ for the new manifest: none while small, extended, or retrained after 4× growth."""
    total = manifest.rows
    if total < manifest.exact_below:
        return None, False
    with _OpenIndex(store, replace(manifest, ann=None)) as staged:
        return _written_ann(store, manifest, current, staged)


def _written_ann(
    store: _Store, manifest: _Manifest, current: Any, staged: _OpenIndex
) -> tuple[dict[str, Any] | None, bool]:
    total = manifest.rows
    old = manifest.ann
    retrain = current is None or old is None or total >= RETRAIN_GROWTH * int(old["trained_rows"])
    if retrain:
        ann, first, info = _trained_ann(staged), 0, {}
    else:
        assert old is not None
        ann, first, info = faiss.clone_index(current), int(old["rows"]), dict(old)
    for start in range(first, total, SCAN_BLOCK):
        assert ann.ntotal == start, "IVF-PQ ids must be row numbers"
        ann.add(staged.vectors(np.arange(start, min(total, start + SCAN_BLOCK))))
    name = _new_name("ann", manifest.generation) + ".faiss"
    with store.scratch(name) as tmp:
        faiss.write_index(ann, str(tmp))
        store.put_file(name, tmp)
    if retrain:
        info = {"trained_rows": total, "nlist": ann.nlist, "m": ann.pq.M}
    return {**info, "file": name, "rows": total}, retrain


def _trained_ann(index: _OpenIndex) -> Any:
    """A fresh IVF-PQ (inner product on normalised vectors = cosine), trained on a sample of rows."""
    dim, total = int(index.dim or 0), index.rows
    nlist = int(min(4096, max(16, np.sqrt(total))))
    m = next(m for m in (64, 32, 16, 8, 4, 2, 1) if dim % m == 0)
    sample = np.sort(np.random.default_rng(0).choice(total, min(total, max(40 * nlist, 20_000)), replace=False))
    ann = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
    with _threads(1):
        ann.train(index.vectors(sample))
    return ann
