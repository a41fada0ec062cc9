"""A local folder's small entries (key → bytes) in one SQLite file: what the content cache keeps on disk.

One file per entry cost two journaled metadata updates each (create, rename): ~50 µs on an idle
disk, over a millisecond while anything else on the file system commits (a Prefect server's
SQLite, a test suite), and a million entries are a million files. Here a batch's entries are one
transaction appended to a write-ahead log (``synchronous=NORMAL``: a process crash loses nothing
committed, an OS crash at most the last transactions, never a torn one), and a batch is read with
one query. Several threads and processes share the file (WAL readers never wait; a writer waits up
to `BUSY_TIMEOUT` for another). Each thread of each process has its own connection, closed when
the thread ends. A local disk only: SQLite's locks are not safe on network file systems (share a
cache across machines through a storage block).

Examples:
    ```python
    entries = LocalEntries(Path("cache"))
    entries.put_many({"ab12...": b"..."})
    entries.get_many(["ab12...", "cd34..."])  # {"ab12...": b"..."}
    ```
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

__all__ = ["BUSY_TIMEOUT", "ENTRIES_FILE", "LocalEntries"]

#: The entries' file in the folder.
ENTRIES_FILE = "entries.sqlite"
#: Seconds a writer waits for another process's transaction before it fails.
BUSY_TIMEOUT = 60.0
#: Keys per ``IN (...)`` query (SQLite's bound-parameter limit is 999 on old builds).
_KEYS_PER_QUERY = 500

_local = threading.local()


class LocalEntries:
    """Key → bytes entries in ``folder/entries.sqlite`` (created on first use)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / ENTRIES_FILE

    def _connection(self) -> sqlite3.Connection:
        connections: dict[tuple[int, str], sqlite3.Connection] = _local.__dict__.setdefault("connections", {})
        key = (os.getpid(), str(self.path))  # a forked child opens its own
        connection = connections.get(key)
        if connection is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute(
                "CREATE TABLE IF NOT EXISTS entries (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID"
            )
            connections[key] = connection
        return connection

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        """The stored entries among ``keys``."""
        wanted = list(dict.fromkeys(keys))
        found: dict[str, bytes] = {}
        connection = self._connection()
        for start in range(0, len(wanted), _KEYS_PER_QUERY):
            chunk = wanted[start : start + _KEYS_PER_QUERY]
            query = f"SELECT key, value FROM entries WHERE key IN ({','.join('?' * len(chunk))})"  # placeholders only
            found.update(connection.execute(query, chunk).fetchall())
        return found

    def count(self) -> int:
        """How many entries there are (0 before the first write)."""
        if not self.path.exists():
            return 0
        return int(self._connection().execute("SELECT COUNT(*) FROM entries").fetchone()[0])

    def put_many(self, entries: Mapping[str, bytes]) -> None:
        """Store every ``key: value`` of ``entries`` (replacing what is there), in one transaction."""
        if not entries:
            return
        connection = self._connection()
        connection.execute("BEGIN IMMEDIATE")
        try:
            connection.executemany("INSERT OR REPLACE INTO entries (key, value) VALUES (?, ?)", entries.items())
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")
