"""Output files, written atomically: readers see the previous file or the whole new one.

A flow's ``out_dir`` is a local folder or an object-store location (``s3://bucket/prefix/``, any
fsspec URL, ``block://<type-slug>/<name>/<path>``; see `_storage`), checked by
`_run.parameters.resolve_out_dir`; output names are joined onto it with `_storage.join`.

Every local file is written to a hidden temp file beside its final name (created with the mode a
plain ``open(path, "w")`` gets under the umask) and renamed into place once complete, so neither a
crash nor a failed run leaves a half-written file under the final name. Every remote output goes
up as one whole object (one PUT, or a multipart upload that appears only once completed): a
reader sees the old object or the new one. Parquet tables stream batch by batch into a temp file
(`_storage.AtomicParquetWriter`); a folder built locally (a COCO or YOLO dataset) is published
file by file with its index last (`_storage.publish.publish_folder`). Those writes live in
`_storage` (`atomic`, `publish`); this module keeps what is about outputs themselves.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from types import TracebackType
from typing import Any

import pyarrow as pa

from .._storage.access import is_remote
from .._storage.atomic import remove_orphans
from .._storage.parquet import AtomicParquetWriter

__all__ = ["ParquetSink", "embedding_type", "show_location"]


def show_location(location: str) -> str:
    """A location for a summary in Markdown: a link for a local file, the URL as code otherwise
    (an ``out_dir`` URL never holds credentials: `_run.parameters.resolve_out_dir` refuses those)."""
    return f"`{location}`" if is_remote(location) else f"[{location}](file://{location})"


def embedding_type(dim: int | None = None) -> pa.DataType:
    """Arrow type of an embedding column: a list of float32 (fixed-size when ``dim`` is known)."""
    return pa.list_(pa.float32(), dim) if dim else pa.list_(pa.float32())


class ParquetSink:
    """Stream rows into a parquet table (a local path or an object-store URL) that appears whole
    when the block ends without an exception (`_storage.AtomicParquetWriter`); temp files that dead
    writers left beside a local table are removed first.

    In a flow, ``async with``: the table is opened (a bucket's client made), finished and published
    (fsynced and renamed, or uploaded) on worker threads, so the flow's event loop never waits on
    storage; write rows with `write` on a worker thread too (`_run.batch.BatchRun.write` does).

    Examples:
        ```python
        async with ParquetSink(out / "embeddings.parquet", schema) as sink:
            await asyncio.to_thread(sink.write, [{"image_ref": "a.jpg", ...}])
        # embeddings.parquet now exists, complete; on an exception it is untouched
        with ParquetSink(out / "t.parquet", schema) as sink:  # from sync code
            sink.write(rows)
        ```
    """

    def __init__(self, path: str | os.PathLike[str], schema: pa.Schema) -> None:
        self.path = os.fspath(path)  #: Where the table appears.
        self.schema = schema
        self._writer: AtomicParquetWriter | None = None

    def __enter__(self) -> ParquetSink:
        if not is_remote(self.path):
            remove_orphans(Path(self.path))
        self._writer = AtomicParquetWriter(self.path, self.schema)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._writer is not None, "the table was not opened"
        self._writer.__exit__(exc_type, exc, tb)

    async def __aenter__(self) -> ParquetSink:
        return await asyncio.to_thread(self.__enter__)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.__exit__, exc_type, exc, tb)

    @property
    def rows(self) -> int:
        """Rows written so far."""
        return self._writer.rows if self._writer is not None else 0

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Append rows (dicts keyed by column name)."""
        assert self._writer is not None, "the table was not opened: use it as a context manager"
        self._writer.write(rows)

    def write_table(self, table: pa.Table) -> None:
        """Append an Arrow table's rows (`AtomicParquetWriter.write_table`: millions of rows, no dicts)."""
        assert self._writer is not None, "the table was not opened: use it as a context manager"
        self._writer.write_table(table)
