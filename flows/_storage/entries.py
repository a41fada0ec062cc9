"""A local folder's small entries (key → bytes) in one SQLite file: what the content cache keeps on disk.

One file per entry cost two journaled metadata updates each (create, rename): ~50 µs on an idle
disk, over a millisecond while anything else on the file system commits (a Prefect server's
SQLite, a test suite), and a million entries are a million files. Here a batch's entries are one
transaction appended to a write-ahead log (``synchronous=NORMAL``: a process crash loses nothing
committed, an OS crash at most the last transactions, never a torn one), and a batch is read with
one query. Several threads and processes share the file (WAL readers never wait; a writer waits up
to `BUSY_TIMEOUT` for another). A process keeps its connections to a file in a pool: a call takes
an idle one (or opens one) and gives it back, so there are as many as calls at once, whatever
number of threads come and go (one connection per thread, left to the garbage collector when a
task runner's thread ended, held an open file each until a full collection). A local disk only:
SQLite's locks are not safe on network file systems (share a cache across machines through a
storage block).

Examples:
    ```python
    entries = LocalEntries(Path("cache"))
    entries.put_many({"ab12...": b"..."})
    entries.get_many(["ab12...", "cd34..."])  # {"ab12...": b"..."}
    ```
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

__all__ = ["BUSY_TIMEOUT", "ENTRIES_FILE", "LocalEntries"]

#: The entries' file in the folder.
ENTRIES_FILE = "entries.sqlite"
#: Seconds a writer waits for another process's transaction before it fails.
BUSY_TIMEOUT = 60.0
#: Keys per ``IN (...)`` query (SQLite's bound-parameter limit is 999 on old builds).
_KEYS_PER_QUERY = 500

#: Idle connections, by process and file (a forked child opens its own).
_idle: dict[tuple[int, str], list[sqlite3.Connection]] = {}
_idle_lock = threading.Lock()


class LocalEntries:
    """Key → bytes entries in ``folder/entries.sqlite`` (created on first use)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / ENTRIES_FILE

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """An idle connection of this process to the file (or a new one), given back after use."""
        key = (os.getpid(), str(self.path))
        with _idle_lock:
            idle = _idle.setdefault(key, [])
            connection = idle.pop() if idle else None
        if connection is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # used by one thread at a time (taken from the pool), though not always the same one
            connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute(
                "CREATE TABLE IF NOT EXISTS entries (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID"
            )
        try:
            yield connection
        finally:
            with _idle_lock:
                _idle.setdefault(key, []).append(connection)

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        """The stored entries among ``keys``."""
        wanted = list(dict.fromkeys(keys))
        found: dict[str, bytes] = {}
        with self._connection() as connection:
            for start in range(0, len(wanted), _KEYS_PER_QUERY):
                chunk = wanted[start : start + _KEYS_PER_QUERY]
                query = f"SELECT key, value FROM entries WHERE key IN ({','.join('?' * len(chunk))})"  # placeholders
                found.update(connection.execute(query, chunk).fetchall())
        return found

    def count(self) -> int:
        """How many entries there are (0 before the first write)."""
        if not self.path.exists():
            return 0
        with self._connection() as connection:
            return int(connection.execute("SELECT COUNT(*) FROM entries").fetchone()[0])

    def put_many(self, entries: Mapping[str, bytes]) -> None:
        """Store every ``key: value`` of ``entries`` (replacing what is there), in one transaction."""
        if not entries:
            return
        with self._connection() as connection:
            connection.execute("BEGIN IMMEDIATE")
            try:
                connection.executemany("INSERT OR REPLACE INTO entries (key, value) VALUES (?, ?)", entries.items())
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")
