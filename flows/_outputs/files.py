"""Output files, written atomically: readers see the previous file or the whole new one.

A flow's ``out_dir`` is a local folder or an object-store location (``s3://bucket/prefix/``, any
fsspec URL, ``block://<type-slug>/<name>/<path>``; see `_storage`), checked by
`_config.resolve_out_dir`; output names are joined onto it with `_storage.join`.

Every local file is written to a hidden temp file beside its final name (created with the mode a
plain ``open(path, "w")`` gets under the umask) and renamed into place once complete, so neither a
crash nor a failed run leaves a half-written file under the final name. Every remote output goes
up as one whole object (one PUT, or a multipart upload that appears only once completed): a
reader sees the old object or the new one. Parquet tables stream batch by batch into a temp file
(`_storage.AtomicParquetWriter`); a folder built locally (a COCO or YOLO dataset) is published
file by file with its index last (`publish_folder`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa

from .._storage.access import atomic_write_bytes, is_remote, write_bytes
from .._storage.listing import LIST_PAGE_SIZE
from .._storage.locate import locate
from .._storage.parquet import AtomicParquetWriter
from .._storage.stores import Store, output_error

__all__ = ["ParquetSink", "atomic_write_bytes", "embedding_type", "publish_folder", "show_location", "write_output"]

#: Objects uploaded at once when a folder is published.
UPLOAD_CONCURRENCY = 8


def write_output(url: str, data: bytes) -> None:
    """Write one output file (a local path) or object (a URL) whole: readers see the old or the new one.

    Examples:
        ```python
        write_output(join(out, "annotated/a-0f3c.jpg"), jpeg)  # out: "/data/run" or "s3://results/run/"
        ```
    """
    if is_remote(url):
        write_bytes(url, data)
    else:
        atomic_write_bytes(Path(url), data)


def show_location(location: str) -> str:
    """A location for a summary in Markdown: a link for a local file, the URL as code otherwise
    (an ``out_dir`` URL never holds credentials: `_config.resolve_out_dir` refuses those)."""
    return f"`{location}`" if is_remote(location) else f"[{location}](file://{location})"


def publish_folder(folder: Path, url: str, index: Sequence[str] = ()) -> int:
    """Upload the files of a local folder under the prefix ``url``, each as one whole object.

    The ``index`` files (paths relative to ``folder``, e.g. ``annotations.json``) go up last, once
    everything they name is in place; objects under ``url`` that the folder does not hold (left
    by an earlier run) are deleted after that, where the store can list. So a reader that starts
    from the index sees the old dataset whole or the new one whole, except that an object the new
    dataset dropped can vanish under a reader still holding the old index.

    Returns:
        The number of objects written.

    Raises:
        InvalidInputError: naming ``out_dir``, when the store refuses a write.
    """
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    store, base = locate(url.rstrip("/") + "/", "out_dir")
    last = [name for name in files if name in index]
    first = [name for name in files if name not in index]

    def upload(name: str) -> None:
        with (folder / name).open("rb") as file:
            store.upload(base + name, file)

    try:
        with ThreadPoolExecutor(UPLOAD_CONCURRENCY) as pool:
            list(pool.map(upload, first))
        for name in last:
            upload(name)
    except Exception as exc:
        error = output_error(store, url, "out_dir", exc)
        if error is None:
            raise
        raise error from None
    _delete_stale(store, base, set(files))
    return len(files)


def _delete_stale(store: Store, base: str, keep: set[str]) -> None:
    """Delete objects under ``base`` that are not in ``keep`` (nothing where the store cannot list)."""
    try:
        listed = list(store.list(base, recursive=True, page_size=LIST_PAGE_SIZE))
    except NotImplementedError:
        return
    for rel in listed:
        if rel[len(base) :] not in keep:
            store.delete(rel)


def embedding_type(dim: int | None = None) -> pa.DataType:
    """Arrow type of an embedding column: a list of float32 (fixed-size when ``dim`` is known)."""
    return pa.list_(pa.float32(), dim) if dim else pa.list_(pa.float32())


def _remove_orphans(path: Path) -> None:
    """Delete temp files of ``path`` left by writers that died (their PID is in the name)."""
    for orphan in path.parent.glob(f".{path.name}.*.tmp"):
        pid = orphan.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            orphan.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ParquetSink(AtomicParquetWriter):
    """Stream rows into a parquet table (a local path or an object-store URL) that appears whole on
    `commit`; temp files that dead writers left beside a local table are removed first.

    Examples:
        ```python
        with ParquetSink(out / "embeddings.parquet", schema) as sink:
            sink.write([{"image_ref": "a.jpg", ...}])
        # embeddings.parquet now exists, complete; on an exception it is untouched
        ```
    """

    def __init__(self, path: str | os.PathLike[str], schema: pa.Schema) -> None:
        if not is_remote(path):
            _remove_orphans(Path(path))
        super().__init__(path, schema)

    @property
    def path(self) -> str:
        """Where the table appears."""
        return self.url
