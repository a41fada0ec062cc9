"""The on-disk layout of a vector index: its manifest, its folder, and atomic writes.

An index folder (a local path or an fsspec URL) holds immutable segment and IVF-PQ files and one
``manifest.json`` naming them; `_Store` reads and publishes those files (a local file atomically by
rename, an object by one PUT) and `_Manifest` is the manifest's content. The index itself is
`prefect_roboflow.flows.vector_index.VectorIndex`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from prefect_roboflow.blocks.exceptions import InvalidInputError

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


def _new_name(prefix: str, generation: int) -> str:
    return f"{prefix}-{generation:06d}-{uuid.uuid4().hex[:12]}"


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


def is_index(path: str) -> bool:
    """Whether ``path`` (a folder or an object-storage URL) holds a vector index, not a table."""
    if path.endswith(".parquet"):
        return False
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    return bool(fs.exists(f"{root.rstrip('/')}/{MANIFEST}"))
