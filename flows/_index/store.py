"""The on-disk layout of a vector index: its manifest, its folder, and atomic writes.

An index folder (a local path, an ``s3://`` or fsspec URL, or a ``block://`` path) holds immutable
segment and IVF-PQ files and one ``manifest.json`` naming them; `_Store` reads and publishes those
files through `_storage` (a local file atomically by fsync and rename, an object by one PUT or
completed upload) and `_Manifest` is the manifest's content. The index itself is
`prefect_roboflow.flows.vector_index.VectorIndex`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa

from prefect_roboflow.blocks.exceptions import InvalidInputError

from .._storage.access import read_at
from .._storage.atomic import LocalReplace, publish_file, scratch_file
from .._storage.locate import locate
from .._storage.stores import BlockStore, LocalStore, Store

_T = TypeVar("_T")

__all__ = [
    "DEFAULT_EXACT_BELOW",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "META_SCHEMA",
    "MIN_EXACT_BELOW",
    "_Manifest",
    "_Segment",
    "_Store",
    "_new_name",
]

FORMAT = "prefect-roboflow-vector-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: Below this many rows every search is exact (a float32 scan of a few ms); above it, IVF-PQ.
DEFAULT_EXACT_BELOW = 20_000
#: The smallest ``exact_below`` allowed: PQ needs ~10,000 rows to train its codebooks.
MIN_EXACT_BELOW = 10_000
META_SCHEMA = pa.schema(
    [
        ("image_ref", pa.string()),
        ("image_sha256", pa.string()),
        ("detection_index", pa.int32()),
        ("family", pa.string()),
        ("version", pa.string()),
    ]
)


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
    #: IVF-PQ files a commit replaced, with when (seconds since the epoch): kept a while for
    #: readers that opened an earlier manifest (`_index.add.GRACE_SECONDS`).
    retired: dict[str, float] = field(default_factory=dict)

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
            "retired": self.retired,
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
                retired={str(k): float(v) for k, v in dict(body.get("retired") or {}).items()},
            )
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise InvalidInputError("path", f"{where} is a corrupt vector index manifest: {error}") from None


def _new_name(prefix: str, generation: int) -> str:
    return f"{prefix}-{generation:06d}-{uuid.uuid4().hex[:12]}"


# --- storage: an adapter over `_storage` --------------------------------------------------------


class _Store:
    """The index folder, through `_storage`: immutable files plus a manifest replaced atomically.

    ``location`` is anything `_storage.locate` takes as a folder — a local path or ``file://`` URL,
    ``s3://bucket/prefix`` (the tuned boto3 client), any fsspec URL, or
    ``block://<type-slug>/<name>/<path>`` of a saved block that can list (``s3-bucket``,
    ``local-file-system``, ``remote-file-system``). Files of a remote index are streamed once into
    a local read cache (they never change) so that segments can be memory-mapped; files written
    here are put in that cache as they are uploaded.
    """

    def __init__(self, location: str | os.PathLike[str], field: str = "path") -> None:
        text = os.fspath(location)
        self.location, self.field = text, field
        store, rel = locate(text.rstrip("/") + "/", field)
        self.remote = not isinstance(store, LocalStore)  # a local-file-system block's folder is local too
        if isinstance(store, BlockStore):
            raise InvalidInputError(
                field, f"{text}: a vector index needs a store that can list and delete (a folder, bucket or URL)"
            )
        self.store: Store = store
        if isinstance(store, LocalStore):
            self.root = str(Path(store.base + rel).expanduser().resolve())
            self.store, self.base = LocalStore(), self.root + "/"
        else:
            self.store, self.base = store, rel
            digest = hashlib.sha256(text.encode()).hexdigest()[:24]
            self.cache = Path(tempfile.gettempdir()) / "prefect-roboflow-index-cache" / digest

    def _call(self, operation: Callable[[], _T]) -> _T:
        """A storage call whose failure (no bucket, access denied…) is an error naming the field."""
        try:
            return operation()
        except InvalidInputError:
            raise
        except Exception as exc:
            reason = self.store.explain(exc)
            if reason is None:
                raise
            raise InvalidInputError(self.field, f"{self.location}: {reason}") from None

    def read_manifest(self) -> tuple[_Manifest, str] | None:
        """The committed manifest and a tag naming its version (for `commit`); None when there is none."""

        def read() -> tuple[bytes, str] | None:
            try:
                return self.store.read_tagged(self.base + MANIFEST)
            except FileNotFoundError:
                return None

        found = self._call(read)
        if found is None:
            return None
        return _Manifest.parse(found[0], f"{self.location}/{MANIFEST}"), found[1]

    def commit(self, manifest: _Manifest, tag: str | None) -> bool:
        """Replace the manifest by ``manifest`` only if it is still the version ``tag`` names
        (None: only if there is none yet): the commit point of an add. False, changing nothing,
        when another writer committed first (`_storage.stores.Store.write_if`)."""
        return self._call(lambda: self.store.write_if(self.base + MANIFEST, manifest.to_json(), tag))

    def modified(self) -> dict[str, float]:
        """The index folder's files, with when each was last written (seconds since the epoch)."""
        return self._call(lambda: self.store.modified(self.base))

    def exists(self, name: str) -> bool:
        return self._call(lambda: self.store.kind(self.base + name)) == "file"

    def names(self) -> list[str]:
        """The names in the index folder, files and sub-folders (none for a missing folder)."""
        return [name.rstrip("/") for name in self._call(lambda: self.store.entries(self.base))]

    def is_non_directory(self) -> bool:
        return not self.remote and Path(self.root).exists() and not Path(self.root).is_dir()

    def read_bytes(self, name: str) -> bytes:
        return read_at(self.store, self.base + name, field=self.field)

    def local_file(self, name: str) -> Path:
        """A local path of the file (a remote file is streamed once into the read cache: files never change)."""
        if not self.remote:
            return Path(self.root) / name
        target = self.cache / name
        if not target.exists():
            with LocalReplace(target) as (file, _):  # streamed, never whole in memory
                self._call(lambda: self.store.download(self.base + name, file))
        return target

    def put_file(self, name: str, source: Path) -> None:
        """Publish a finished local file (from `scratch`) under ``name``: renamed into place in a
        local folder, uploaded whole (and kept in the read cache) elsewhere."""
        if self.remote:
            with open(source, "rb") as file:
                self._call(lambda: self.store.upload(self.base + name, file))
            publish_file(source, self.cache / name)  # what `local_file` would download
            return
        publish_file(source, Path(self.root) / name)

    def put_bytes(self, name: str, data: bytes) -> None:
        if self.remote:
            self._call(lambda: self.store.write(self.base + name, data))
            return
        with self.scratch(name) as tmp:
            tmp.write_bytes(data)
            self.put_file(name, tmp)

    @contextlib.contextmanager
    def scratch(self, name: str) -> Iterator[Path]:
        """A temp file to write ``name`` into before `put_file` (removed if the block fails)."""
        folder = Path(self.root) if not self.remote else self.cache
        with scratch_file(folder / name) as tmp:
            yield tmp

    def delete(self, name: str) -> None:
        self._call(lambda: self.store.delete(self.base + name))

    def mkdir(self) -> None:
        self._call(lambda: self.store.makedirs(self.base))


def is_index(path: str, field: str = "embeddings_path") -> bool:
    """Whether ``path`` (a folder, an object-storage URL or a ``block://`` path) holds a vector
    index, not a table."""
    if path.endswith(".parquet"):
        return False
    store, rel = locate(path.rstrip("/") + "/", field)
    if isinstance(store, BlockStore):
        return False
    try:
        return store.kind(rel + MANIFEST) == "file"
    except Exception as exc:
        reason = store.explain(exc)
        if reason is None:
            raise
        raise InvalidInputError(field, f"{path}: {reason}") from None
