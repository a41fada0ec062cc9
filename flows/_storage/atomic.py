"""The one atomic local write: a temp file beside the target, fsynced, renamed onto it.

Every local file a flow publishes — a table, an annotated image, a vector index's
segment or manifest — is written to a hidden temp file beside its final name (created with the
mode a plain ``open(path, "w")`` gets under the umask, and a name that carries the writer's PID),
flushed to disk with ``fsync`` and renamed onto the final name. A reader sees the old file or the
whole new one; a crash leaves at most a temp file, which `remove_orphans` deletes once its writer
is dead.

Examples:
    ```python
    atomic_write_bytes(Path("out/a.jpg"), jpeg)  # out/a.jpg appears whole
    with LocalReplace(Path("out/t.parquet")) as (file, _):
        file.write(data)  # renamed into place on leaving the block; dropped on an exception
    ```
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = ["LocalReplace", "atomic_write_bytes", "publish_file", "remove_orphans", "scratch_file", "temp_beside"]


def temp_beside(path: Path) -> Path:
    """A fresh hidden temp name beside ``path``: ``.<name>.<pid>.<random>.tmp``."""
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def _create(path: Path) -> IO[bytes]:
    """A new file opened for writing, with the umask's mode (never replacing an existing file)."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb")


def publish_file(tmp: Path, target: Path) -> None:
    """Flush a finished file ``tmp`` to disk and rename it onto ``target`` (same file system)."""
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, target)


class LocalReplace:
    """A new file beside ``path``, created with the umask's mode, fsynced and renamed onto ``path``
    on success (removed on an exception)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.tmp = temp_beside(path)
        self.file = _create(self.tmp)

    def __enter__(self) -> tuple[IO[bytes], Path]:
        return self.file, self.tmp

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            try:
                self.file.flush()
                os.fsync(self.file.fileno())
            finally:
                self.file.close()
            os.replace(self.tmp, self.path)
        else:
            self.file.close()
            self.tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers see either the old file or the whole new one."""
    with LocalReplace(path) as (handle, _):
        handle.write(data)


@contextlib.contextmanager
def scratch_file(path: Path) -> Iterator[Path]:
    """An empty temp file beside ``path`` (umask mode) to fill by name — e.g. with a library that
    writes to a path — before `publish_file`; removed on leaving the block if still there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    _create(tmp).close()
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def remove_orphans(path: Path) -> None:
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
