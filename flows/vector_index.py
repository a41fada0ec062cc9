"""A vector index over embeddings: exact search while small, IVF-PQ (faiss) once large.

An index is a folder — a local path, an ``s3://bucket/index`` URL, any fsspec URL, or a saved
block's path (``block://s3-bucket/<name>/index``), all reached through `_storage` — of immutable
files and one manifest naming them:

```
manifest.json            the commit point: dimension, model family and version, segments, ANN file
seg-<n>-<id>.npy         a segment's vectors: float32, L2-normalised, memory-mapped when searching
seg-<n>-<id>.parquet     its rows: image_ref, image_sha256, detection_index, family, version
ann-<id>.faiss           IVF-PQ over the first ``ann.rows`` rows (absent below ``exact_below`` rows)
```

`VectorIndex.add` writes new files first and replaces the manifest last, by a conditional write
(one ``If-Match`` PUT on S3; a rename under a lock the kernel releases with a dead writer, in a
local folder), so a crash at any point leaves the index searchable at its previous state, and
an add whose manifest another writer replaced meanwhile is rebased onto theirs and committed again
(see `_index.add`). Rows already present (same sha256, reference and detection) are skipped, so a
rerun over a superset adds only the new rows. New rows are
encoded into the existing IVF-PQ without retraining; it is retrained only when the index has
grown fourfold since its last training.

Searching keeps the PQ codes (64 bytes a row) in memory and re-ranks each query's candidates
with their exact float32 vectors read from the memory-mapped segments: at 1,000,000 × 512 a
searching process stays well under 1 GB (the raw vectors alone are 2 GB).

Any number of writers at once — threads (each with its own `VectorIndex`), processes, flows on a
work pool — in a local folder or on S3 (which does conditional writes; on other fsspec file systems,
one writing process at a time): every row is added exactly once. Any number of readers: a reader
sees the committed state it opened. What a killed writer left is deleted by a later add once a
day old (`_index.add.GRACE_SECONDS`), never sooner: it might be a running writer's.

Examples:
    ```python
    from prefect_roboflow.flows.vector_index import VectorIndex, update_index_from_table

    update_index_from_table("out/embeddings.parquet", "out/index")      # after an embed_images run
    index = VectorIndex.open("out/index")
    index.search("a red car", top_k=5, server="http://localhost:9001")  # text query, embedded
    index.search("photos/query.jpg", top_k=5)                          # image query, embedded
    index.search(vector, top_k=5)                                       # a vector: no request
    ```
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel

from prefect_roboflow.blocks import EmbeddingModel
from prefect_roboflow.blocks._compat import async_dispatch
from prefect_roboflow.blocks._model import model_class, model_families
from prefect_roboflow.blocks.exceptions import InvalidInputError

# The layout's and tuning constants are defined where they are used; the `X as X` imports keep them
# public here.
from ._index.add import _check_model, _commit_add
from ._index.rows import RowBatch, _OpenIndex
from ._index.search import _check_top_k, _checked_embedding, _knn, _query
from ._index.store import (
    DEFAULT_EXACT_BELOW,
    MANIFEST,
    MIN_EXACT_BELOW,
    _Manifest,
    _Store,
)
from ._steps.models import ServerSpec
from ._storage.access import local_copy
from ._storage.listing import looks_like_image

__all__ = [
    "DEFAULT_EXACT_BELOW",
    "AddResult",
    "IndexHit",
    "RowBatch",
    "VectorIndex",
    "family_name",
    "update_index_from_table",
]


def family_name(model: str, field_name: str = "model") -> str:
    """The model family of a table's ``model`` value: ``"clip"`` or ``"perception_encoder"``.

    The class names older tables carry (``"Clip"``, ``"PerceptionEncoder"``) map to their family.

    Examples:
        >>> family_name("Clip")
        'clip'
    """
    families = sorted(f for f, cls in model_families().items() if issubclass(cls, EmbeddingModel))
    try:
        cls = model_class(model, field_name)
    except InvalidInputError:
        cls = None
    if cls is None or not issubclass(cls, EmbeddingModel):
        raise InvalidInputError(field_name, f"unknown model family {model!r}; expected one of {families}")
    return cls.family


class IndexHit(BaseModel):
    """One search result: the row's image (and detection) and its cosine similarity."""

    rank: int
    score: float
    row: int
    image_ref: str
    image_sha256: str | None
    detection_index: int | None = None


class AddResult(BaseModel):
    """What one `VectorIndex.add` did."""

    added: int
    skipped: int
    rows: int
    ann_rows: int
    retrained: bool


# --- the index ----------------------------------------------------------------------------------


class VectorIndex(_OpenIndex):
    """Embeddings of one model family and version, searchable by cosine similarity.

    Open with `VectorIndex.open`; rows go in with `add` (or `update_index_from_table`).

    Examples:
        ```python
        index = VectorIndex.open("out/index", create=True)
        index.add(RowBatch(["a.jpg"], [sha], vectors), family="clip", version="ViT-B-16")
        hits = index.search(vectors[0], top_k=5)
        ```
    """

    # Its facts (`rows`, `dim`, `family`, ...), row reads (`vectors`, `iter_vectors`, `metadata`)
    # and `close` come from `_OpenIndex` (flows/_index/rows.py).

    # -- opening ----------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, create: bool = False, exact_below: int | None = None) -> VectorIndex:
        """Open the index at ``path`` (a folder, an object-storage URL or a ``block://`` path).

        Args:
            path: Where the index lives.
            create: Create an empty index when ``path`` holds none (an empty or missing folder).
            exact_below: For a new index: search exactly below this many rows (at least 10,000).

        Raises:
            InvalidInputError: ``path`` is not an index (or is corrupt); ``exact_below`` too small.
        """
        if exact_below is not None and (not isinstance(exact_below, int) or exact_below < MIN_EXACT_BELOW):
            raise InvalidInputError("exact_below", f"must be an int of at least {MIN_EXACT_BELOW}, got {exact_below!r}")
        store = _Store(path)
        if store.is_non_directory():
            raise InvalidInputError("path", f"{path} is a file, not a vector index folder")
        if store.exists(MANIFEST):
            return cls(store, _Manifest.parse(store.read_bytes(MANIFEST), f"{path}/{MANIFEST}"))
        if not create:
            raise InvalidInputError("path", f"{path} holds no vector index (no {MANIFEST})")
        if any(not name.startswith(".") for name in store.names()):
            raise InvalidInputError("path", f"{path} is not empty and holds no vector index; refusing to write there")
        store.mkdir()
        manifest = _Manifest(exact_below=exact_below or DEFAULT_EXACT_BELOW)
        if not store.commit(manifest, None):  # another writer created it first: theirs
            found = store.read_manifest()
            assert found is not None
            manifest = found[0]
        return cls(store, manifest)

    def __repr__(self) -> str:
        m = self._manifest
        return f"VectorIndex({self.path!r}, rows={m.rows}, dim={m.dim}, family={m.family!r}, version={m.version!r})"

    # -- searching ------------------------------------------------------------------------------

    async def asearch(
        self,
        query: Any,
        top_k: int = 10,
        *,
        server: ServerSpec = None,
        nprobe: int | None = None,
    ) -> list[IndexHit]:
        """Async twin of `search`: the query's embedding awaited, the search in a worker thread."""
        _check_top_k(top_k)
        vector, model, subject = _query(self, query, server)
        if model is not None:
            texts = isinstance(subject, str) and not looks_like_image(subject)
            embedded = await (model.aembed_texts([subject]) if texts else model.aembed_images([subject]))
            vector = _checked_embedding(self, embedded)
        return await asyncio.to_thread(self._hits, vector, top_k, nprobe)

    @async_dispatch(asearch)
    def search(
        self,
        query: Any,
        top_k: int = 10,
        *,
        server: ServerSpec = None,
        nprobe: int | None = None,
    ) -> list[IndexHit]:
        """The ``top_k`` rows most similar (cosine) to a vector, a text, or an image.

        Args:
            query: A vector (numpy array or list of floats, of the index's dimension); a text; an
                image as bytes, a `pathlib.Path`, an https URL, or a str path or storage reference
                (``s3://``, ``block://``, any fsspec URL) ending in an image suffix, read as
                `search_images` reads it.
                Texts and images are embedded with the index's model family and version.
            top_k: How many hits (at least 1).
            server: For text and image queries: an `InferenceServer`, a saved one's name, a URL or
                a list of URLs (default: ``INFERENCE_SERVER_URL``, then ``http://localhost:9001``).
            nprobe: IVF lists to visit (more: better recall, slower); a size-based default.

        Raises:
            InvalidInputError: ``top_k`` < 1, a vector of another dimension, an empty index, a
                bad ``nprobe`` — all before any request.

        Examples:
            ```python
            hits = VectorIndex.open("out/index").search("a red car", top_k=5)
            [(h.rank, round(h.score, 3), h.image_ref) for h in hits]
            ```
        """
        _check_top_k(top_k)
        vector, model, subject = _query(self, query, server)
        if model is not None:
            texts = isinstance(subject, str) and not looks_like_image(subject)
            vector = _checked_embedding(self, model.embed_texts([subject]) if texts else model.embed_images([subject]))
        return self._hits(vector, top_k, nprobe)

    def _hits(self, vector: np.ndarray, top_k: int, nprobe: int | None) -> list[IndexHit]:
        scores, rows = self.knn(vector[None, :], top_k, nprobe=nprobe)
        meta = self.metadata(rows[0][rows[0] >= 0]).to_pylist()
        return [
            IndexHit(rank=i + 1, score=float(scores[0][i]), row=int(rows[0][i]), **meta[i]) for i in range(len(meta))
        ]

    def knn(
        self, queries: np.ndarray, k: int, *, nprobe: int | None = None, refine: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Batch k-nearest rows: ``(scores, rows)``, each ``(len(queries), k)``, best first.

        Exact below ``exact_below`` rows; above, IVF-PQ candidates (``refine`` × k of them,
        at least 100 by default) re-ranked by their exact vectors, merged with an exact scan of
        rows added since the IVF-PQ was written. Missing hits (k > rows) are row -1, score -inf.
        """
        return _knn(self, queries, k, nprobe, refine)

    # -- adding ---------------------------------------------------------------------------------

    def add(self, rows: RowBatch | Iterable[RowBatch], *, family: str, version: str) -> AddResult:
        """Add rows in one commit: all become searchable together, or (on any failure) none do.

        Rows whose (sha256, reference, detection index) the index already holds are skipped, also
        those another writer added while this add ran. The index then holds the committed state,
        other writers' rows included.

        Args:
            rows: One `RowBatch`, or an iterable of them (streamed: one segment at a time in memory).
            family: The model family (``"clip"``, ``"perception_encoder"``; class names accepted).
            version: The model version.

        Raises:
            InvalidInputError: another family, version or dimension than the index's rows; a
                batch whose columns differ in length; a vector that is not finite or is zero.
        """
        family = family_name(family, "family")
        _check_model(self._manifest, family, version)
        batches = [rows] if isinstance(rows, RowBatch) else rows
        added, skipped, retrained, manifest = _commit_add(self, batches, family, version)
        if manifest is not self._manifest:
            self.close()
            self._manifest, self._meta, self._ann = manifest, {}, None
            self._load()
        return AddResult(added=added, skipped=skipped, rows=self.rows, ann_rows=self.ann_rows, retrained=retrained)


# --- from a flow's table -------------------------------------------------------------------------


def update_index_from_table(
    table_path: str | os.PathLike[str],
    index_path: str | os.PathLike[str],
    *,
    exact_below: int | None = None,
    batch_rows: int = 50_000,
) -> AddResult:
    """Add a flow's embeddings table to the index at ``index_path`` (created if missing).

    The table is one written by ``embed_images``, ``classify_images`` or ``detect_crop_classify``
    (``image_ref, image_sha256, model, version, embedding, status`` [+ ``detection_index``]); only
    its ``status == "ok"`` rows are added, read ``batch_rows`` at a time, and rows the index already
    holds are skipped, so calling this after every run adds only what is new.

    Raises:
        InvalidInputError: ``table_path`` is missing, lacks a column, or mixes models; its model,
            version or dimension differs from the index's (``index_path``).
    """
    with local_copy(table_path, field="table_path") as local:  # a bucket's table streamed to a temp file
        return _add_table(local, table_path, index_path, exact_below, batch_rows)


def _add_table(
    local: Path, table_path: Any, index_path: str | os.PathLike[str], exact_below: int | None, batch_rows: int
) -> AddResult:
    try:
        source = pq.ParquetFile(local)
    except (OSError, pa.ArrowInvalid) as error:
        raise InvalidInputError("table_path", f"{table_path} is not a readable parquet table: {error}") from None
    needed = {"image_ref", "image_sha256", "model", "version", "embedding", "status"}
    missing = needed - set(source.schema_arrow.names)
    if missing:
        raise InvalidInputError("table_path", f"{table_path} lacks column(s) {sorted(missing)}")
    identity = _table_identity(source, table_path)
    index = VectorIndex.open(index_path, create=True, exact_below=exact_below)
    if identity is None:
        return AddResult(added=0, skipped=0, rows=index.rows, ann_rows=index.ann_rows, retrained=False)
    columns = sorted(needed | ({"detection_index"} & set(source.schema_arrow.names)))
    return index.add(_table_batches(source, columns, batch_rows), family=identity[0], version=identity[1])


def _table_identity(source: pq.ParquetFile, table_path: Any) -> tuple[str, str] | None:
    """The table's one (family, version) over its ok rows; None when it has no ok rows."""
    pairs: set[tuple[str, str]] = set()
    for batch in source.iter_batches(columns=["model", "version", "status"], batch_size=65_536):
        ok = pa.Table.from_batches([batch]).filter(pc.equal(batch.column("status"), "ok"))
        for pair in ok.group_by(["model", "version"]).aggregate([]).to_pylist():
            pairs.add((str(pair["model"]), str(pair["version"])))
    families = {(family_name(m, "table_path"), v) for m, v in pairs}
    if len(families) > 1:
        raise InvalidInputError("table_path", f"{table_path} mixes models: {sorted(families)}")
    return families.pop() if families else None


def _table_batches(source: pq.ParquetFile, columns: list[str], batch_rows: int) -> Iterator[RowBatch]:
    for batch in source.iter_batches(columns=columns, batch_size=batch_rows):
        ok = batch.filter(pc.equal(batch.column("status"), "ok"))
        if ok.num_rows == 0:
            continue
        embedding = ok.column("embedding")
        vectors = np.asarray(pc.list_flatten(embedding).to_numpy(zero_copy_only=False), dtype=np.float32)
        lengths = pc.list_value_length(embedding).to_numpy(zero_copy_only=False)
        if len(set(lengths.tolist())) != 1:
            raise InvalidInputError("table_path", f"embeddings of several lengths: {sorted(set(lengths.tolist()))}")
        detections = ok.column("detection_index").to_pylist() if "detection_index" in ok.schema.names else None
        yield RowBatch(
            image_refs=ok.column("image_ref").to_pylist(),
            image_sha256s=ok.column("image_sha256").to_pylist(),
            vectors=vectors.reshape(ok.num_rows, int(lengths[0])),
            detection_indices=detections,
        )
