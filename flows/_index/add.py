"""Adding rows to a vector index: new segments, the IVF-PQ (extended or retrained), the commit.

`_commit_add` is the body of `VectorIndex.add`. It reads the committed manifest, skips rows the
index already holds, writes the new rows as immutable segments of up to `SEGMENT_ROWS` rows,
extends the IVF-PQ with them (or trains a new one once the index has grown `RETRAIN_GROWTH`-fold,
or first reaches ``exact_below`` rows), and commits a manifest naming them: a conditional write
that succeeds only if no other writer committed since the manifest was read (an ``If-Match`` PUT
on S3; a check and rename under an ``flock`` the kernel drops with a dead writer, locally: see
`_storage.stores.Store.write_if`). So any number of writers — threads, processes, flows on a work
pool — add at once, holding no lock while they work, and none can leave one held.

A writer that loses the race reads the new manifest, drops the rows the other writers added
meanwhile (rewriting its own uncommitted segments without them), appends its segments after
theirs and commits again, keeping their IVF-PQ (its own rows are scanned exactly until the next
add extends it): every row is in the index exactly once. A refused commit may be this writer's
own: an S3 PUT whose answer was lost is retried by the client and refused (412) by the write it
repeats, and one refused while an earlier attempt is under way (409) may land after. So a writer
told "refused" reads the manifest again: one naming its segments is its commit (done); one still
the version it wrote over is tried again; only one another writer moved on (where its write can no
longer land) is rebased on, and no file a committed manifest names is ever deleted.

Readers open one committed manifest and every file it names: segments are never removed, and a
replaced IVF-PQ file stays named in the manifest's ``retired`` for `GRACE_SECONDS`. Files no
manifest names (a killed writer's segments, retired IVF-PQ files past their grace) are deleted
after a commit, once `GRACE_SECONDS` old — never a running writer's.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from prefect_roboflow.blocks.exceptions import InvalidInputError

from .._steps.vectors import normalise
from .._storage.parquet import write_whole
from .._storage.stores import LOCK_SUFFIX
from .rows import SCAN_BLOCK, RowBatch, _OpenIndex
from .store import MANIFEST, META_SCHEMA, _Manifest, _new_name, _Segment, _Store

__all__ = ["GRACE_SECONDS", "RETRAIN_GROWTH", "SEGMENT_ROWS", "_check_model", "_commit_add", "_remove_leftovers"]

#: Rows per segment file written by one add.
SEGMENT_ROWS = 100_000
#: Retrain the IVF-PQ once the index holds this many times the rows it was trained on.
RETRAIN_GROWTH = 4
#: A file no committed manifest names is deleted once it is this old (seconds): what a killed add
#: left, never what a running add writes (unless that add runs longer); a replaced IVF-PQ file is
#: kept this long after the commit that replaced it, for readers that opened the manifest before.
GRACE_SECONDS = 24 * 3600
#: A writer gives up after losing this many commits in a row to other writers.
MAX_COMMIT_ATTEMPTS = 100

_Key = tuple[str | None, str, int | None]


def _check_model(manifest: _Manifest, family: str, version: str) -> None:
    """Refuse rows of another model family or version than the index's."""
    if manifest.family is not None and family != manifest.family:
        raise InvalidInputError("family", f"the index holds {manifest.family!r} rows; refusing {family!r} rows")
    if manifest.version is not None and version != manifest.version:
        raise InvalidInputError(
            "version", f"the index holds {manifest.family} {manifest.version!r} rows; refusing {version!r}"
        )


def _commit_add(
    index: _OpenIndex, batches: Iterable[RowBatch], family: str, version: str
) -> tuple[int, int, bool, _Manifest]:
    """Write the new rows' segments and IVF-PQ, then commit the manifest (again, rebased, while
    other writers commit first).

    Returns:
        ``(added, skipped, retrained, manifest)``: the committed manifest (the one read when nothing was added).
    """
    store = index._store
    base, tag = _committed(store)
    _check_model(base, family, version)
    opened = index if base.to_json() == index._manifest.to_json() else _OpenIndex(store, base)
    try:
        new = _successor(base, list(base.segments), base.dim, family, version)
        writer = _SegmentWriter(store, new, family, version)
        keys = _existing_keys(opened)
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
            return 0, skipped, False, base
        new.ann, retrained = _updated_ann(store, new, opened._ann)
    finally:
        if opened is not index:
            opened.close()
    for attempt in range(MAX_COMMIT_ATTEMPTS):
        new.retired = _retired(base, new, time.time())
        if store.commit(new, tag):
            _remove_leftovers(store, new)
            return added, skipped, retrained, new
        mine = new.segments[len(base.segments) :]
        latest, latest_tag = _committed(store)
        if _names_all(latest, mine):
            # The commit landed, its answer lost (a retried PUT refused 412 by its own write).
            _remove_leftovers(store, latest)
            return added, skipped, retrained, latest
        if latest_tag == tag:
            # Nothing committed meanwhile: this write may still be under way (409): try it again.
            time.sleep(min(1.0, 0.05 * (attempt + 1)))
            continue
        # Another writer committed first: rebase on its manifest. This writer's refused write
        # can no longer land (the manifest moved on from ``tag``), so its files are its own.
        tag = latest_tag
        if new.ann is not None and new.ann != base.ann:
            _delete_unnamed(store, latest, [new.ann["file"]])  # this writer's, never committed
        _check_model(latest, family, version)
        if latest.dim is not None and latest.dim != new.dim:
            raise InvalidInputError("vectors", f"dimension {new.dim}; the index holds dimension {latest.dim}")
        had = {s.name for s in base.segments}
        others = [s for s in latest.segments if s.name not in had]
        mine, dropped = _without_rows_of(store, new, mine, others, latest)
        added, skipped = added - dropped, skipped + dropped
        if not mine:
            return 0, skipped, False, latest
        base, retrained = latest, False
        new = _successor(latest, [*latest.segments, *mine], new.dim, family, version)
    raise RuntimeError(f"{store.location}: lost {MAX_COMMIT_ATTEMPTS} commits in a row to other writers")


def _successor(base: _Manifest, segments: list[_Segment], dim: int | None, family: str, version: str) -> _Manifest:
    """The manifest after ``base`` naming ``segments`` (its IVF-PQ the same until `_updated_ann`)."""
    return replace(base, segments=segments, dim=dim, family=family, version=version, generation=base.generation + 1)


def _committed(store: _Store) -> tuple[_Manifest, str]:
    found = store.read_manifest()
    if found is None:
        raise InvalidInputError("path", f"{store.location} holds no vector index (no {MANIFEST})")
    return found


def _retired(base: _Manifest, new: _Manifest, now: float) -> dict[str, float]:
    """The IVF-PQ files readers of recent manifests may still open: the one ``new`` replaces, and
    those replaced less than `GRACE_SECONDS` ago."""
    retired = {name: at for name, at in base.retired.items() if now - at < GRACE_SECONDS}
    if base.ann is not None and (new.ann is None or new.ann["file"] != base.ann["file"]):
        retired[base.ann["file"]] = now
    return retired


def _named(manifest: _Manifest) -> set[str]:
    """The files a reader of ``manifest`` may open (and the manifest itself)."""
    named = {MANIFEST, *manifest.retired} | {f"{s.name}{x}" for s in manifest.segments for x in (".npy", ".parquet")}
    if manifest.ann:
        named.add(manifest.ann["file"])
    return named


def _names_all(manifest: _Manifest, segments: Iterable[_Segment]) -> bool:
    """Whether ``manifest`` names every one of ``segments`` (names are unique to the add that wrote them)."""
    names = {s.name for s in manifest.segments}
    return all(s.name in names for s in segments)


def _delete_unnamed(store: _Store, latest: _Manifest, names: Iterable[str]) -> list[str]:
    """Delete ``names`` but those the committed manifest ``latest`` names: a file a committed
    manifest names is never deleted (the last check before every delete here). Returns the deleted."""
    keep = _named(latest)
    deleted = [name for name in names if name not in keep]
    for name in deleted:
        store.delete(name)
    return deleted


def _remove_leftovers(store: _Store, manifest: _Manifest, now: float | None = None) -> list[str]:
    """Delete the index folder's files that ``manifest`` (the committed one) does not name and
    that are `GRACE_SECONDS` old: a killed add's segments and temp files, IVF-PQ files retired
    longer ago than that, but never one the manifest committed by then names (read again when
    there is anything to delete). Returns their names."""
    now = time.time() if now is None else now
    named = _named(manifest)
    old = [
        name
        for name, written in store.modified().items()
        if name not in named and not name.endswith(LOCK_SUFFIX) and now - written >= GRACE_SECONDS
    ]
    if not old:
        return []
    return _delete_unnamed(store, _committed(store)[0], old)


def _segment_keys(store: _Store, segments: Iterable[_Segment]) -> set[_Key]:
    """The (sha256, reference, detection index) of every row of these segments."""
    keys: set[_Key] = set()
    for segment in segments:
        keys.update(_keys_of(_read_meta(store, segment)))
    return keys


def _read_meta(store: _Store, segment: _Segment) -> pa.Table:
    return pq.read_table(store.local_file(f"{segment.name}.parquet"))


def _keys_of(meta: pa.Table) -> Iterator[_Key]:
    return zip(
        meta.column("image_sha256").to_pylist(),
        meta.column("image_ref").to_pylist(),
        meta.column("detection_index").to_pylist(),
        strict=True,
    )


def _without_rows_of(
    store: _Store, manifest: _Manifest, mine: list[_Segment], others: list[_Segment], latest: _Manifest
) -> tuple[list[_Segment], int]:
    """This writer's uncommitted segments without the rows ``others`` (committed meanwhile, in
    ``latest``) hold: a segment with such rows is written again without them and the old one
    deleted (unless ``latest`` names it).

    Returns:
        ``(segments, rows dropped)``.
    """
    taken = _segment_keys(store, others)
    kept, dropped = [], 0
    for segment in mine:
        meta = _read_meta(store, segment)
        keep = [i for i, key in enumerate(_keys_of(meta)) if key not in taken]
        if len(keep) < segment.rows:
            dropped += segment.rows - len(keep)
            vectors = np.load(store.local_file(f"{segment.name}.npy"))[keep]
            if keep:
                kept.append(_write_segment(store, _new_name("seg", manifest.generation), meta.take(keep), vectors))
            _delete_unnamed(store, latest, [f"{segment.name}{ext}" for ext in (".npy", ".parquet")])
        else:
            kept.append(segment)
    return kept, dropped


def _write_segment(store: _Store, name: str, meta: pa.Table, vectors: np.ndarray) -> _Segment:
    """One immutable segment: its vectors (``.npy``), then its rows (``.parquet``)."""
    with store.scratch(f"{name}.npy") as tmp:
        with open(tmp, "wb") as handle:  # np.save(path) would append ".npy" to the name
            np.save(handle, vectors)
        store.put_file(f"{name}.npy", tmp)
    with store.scratch(f"{name}.parquet") as tmp:
        write_whole(meta, tmp)
        store.put_file(f"{name}.parquet", tmp)
    return _Segment(name, len(vectors))


def _existing_keys(index: _OpenIndex) -> set[_Key]:
    keys: set[_Key] = set()
    for s in range(len(index._manifest.segments)):
        keys.update(_keys_of(index._segment_meta(s)))
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
        n = len(refs)
        meta = pa.table([refs, shas, dets, [self.family] * n, [self.version] * n], schema=META_SCHEMA)
        self.manifest.segments.append(_write_segment(self.store, name, meta, vectors))
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
