"""Output files, written atomically: readers see the previous file or the whole new one.

Every file is written to a hidden temp file beside its final name and renamed into place once
complete, so neither a crash nor a failed run leaves a half-written file under the final name.
Files get the permissions a plain ``open(path, "w")`` would give under the process umask (the
temp file's private 0600 is not kept). Parquet tables stream batch by batch into their temp file.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["ParquetSink", "atomic_write_bytes", "embedding_type"]


def _process_umask() -> int:
    """The umask, read without changing it where Linux tells it (``os.umask`` sets it to read it)."""
    try:
        match = re.search(r"^Umask:\s*([0-7]+)", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        match = None
    if match:
        return int(match.group(1), 8)
    current = os.umask(0o022)
    os.umask(current)
    return current


def _publish(tmp: Path, path: Path) -> None:
    """Give a finished temp file normal permissions and move it to its final name."""
    os.chmod(tmp, 0o666 & ~_process_umask())
    os.replace(tmp, path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers see either the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        _publish(Path(tmp), path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


class ParquetSink:
    """Stream rows into a parquet file that appears atomically on `commit`.

    Examples:
        ```python
        with ParquetSink(out / "embeddings.parquet", schema) as sink:
            sink.write([{"image_ref": "a.jpg", ...}])
        # embeddings.parquet now exists, complete; on an exception it is untouched
        ```
    """

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path = path
        self.schema = schema
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_orphans(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
        os.close(fd)
        self._tmp = Path(tmp)
        self._writer: pq.ParquetWriter | None = pq.ParquetWriter(self._tmp, schema, compression="zstd")
        self.rows = 0

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Append rows (dicts keyed by column name)."""
        if not rows:
            return
        assert self._writer is not None, "sink already closed"
        self._writer.write_table(pa.Table.from_pylist(rows, schema=self.schema))
        self.rows += len(rows)

    def commit(self) -> Path:
        """Close the file and move it into place."""
        assert self._writer is not None, "sink already closed"
        self._writer.close()
        self._writer = None
        _publish(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop everything written; the final path is left as it was."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ParquetSink:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
