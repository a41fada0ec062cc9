"""A vector index over embeddings: exact search while small, IVF-PQ (faiss) once large.

An index is a folder — a local path or an object-storage URL that fsspec opens
(``s3://bucket/index``) — of immutable files and one manifest naming them:

```
manifest.json            the commit point: dimension, model family and version, segments, ANN file
seg-<n>-<id>.npy         a segment's vectors: float32, L2-normalised, memory-mapped when searching
seg-<n>-<id>.parquet     its rows: image_ref, image_sha256, detection_index, family, version
ann-<id>.faiss           IVF-PQ over the first ``ann.rows`` rows (absent below ``exact_below`` rows)
```

`VectorIndex.add` writes new files first and replaces the manifest last (an atomic rename,
or one object PUT), so a crash at any point leaves the index searchable at its previous state;
the next add deletes what the crashed one left. Rows already present (same sha256, reference
and detection) are skipped, so a rerun over a superset adds only the new rows. New rows are
encoded into the existing IVF-PQ without retraining; it is retrained only when the index has
grown fourfold since its last training.

Searching keeps the PQ codes (64 bytes a row) in memory and re-ranks each query's candidates
with their exact float32 vectors read from the memory-mapped segments: at 1,000,000 × 512 a
searching process stays well under 1 GB (the raw vectors alone are 2 GB).

One writer at a time; any number of readers (a reader sees the state it opened).

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
import contextlib
import hashlib
import json
import os
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel

from prefect_roboflow.blocks import Clip, PerceptionEncoder
from prefect_roboflow.blocks._compat import async_dispatch
from prefect_roboflow.blocks.exceptions import InvalidInputError

from ._config import ServerSpec, resolve_server

__all__ = [
    "DEFAULT_EXACT_BELOW",
    "AddResult",
    "IndexHit",
    "RowBatch",
    "VectorIndex",
    "family_name",
    "update_index_from_table",
]

FORMAT = "prefect-roboflow-vector-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: Below this many rows every search is exact (a float32 scan of a few ms); above it, IVF-PQ.
DEFAULT_EXACT_BELOW = 20_000
#: The smallest ``exact_below`` allowed: PQ needs ~10,000 rows to train its codebooks.
MIN_EXACT_BELOW = 10_000
#: Rows per segment file written by one add.
SEGMENT_ROWS = 100_000
#: Rows scored at once by an exact scan (bounds the scan's memory to block × queries floats).
SCAN_BLOCK = 32_768
#: Reads of up to this many runs of adjacent rows use ``pread`` (a query's re-ranking, a block of
#: rows); more scattered ones gather through the memory map.
PREAD_MAX_RUNS = 2_048
#: Retrain the IVF-PQ once the index holds this many times the rows it was trained on.
RETRAIN_GROWTH = 4
_FAMILIES = {
    "clip": "clip",
    "perception_encoder": "perception_encoder",
    "Clip": "clip",
    "PerceptionEncoder": "perception_encoder",
}
_BLOCKS: dict[str, type[Clip] | type[PerceptionEncoder]] = {"clip": Clip, "perception_encoder": PerceptionEncoder}
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
META_SCHEMA = pa.schema(
    [
        ("image_ref", pa.string()),
        ("image_sha256", pa.string()),
        ("detection_index", pa.int32()),
        ("family", pa.string()),
        ("version", pa.string()),
    ]
)


def family_name(model: str, field_name: str = "model") -> str:
    """The model family of a table's ``model`` value: ``"clip"`` or ``"perception_encoder"``.

    The class names older tables carry (``"Clip"``, ``"PerceptionEncoder"``) map to their family.

    Examples:
        >>> family_name("Clip")
        'clip'
    """
    try:
        return _FAMILIES[model]
    except (KeyError, TypeError):
        raise InvalidInputError(
            field_name, f"unknown model family {model!r}; expected one of {sorted(_FAMILIES)}"
        ) from None


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


@dataclass
class RowBatch:
    """Rows to add: references, content hashes and one vector each (detection index optional)."""

    image_refs: Sequence[str]
    image_sha256s: Sequence[str | None]
    vectors: Any  # array-like (n, dim)
    detection_indices: Sequence[int | None] | None = None


@dataclass
class _Segment:
    name: str
    rows: int


@dataclass
class _Manifest:
    dim: int | None = None
    family: str | None = None
    version: str | None = None
    exact_below: int = DEFAULT_EXACT_BELOW
    segments: list[_Segment] = field(default_factory=list)
    ann: dict[str, Any] | None = None  # {"file", "rows", "trained_rows", "nlist", "m"}
    generation: int = 0

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.segments)

    def to_json(self) -> bytes:
        body = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dim": self.dim,
            "family": self.family,
            "version": self.version,
            "exact_below": self.exact_below,
            "segments": [{"name": s.name, "rows": s.rows} for s in self.segments],
            "ann": self.ann,
            "generation": self.generation,
        }
        return json.dumps(body, indent=1).encode()

    @classmethod
    def parse(cls, raw: bytes, where: str) -> _Manifest:
        try:
            body = json.loads(raw)
            if body.get("format") != FORMAT or body.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"not a {FORMAT} v{FORMAT_VERSION} manifest")
            segments = [_Segment(str(s["name"]), int(s["rows"])) for s in body["segments"]]
            ann = body["ann"]
            if ann is not None and not {"file", "rows", "trained_rows"} <= set(ann):
                raise ValueError("its ann entry lacks file/rows/trained_rows")
            return cls(
                dim=body["dim"],
                family=body["family"],
                version=body["version"],
                exact_below=int(body["exact_below"]),
                segments=segments,
                ann=ann,
                generation=int(body["generation"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise InvalidInputError("path", f"{where} is a corrupt vector index manifest: {error}") from None


# --- storage: a local folder or an fsspec URL ------------------------------------------------


class _Store:
    """The index folder: immutable files plus a manifest replaced atomically."""

    def __init__(self, location: str | os.PathLike[str]) -> None:
        text = os.fspath(location)
        self.location = text
        self.remote = "://" in text and not text.startswith("file://")
        if self.remote:
            from fsspec.core import url_to_fs

            self.fs, self.root = url_to_fs(text)
            digest = hashlib.sha256(text.encode()).hexdigest()[:24]
            self.cache = Path(tempfile.gettempdir()) / "prefect-roboflow-index-cache" / digest
        else:
            self.root = str(Path(text.removeprefix("file://")).expanduser().resolve())

    def _remote_path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def exists(self, name: str) -> bool:
        if self.remote:
            return bool(self.fs.exists(self._remote_path(name)))
        return (Path(self.root) / name).exists()

    def names(self) -> list[str]:
        if self.remote:
            if not self.fs.exists(self.root):
                return []
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)]
        folder = Path(self.root)
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []

    def is_non_directory(self) -> bool:
        return not self.remote and Path(self.root).exists() and not Path(self.root).is_dir()

    def read_bytes(self, name: str) -> bytes:
        if self.remote:
            return bytes(self.fs.cat_file(self._remote_path(name)))
        return (Path(self.root) / name).read_bytes()

    def local_file(self, name: str) -> Path:
        """A local path of the file (an object-storage file is downloaded once: files never change)."""
        if not self.remote:
            return Path(self.root) / name
        target = self.cache / name
        if not target.exists():
            self.cache.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{name}.{os.getpid()}.tmp")
            self.fs.get_file(self._remote_path(name), str(tmp))
            os.replace(tmp, target)
        return target

    def put_file(self, name: str, source: Path) -> None:
        """Publish a finished local file under ``name`` (atomically for a local folder)."""
        if self.remote:
            self.fs.put_file(str(source), self._remote_path(name))
            os.replace(source, self.cache / name)  # what `local_file` would download
            return
        _fsync(source)
        os.replace(source, Path(self.root) / name)

    def put_bytes(self, name: str, data: bytes) -> None:
        if self.remote:
            self.fs.pipe_file(self._remote_path(name), data)
            return
        with self.scratch(name) as tmp:
            tmp.write_bytes(data)
            self.put_file(name, tmp)

    @contextlib.contextmanager
    def scratch(self, name: str) -> Iterator[Path]:
        """A temp file to write ``name`` into before `put_file` (removed if the block fails)."""
        folder = Path(self.root) if not self.remote else self.cache
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
        os.close(fd)
        path = Path(tmp)
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)

    def delete(self, name: str) -> None:
        if self.remote:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._remote_path(name))
        else:
            (Path(self.root) / name).unlink(missing_ok=True)

    def mkdir(self) -> None:
        if self.remote:
            self.fs.makedirs(self.root, exist_ok=True)
        else:
            Path(self.root).mkdir(parents=True, exist_ok=True)


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


# --- the index ----------------------------------------------------------------------------------


class VectorIndex:
    """Embeddings of one model family and version, searchable by cosine similarity.

    Open with `VectorIndex.open`; rows go in with `add` (or `update_index_from_table`).

    Examples:
        ```python
        index = VectorIndex.open("out/index", create=True)
        index.add(RowBatch(["a.jpg"], [sha], vectors), family="clip", version="ViT-B-16")
        hits = index.search(vectors[0], top_k=5)
        ```
    """

    def __init__(self, store: _Store, manifest: _Manifest) -> None:
        self._store = store
        self._manifest = manifest
        self._vectors: list[np.ndarray] = []
        self._offsets = np.zeros(1, dtype=np.int64)
        self._meta: dict[int, pa.Table] = {}
        self._ann: Any = None
        self._files: list[Any] = []
        self._load()

    # -- opening ----------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, create: bool = False, exact_below: int | None = None) -> VectorIndex:
        """Open the index at ``path`` (a folder or an object-storage URL).

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
        store.put_bytes(MANIFEST, manifest.to_json())
        return cls(store, manifest)

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

    def __enter__(self) -> VectorIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        m = self._manifest
        return f"VectorIndex({self.path!r}, rows={m.rows}, dim={m.dim}, family={m.family!r}, version={m.version!r})"

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
        vector, model, subject = self._query(query, server)
        if model is not None:
            texts = isinstance(subject, str) and not _looks_like_image(subject)
            embedded = await (model.aembed_texts([subject]) if texts else model.aembed_images([subject]))
            vector = self._checked_embedding(embedded)
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
                image as bytes, a `pathlib.Path`, or a str path/https URL ending in an image suffix.
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
        vector, model, subject = self._query(query, server)
        if model is not None:
            texts = isinstance(subject, str) and not _looks_like_image(subject)
            vector = self._checked_embedding(model.embed_texts([subject]) if texts else model.embed_images([subject]))
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
        _check_top_k(k, "k")
        queries = self._check_queries(queries)
        if self._ann is None or self.rows < self.exact_below:
            return _exact_knn(self.iter_vectors(), queries, k)
        scores, rows = self._ann_knn(queries, k, nprobe, refine)
        if self.ann_rows < self.rows:
            tail = ((start, v) for start, v in self.iter_vectors() if start + len(v) > self.ann_rows)
            tail_scores, tail_rows = _exact_knn(_from_row(tail, self.ann_rows), queries, k)
            scores, rows = _merge(scores, rows, tail_scores, tail_rows, k)
        return scores, rows

    def _ann_knn(
        self, queries: np.ndarray, k: int, nprobe: int | None, refine: int | None
    ) -> tuple[np.ndarray, np.ndarray]:
        assert self._manifest.ann is not None
        nlist = int(self._manifest.ann["nlist"])
        if nprobe is not None and (not isinstance(nprobe, int) or not 1 <= nprobe <= nlist):
            raise InvalidInputError("nprobe", f"must be an int in 1..{nlist}, got {nprobe!r}")
        self._ann.nprobe = nprobe or max(8, nlist // 16)
        wanted = min(self.ann_rows, max(k * (refine or 10), 100 if refine is None else k))
        _, candidates = self._ann.search(queries, wanted)
        valid = candidates >= 0
        flat = np.where(valid, candidates, 0).ravel()
        exact = np.einsum("qcd,qd->qc", self.vectors(flat).reshape(*candidates.shape, -1), queries)
        exact[~valid] = -np.inf
        top = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        rows = np.take_along_axis(np.where(valid, candidates, -1), top, axis=1)
        return np.take_along_axis(exact, top, axis=1), rows

    def _check_queries(self, queries: Any) -> np.ndarray:
        array = np.asarray(queries, dtype=np.float32)
        if array.ndim != 2 or array.shape[1] != self.dim:
            raise InvalidInputError(
                "query", f"expected vectors of dimension {self.dim} (the index's), got shape {array.shape}"
            )
        return _normalise(array, "query")

    def _query(self, query: Any, server: ServerSpec) -> tuple[np.ndarray, Clip | PerceptionEncoder | None, Any]:
        """``(vector, None, None)`` for a vector; ``(empty, model, text-or-image)`` to embed — checked first."""
        if self.rows == 0:
            raise InvalidInputError("query", f"the index at {self.path} is empty")
        if isinstance(query, (np.ndarray, list, tuple)):
            return self._check_queries(np.asarray(query, dtype=np.float32).reshape(1, -1))[0], None, None
        if not isinstance(query, (str, bytes, Path)):
            raise InvalidInputError("query", f"expected a vector, a text or an image, got {type(query).__name__}")
        assert self.family is not None and self.version is not None
        subject = query if isinstance(query, str) and not _looks_like_image(query) else _image_input(query)
        model = _BLOCKS[self.family](server=resolve_server(server), version=self.version)
        return np.empty(0, dtype=np.float32), model, subject

    def _checked_embedding(self, embedded: np.ndarray) -> np.ndarray:
        if embedded.shape != (1, self.dim):  # the server's answer is input too
            raise InvalidInputError("query", f"the server's embedding has shape {embedded.shape}, index dim {self.dim}")
        return self._check_queries(embedded)[0]

    # -- adding ---------------------------------------------------------------------------------

    def add(self, rows: RowBatch | Iterable[RowBatch], *, family: str, version: str) -> AddResult:
        """Add rows in one commit: all become searchable together, or (on any failure) none do.

        Rows whose (sha256, reference, detection index) the index already holds are skipped.

        Args:
            rows: One `RowBatch`, or an iterable of them (streamed: one segment at a time in memory).
            family: The model family (``"clip"``, ``"perception_encoder"``; class names accepted).
            version: The model version.

        Raises:
            InvalidInputError: another family, version or dimension than the index's rows; a
                batch whose columns differ in length; a vector that is not finite or is zero.
        """
        family = family_name(family, "family")
        self._check_model(family, version)
        result, manifest = _commit_add(self, [rows] if isinstance(rows, RowBatch) else rows, family, version)
        if manifest is not self._manifest:
            self.close()
            self._manifest, self._meta, self._ann = manifest, {}, None
            self._load()
        return result

    def _check_model(self, family: str, version: str) -> None:
        m = self._manifest
        if m.family is not None and family != m.family:
            raise InvalidInputError("family", f"the index holds {m.family!r} rows; refusing {family!r} rows")
        if m.version is not None and version != m.version:
            raise InvalidInputError("version", f"the index holds {m.family} {m.version!r} rows; refusing {version!r}")


# --- helpers ----------------------------------------------------------------------------------


def _check_top_k(top_k: Any, name: str = "top_k") -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise InvalidInputError(name, f"must be an int of at least 1, got {top_k!r}")


def _normalise(array: np.ndarray, name: str) -> np.ndarray:
    if not np.isfinite(array).all():
        raise InvalidInputError(name, "vectors must be finite (no NaN or inf)")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    if (norms == 0).any():
        raise InvalidInputError(name, f"row {int(np.flatnonzero(norms == 0)[0])} is a zero vector")
    return np.ascontiguousarray(array / norms, dtype=np.float32)


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


def _from_row(chunks: Iterable[tuple[int, np.ndarray]], first: int) -> Iterator[tuple[int, np.ndarray]]:
    for start, vectors in chunks:
        skip = max(0, first - start)
        if skip < len(vectors):
            yield start + skip, vectors[skip:]


def _exact_knn(chunks: Iterable[tuple[int, np.ndarray]], queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over chunks of rows, never more than one chunk × queries scores in memory."""
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    rows = np.full((len(queries), k), -1, dtype=np.int64)
    for start, vectors in chunks:
        block = queries @ np.asarray(vectors, dtype=np.float32).T
        if block.shape[1] > k:
            part = np.argpartition(-block, k - 1, axis=1)[:, :k]
        else:
            part = np.broadcast_to(np.arange(block.shape[1]), block.shape)
        scores, rows = _merge(scores, rows, np.take_along_axis(block, part, axis=1), part + start, k)
    return scores, rows


def _merge(
    scores: np.ndarray, rows: np.ndarray, more_scores: np.ndarray, more_rows: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    all_scores = np.concatenate([scores, more_scores], axis=1)
    all_rows = np.concatenate([rows, more_rows], axis=1)
    order = np.argsort(-all_scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(all_scores, order, axis=1), np.take_along_axis(all_rows, order, axis=1)


def _read_ann(store: _Store, name: str) -> Any:
    if store.remote:
        return faiss.deserialize_index(np.frombuffer(store.read_bytes(name), dtype=np.uint8))
    return faiss.read_index(str(store.local_file(name)))


def _looks_like_image(query: str) -> bool:
    return query.startswith(("http://", "https://")) or Path(query).suffix.lower() in _IMAGE_SUFFIXES


def _image_input(query: str | bytes | Path) -> str | bytes:
    if isinstance(query, bytes):
        return query
    text = str(query)
    if text.startswith(("http://", "https://")):
        return text
    path = Path(text).expanduser()
    if not path.is_file():
        raise InvalidInputError("query", f"image {text} does not exist")
    return path.read_bytes()


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
    try:
        source = pq.ParquetFile(table_path)
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


# --- adding: segments, the IVF-PQ, the commit ----------------------------------------------------


def _new_name(prefix: str, generation: int) -> str:
    return f"{prefix}-{generation:06d}-{uuid.uuid4().hex[:12]}"


def _commit_add(
    index: VectorIndex, batches: Iterable[RowBatch], family: str, version: str
) -> tuple[AddResult, _Manifest]:
    """Write the new rows' segments and IVF-PQ, then the manifest (the commit)."""
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
        return AddResult(added=0, skipped=skipped, rows=old.rows, ann_rows=index.ann_rows, retrained=False), old
    new.ann, retrained = _updated_ann(store, new, index._ann)
    store.put_bytes(MANIFEST, new.to_json())  # the commit point
    if old.ann and (new.ann is None or old.ann["file"] != new.ann["file"]):
        store.delete(old.ann["file"])
    ann_rows = int(new.ann["rows"]) if new.ann else 0
    return AddResult(added=added, skipped=skipped, rows=new.rows, ann_rows=ann_rows, retrained=retrained), new


def _remove_orphans(store: _Store, manifest: _Manifest) -> None:
    """Delete what a crashed add left: files the manifest does not name (this folder is the index's)."""
    keep = {MANIFEST} | {f"{s.name}{ext}" for s in manifest.segments for ext in (".npy", ".parquet")}
    if manifest.ann:
        keep.add(manifest.ann["file"])
    for name in store.names():
        if name not in keep:
            store.delete(name)


def _existing_keys(index: VectorIndex) -> set[tuple[str | None, str, int | None]]:
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
    return refs, shas, [None if d is None else int(d) for d in dets], _normalise(vectors, "vectors")


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
    with VectorIndex(store, replace(manifest, ann=None)) as staged:
        return _written_ann(store, manifest, current, staged)


def _written_ann(
    store: _Store, manifest: _Manifest, current: Any, staged: VectorIndex
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


def _trained_ann(index: VectorIndex) -> Any:
    """A fresh IVF-PQ (inner product on normalised vectors = cosine), trained on a sample of rows."""
    dim, total = int(index.dim or 0), index.rows
    nlist = int(min(4096, max(16, np.sqrt(total))))
    m = next(m for m in (64, 32, 16, 8, 4, 2, 1) if dim % m == 0)
    sample = np.sort(np.random.default_rng(0).choice(total, min(total, max(40 * nlist, 20_000)), replace=False))
    ann = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
    with _threads(1):
        ann.train(index.vectors(sample))
    return ann
