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

The entries are bounded in size. Each has its size and when it was last used (written, or read:
a read is noted when the last noted use is older than `TOUCH_SECONDS`), in microseconds, in a
small table of its own, so reading never rewrites an entry's bytes. A write that takes the total
over ``max_bytes`` evicts the entries used longest ago, in the same transaction, down to
`LOW_WATER` of it; `LocalEntries.prune` does the same on demand. The total is kept beside the
entries, updated in the transaction that changes it.

Examples:
    ```python
    entries = LocalEntries(Path("cache"), max_bytes=2**30)
    entries.put_many({"ab12...": b"..."})
    entries.get_many(["ab12...", "cd34..."])  # {"ab12...": b"..."}
    entries.prune(2**20)  # the least recently used entries removed, down to 1 MiB
    ```
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

__all__ = ["BUSY_TIMEOUT", "ENTRIES_FILE", "LOW_WATER", "TOUCH_SECONDS", "LocalEntries"]

#: The entries' file in the folder.
ENTRIES_FILE = "entries.sqlite"
#: Seconds a writer waits for another process's transaction before it fails.
BUSY_TIMEOUT = 60.0
#: A read notes an entry's use when its last noted use is older than this (seconds): a rerun
#: within the minute writes nothing.
TOUCH_SECONDS = 60
#: Eviction goes down to this share of the bound, so that it does not run on every write.
LOW_WATER = 0.9
#: Keys per ``IN (...)`` query (SQLite's bound-parameter limit is 999 on old builds).
_KEYS_PER_QUERY = 500
#: The schema's version (``PRAGMA user_version``): 1 added the ``uses`` table and the total.
_SCHEMA = 1

#: Idle connections, by process and file (a forked child opens its own).
_idle: dict[tuple[int, str], list[sqlite3.Connection]] = {}
_idle_lock = threading.Lock()


def _now() -> int:
    """Now, in microseconds since the epoch: one process's transactions never share a time."""
    return time.time_ns() // 1000


def _chunks(keys: Sequence[str]) -> Iterable[Sequence[str]]:
    for start in range(0, len(keys), _KEYS_PER_QUERY):
        yield keys[start : start + _KEYS_PER_QUERY]


def _marks(keys: Sequence[str]) -> str:
    return ",".join("?" * len(keys))  # placeholders only


class LocalEntries:
    """Key → bytes entries in ``folder/entries.sqlite`` (created on first use), at most ``max_bytes``
    of values (None: no bound)."""

    def __init__(self, folder: Path, max_bytes: int | None = None) -> None:
        self.path = folder / ENTRIES_FILE
        self.max_bytes = max_bytes

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
            if connection.execute("PRAGMA user_version").fetchone()[0] < _SCHEMA:
                _migrate(connection)
        try:
            yield connection
        finally:
            with _idle_lock:
                _idle.setdefault(key, []).append(connection)

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        """The stored entries among ``keys`` (their use noted)."""
        wanted = list(dict.fromkeys(keys))
        found: dict[str, bytes] = {}
        stale: list[str] = []
        now = _now()
        with self._connection() as connection:
            for chunk in _chunks(wanted):
                query = (
                    "SELECT e.key, e.value, u.used FROM entries e JOIN uses u ON u.key = e.key "
                    f"WHERE e.key IN ({_marks(chunk)})"
                )
                for key, value, used in connection.execute(query, chunk):
                    found[key] = value
                    if now - used >= TOUCH_SECONDS * 1_000_000:
                        stale.append(key)
            if stale:
                with _transaction(connection):
                    for chunk in _chunks(stale):
                        connection.execute(f"UPDATE uses SET used = ? WHERE key IN ({_marks(chunk)})", [now, *chunk])
        return found

    def count(self) -> int:
        """How many entries there are (0 before the first write)."""
        if not self.path.exists():
            return 0
        with self._connection() as connection:
            return int(connection.execute("SELECT COUNT(*) FROM entries").fetchone()[0])

    def size(self) -> int:
        """The entries' values' bytes, in total (0 before the first write)."""
        if not self.path.exists():
            return 0
        with self._connection() as connection:
            return int(connection.execute("SELECT bytes FROM total").fetchone()[0])

    def put_many(self, entries: Mapping[str, bytes]) -> None:
        """Store every ``key: value`` of ``entries`` (replacing what is there), in one transaction,
        then evict the least recently used entries while the total is over ``max_bytes``."""
        if not entries:
            return
        keys = list(entries)
        now = _now()
        with self._connection() as connection, _transaction(connection):
            replaced = 0
            for chunk in _chunks(keys):
                query = f"SELECT COALESCE(SUM(size), 0) FROM uses WHERE key IN ({_marks(chunk)})"
                replaced += connection.execute(query, chunk).fetchone()[0]
            connection.executemany("INSERT OR REPLACE INTO entries (key, value) VALUES (?, ?)", entries.items())
            connection.executemany(
                "INSERT OR REPLACE INTO uses (key, used, size) VALUES (?, ?, ?)",
                ((key, now, len(value)) for key, value in entries.items()),
            )
            added = sum(len(value) for value in entries.values()) - replaced
            connection.execute("UPDATE total SET bytes = bytes + ?", (added,))
            if self.max_bytes is not None:
                _evict(connection, self.max_bytes, int(self.max_bytes * LOW_WATER))

    def prune(self, max_bytes: int) -> tuple[int, int]:
        """Remove the least recently used entries until the values take at most ``max_bytes``.

        Returns:
            ``(entries removed, bytes freed)``.
        """
        if not self.path.exists():
            return 0, 0
        with self._connection() as connection, _transaction(connection):
            return _evict(connection, max_bytes, max_bytes)


@contextlib.contextmanager
def _transaction(connection: sqlite3.Connection) -> Iterator[None]:
    """A write transaction (taken at once: ``BEGIN IMMEDIATE``), committed, or rolled back on an exception."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


def _migrate(connection: sqlite3.Connection) -> None:
    """Create the tables, or add the ``uses`` table and the total to entries written before (their
    use unknown: taken as the oldest)."""
    with _transaction(connection):
        if connection.execute("PRAGMA user_version").fetchone()[0] < _SCHEMA:  # not done by another process meanwhile
            connection.execute(
                "CREATE TABLE IF NOT EXISTS entries (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID"
            )
            connection.execute(
                "CREATE TABLE uses (key TEXT PRIMARY KEY, used INTEGER NOT NULL, size INTEGER NOT NULL) WITHOUT ROWID"
            )
            connection.execute("CREATE INDEX uses_by_time ON uses (used)")
            connection.execute("INSERT INTO uses (key, used, size) SELECT key, 0, length(value) FROM entries")
            connection.execute("CREATE TABLE total (bytes INTEGER NOT NULL)")
            connection.execute("INSERT INTO total (bytes) SELECT COALESCE(SUM(size), 0) FROM uses")
            connection.execute(f"PRAGMA user_version = {_SCHEMA}")


def _evict(connection: sqlite3.Connection, over: int, down_to: int) -> tuple[int, int]:
    """Inside a write transaction: when the total is over ``over`` bytes, remove the entries used
    longest ago until it is at most ``down_to``. Returns ``(entries removed, bytes freed)``."""
    total = int(connection.execute("SELECT bytes FROM total").fetchone()[0])
    if total <= over:
        return 0, 0
    removed = freed = 0
    while total - freed > down_to:
        oldest = connection.execute(
            "SELECT key, size FROM uses ORDER BY used, key LIMIT ?", (_KEYS_PER_QUERY,)
        ).fetchall()
        if not oldest:
            break
        victims = []
        for key, size in oldest:
            if total - freed <= down_to:
                break
            victims.append(key)
            freed += size
        connection.execute(f"DELETE FROM entries WHERE key IN ({_marks(victims)})", victims)
        connection.execute(f"DELETE FROM uses WHERE key IN ({_marks(victims)})", victims)
        removed += len(victims)
    connection.execute("UPDATE total SET bytes = bytes - ?", (freed,))
    return removed, freed
