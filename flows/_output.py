"""Output files, written atomically: readers see the previous file or the whole new one.

Every local file is written to a hidden temp file beside its final name (created with the mode a
plain ``open(path, "w")`` gets under the umask) and renamed into place once complete, so neither a
crash nor a failed run leaves a half-written file under the final name; a table bound for an
object store goes up as one object (`_storage.AtomicParquetWriter`). Parquet tables stream batch
by batch into their temp file.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa

from ._storage import AtomicParquetWriter, _LocalReplace, is_remote

__all__ = ["ParquetSink", "atomic_write_bytes", "embedding_type"]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers see either the old file or the whole new one."""
    with _LocalReplace(path) as (handle, _):
        handle.write(data)


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
