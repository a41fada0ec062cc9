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

import os
from pathlib import Path

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
            remove_orphans(Path(path))
        super().__init__(path, schema)

    @property
    def path(self) -> str:
        """Where the table appears."""
        return self.url
