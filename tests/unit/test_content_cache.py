"""The content cache's entries and the batch's cost to Prefect: what the cheap client paths keep.

A local folder keeps a batch's entries in one SQLite transaction (no file per entry); a storage
block one object per entry, read and written concurrently. Entries are framed and checked, so a
damaged one or one of the unframed format is a miss, never a wrong result. A `Batch` is not walked
by Prefect's parameter resolution (it holds no futures, and walking its records cost ~10 ms of CPU
per task run).
"""

from __future__ import annotations

import copy
import pickle
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from prefect.filesystems import LocalFileSystem
from prefect.utilities.collections import visit_collection
from prefect.utilities.engine import collect_task_run_inputs_sync

from prefect_roboflow.blocks.exceptions import InvalidInputError
from prefect_roboflow.flows._steps.cache import DEFAULT_MAX_BYTES, ContentCache, frame, through_cache, unframe
from prefect_roboflow.flows._storage import entries as entries_module
from prefect_roboflow.flows._storage.entries import ENTRIES_FILE, LocalEntries
from prefect_roboflow.flows.records import Batch, Failure, ImageRecord, StepReport

KEYS = [f"{i:02x}" * 32 for i in range(40)]


def _stored(root: Path, key: str) -> bytes:
    with sqlite3.connect(root / ENTRIES_FILE) as db:
        return bytes(db.execute("SELECT value FROM entries WHERE key = ?", (key,)).fetchone()[0])


def _stored_bytes(root: Path) -> int:
    """The entries' bytes, summed by SQLite itself."""
    with sqlite3.connect(root / ENTRIES_FILE) as db:
        return int(db.execute("SELECT COALESCE(SUM(length(value)), 0) FROM entries").fetchone()[0])


def _stored_keys(root: Path) -> set[str]:
    with sqlite3.connect(root / ENTRIES_FILE) as db:
        return {key for (key,) in db.execute("SELECT key FROM entries")}


def _store_raw(root: Path, key: str, value: bytes) -> None:
    with sqlite3.connect(root / ENTRIES_FILE) as db:
        db.execute("UPDATE entries SET value = ? WHERE key = ?", (value, key))


def test_entries_round_trip_framed_in_one_file(tmp_path: Path) -> None:
    cache = ContentCache(tmp_path)
    values = {key: np.full(512, i, dtype=np.float32).tobytes() for i, key in enumerate(KEYS)}
    cache.put_many(values)
    assert cache.get_many(KEYS) == values and ContentCache(tmp_path).get(KEYS[5]) == values[KEYS[5]]
    stored = _stored(tmp_path, KEYS[3])
    assert stored != values[KEYS[3]] and unframe(stored) == values[KEYS[3]]  # framed on disk
    assert unframe(frame(b"")) == b""
    # no file per entry: the folder holds the SQLite file (and its write-ahead log) only
    assert {p.name for p in tmp_path.iterdir()} <= {ENTRIES_FILE, f"{ENTRIES_FILE}-wal", f"{ENTRIES_FILE}-shm"}
    cache.put_many({KEYS[0]: b"new"})  # written over
    assert cache.get(KEYS[0]) == b"new" and cache.get("ff" * 32) is None


@pytest.mark.parametrize(
    "damage",
    [
        lambda entry: entry[: len(entry) // 2],  # torn: the kernel wrote half before the crash
        lambda entry: b"",  # renamed, never written
        lambda entry: b"\0" * len(entry),  # zero-filled blocks
        lambda entry: entry[:-1] + bytes([entry[-1] ^ 1]),  # one bit flipped
        lambda entry: unframe(entry) or b"",  # an entry of the unframed format, of the right size
    ],
    ids=["torn", "empty", "zeros", "bit-flip", "unframed"],
)
def test_a_damaged_or_unframed_entry_is_a_miss_and_written_over(tmp_path: Path, damage: object) -> None:
    cache = ContentCache(tmp_path)
    vector = np.arange(512, dtype=np.float32)
    cache.put(KEYS[0], vector.tobytes())
    _store_raw(tmp_path, KEYS[0], damage(_stored(tmp_path, KEYS[0])))  # type: ignore[operator]
    assert cache.get(KEYS[0]) is None and cache.get_many(KEYS[:1]) == {}
    computed: list[list[int]] = []

    def compute(misses: list[int]) -> list[np.ndarray]:
        computed.append(misses)
        return [vector for _ in misses]

    codec = (lambda v: np.asarray(v, dtype=np.float32).tobytes(), lambda b: np.frombuffer(b, dtype=np.float32))
    outcomes, sent, _ = through_cache(cache, KEYS[:1], codec, compute)
    assert computed == [[0]] and sent == 1 and np.array_equal(outcomes[0], vector)
    assert unframe(_stored(tmp_path, KEYS[0])) == vector.tobytes()  # recomputed and stored over


def test_an_unreadable_cache_file_is_a_cache_of_misses(tmp_path: Path) -> None:
    (tmp_path / ENTRIES_FILE).write_bytes(b"not a database" * 100)
    assert ContentCache(tmp_path).get_many(KEYS) == {}


_WRITER = """
import sys
from pathlib import Path
from prefect_roboflow.flows._steps.cache import ContentCache
cache, tag = ContentCache(Path(sys.argv[1])), sys.argv[2]
for batch in range(20):
    cache.put_many({f"{tag}-{batch}-{i}": f"{tag}{batch}{i}".encode() * 64 for i in range(64)})
"""


PROCESSES = ("p1", "p2", "p3", "p4")


def test_threads_and_processes_share_one_local_cache(tmp_path: Path) -> None:
    # given four writer processes and four writer threads at once, on one folder
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), tag]) for tag in PROCESSES]
    cache = ContentCache(tmp_path)

    def write(tag: str) -> None:
        for batch in range(20):
            cache.put_many({f"{tag}-{batch}-{i}": f"{tag}{batch}{i}".encode() * 64 for i in range(64)})

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(write, ["t1", "t2", "t3", "t4"]))
    assert [w.wait(timeout=120) for w in writers] == [0] * len(PROCESSES)
    # then every entry of every writer is there, whole, and the size kept beside them is theirs
    keys = [f"{tag}-{b}-{i}" for tag in (*PROCESSES, "t1", "t2", "t3", "t4") for b in range(20) for i in range(64)]
    found = ContentCache(tmp_path).get_many(keys)
    assert len(found) == len(keys) and all(found[k] == k.replace("-", "").encode() * 64 for k in keys)
    assert LocalEntries(tmp_path).size() == _stored_bytes(tmp_path)


def test_a_storage_block_reads_and_writes_a_batch_concurrently(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    threads: set[str] = set()
    real_read, real_write = LocalFileSystem.read_path, LocalFileSystem.write_path

    def read_path(self: LocalFileSystem, path: str) -> bytes:
        threads.add(threading.current_thread().name)
        return real_read(self, path)  # type: ignore[no-any-return]

    def write_path(self: LocalFileSystem, path: str, content: bytes) -> str:
        threads.add(threading.current_thread().name)
        return real_write(self, path, content)  # type: ignore[no-any-return]

    monkeypatch.setattr(LocalFileSystem, "read_path", read_path)
    monkeypatch.setattr(LocalFileSystem, "write_path", write_path)
    cache = ContentCache(LocalFileSystem(basepath=str(tmp_path / "block")))
    values = {key: key.encode() for key in KEYS}
    cache.put_many(values)
    assert cache.get_many([*KEYS, "ff" * 32]) == values  # a missing entry is a miss
    assert all(name.startswith("prefect-roboflow-cache") for name in threads) and len(threads) > 1
    assert unframe((tmp_path / "block" / "items" / KEYS[0][:2] / KEYS[0]).read_bytes()) == KEYS[0].encode()


def _batch() -> Batch:
    records = [ImageRecord(f"{i}.jpg", f"{i:064x}", embedding=np.ones(4, dtype=np.float32)) for i in range(64)]
    failed = ImageRecord("bad.jpg", failure=Failure("read", "not found", "InvalidImageError"))
    return Batch([*records, failed], "2/5", [StepReport("embed", "clip ViT-B-16", 65)], records[:2])


def test_prefect_does_not_walk_a_batch() -> None:
    batch = _batch()
    visited: list[object] = []
    resolved = visit_collection(batch, lambda expr: (visited.append(expr), expr)[1], return_data=True, max_depth=-1)
    assert resolved is batch and visited == [batch]  # the batch itself, none of its 65 records' fields
    assert collect_task_run_inputs_sync(batch) == set()
    # a list of records, which is what a batch was walked as, costs a visit per record and field
    walked: list[object] = []
    visit_collection(batch.records, lambda expr: (walked.append(expr), expr)[1], return_data=False, max_depth=-1)
    assert len(walked) > 10 * len(batch)


def test_a_batch_compares_copies_and_pickles_as_before() -> None:
    batch = _batch()
    assert copy.copy(batch) == batch and copy.deepcopy(batch) == batch
    travelled = pickle.loads(pickle.dumps(batch))
    assert travelled == batch and travelled.label == "2/5" and len(travelled.parents) == 2
    assert [r.ref for r in travelled.failed] == ["bad.jpg"] and len(travelled.ok) == 64
    assert batch != Batch(batch.records, "3/5") and Batch.of(["a.jpg"]) == Batch([ImageRecord("a.jpg")])
    assert "label='2/5'" in repr(batch)


_BOUNDED_WRITER = """
import sys
from pathlib import Path
from prefect_roboflow.flows._steps.cache import ContentCache
cache, tag = ContentCache(Path(sys.argv[1]), max_bytes=int(sys.argv[3])), sys.argv[2]
for batch in range(20):
    cache.put_many({f"{tag}-{batch}-{i}": bytes(1000) for i in range(32)})
"""


def test_four_processes_writing_a_bounded_cache_keep_it_bounded_and_its_total_true(tmp_path: Path) -> None:
    bound = 300_000  # 4 × 20 × 32 entries of ~1 KB would be ~2.6 MB
    writers = [
        subprocess.Popen([sys.executable, "-c", _BOUNDED_WRITER, str(tmp_path), tag, str(bound)]) for tag in PROCESSES
    ]
    assert [w.wait(timeout=120) for w in writers] == [0] * len(PROCESSES)
    entries = LocalEntries(tmp_path, bound)
    assert 0.8 * bound < _stored_bytes(tmp_path) == entries.size() <= bound
    # the least recently used went first: what is kept of each writer is its latest batches
    kept = _stored_keys(tmp_path)
    for tag in PROCESSES:
        batches = [b for b in range(20) if any(f"{tag}-{b}-{i}" in kept for i in range(32))]
        later = {f"{tag}-{b}-{i}" for b in range(min(batches, default=20) + 1, 20) for i in range(32)}
        assert later <= kept, tag
    assert any({f"{tag}-19-{i}" for i in range(32)} <= kept for tag in PROCESSES)


class Clock:
    """The entries' clock (microseconds), moved by the test a minute at a time."""

    def __init__(self) -> None:
        self.now = 10**15

    def tick(self, seconds: float = 60) -> None:
        self.now += int(seconds * 1_000_000)

    def __call__(self) -> int:
        return self.now


def test_a_write_over_the_bound_evicts_the_entries_used_longest_ago(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    monkeypatch.setattr(entries_module, "_now", clock)
    size = len(frame(bytes(1000)))
    cache = ContentCache(tmp_path, max_bytes=10 * size)
    for key in KEYS[:10]:  # written a minute apart: 0 is the oldest
        clock.tick()
        cache.put(key, bytes(1000))
    clock.tick()
    assert len(cache.get_many([KEYS[0], KEYS[2]])) == 2  # read: now the most recently used
    clock.tick()
    cache.put(KEYS[10], bytes(1000))  # over the bound: down to 90% of it, the oldest uses first
    assert _stored_keys(tmp_path) == set(KEYS[:11]) - {KEYS[1], KEYS[3]}
    assert _stored_bytes(tmp_path) == LocalEntries(tmp_path).size() == 9 * size
    # a read within TOUCH_SECONDS of the last noted use writes nothing
    clock.tick(1)
    before = (tmp_path / f"{ENTRIES_FILE}-wal").stat().st_mtime_ns
    assert KEYS[10] in cache.get_many([KEYS[10]])
    assert (tmp_path / f"{ENTRIES_FILE}-wal").stat().st_mtime_ns == before


def test_prune_removes_the_least_recently_used_entries_down_to_a_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    monkeypatch.setattr(entries_module, "_now", clock)
    cache = ContentCache(tmp_path, max_bytes=10**9)
    for i, key in enumerate(KEYS[:20]):
        clock.tick()
        cache.put(key, bytes(100 * (i + 1)))  # sizes 100, 200, ... (plus the frame)
    clock.tick()
    cache.get_many(KEYS[:5])  # the first five are now the most recently used
    removed, freed = cache.prune(_stored_bytes(tmp_path) // 2)
    kept = _stored_keys(tmp_path)
    # the oracle: drop entries in order of last use (5..19, then 0..4) until half the bytes are gone
    order = KEYS[5:20] + KEYS[:5]
    sizes = {key: len(frame(bytes(100 * (i + 1)))) for i, key in enumerate(KEYS[:20])}
    total, dropped = sum(sizes.values()), []
    for key in order:
        if total - sum(sizes[k] for k in dropped) <= total // 2:
            break
        dropped.append(key)
    assert kept == set(KEYS[:20]) - set(dropped) and removed == len(dropped)
    assert freed == sum(sizes[k] for k in dropped) and _stored_bytes(tmp_path) == LocalEntries(tmp_path).size()
    assert ContentCache(LocalFileSystem(basepath=str(tmp_path / "block"))).prune(0) == (0, 0)


def test_a_cache_written_before_sizes_were_kept_counts_its_entries_as_least_recently_used(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / ENTRIES_FILE) as db:  # the schema of 2026-12-02
        db.execute("CREATE TABLE entries (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID")
        db.executemany("INSERT INTO entries VALUES (?, ?)", [(key, frame(bytes(500))) for key in KEYS[:10]])
    cache = ContentCache(tmp_path, max_bytes=12 * len(frame(bytes(500))))
    assert LocalEntries(tmp_path).size() == _stored_bytes(tmp_path) == 10 * len(frame(bytes(500)))
    assert len(cache.get_many(KEYS[:10])) == 10
    cache.put_many({key: bytes(500) for key in KEYS[10:13]})  # over the bound: the old ones go first
    assert set(KEYS[10:13]) <= _stored_keys(tmp_path)


@pytest.mark.parametrize("value", ["0", "-5", "lots", "1.5"])
def test_a_bad_cache_bound_is_a_typed_error_naming_cache_storage(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("PREFECT_ROBOFLOW_CACHE_MAX_BYTES", value)
    with pytest.raises(InvalidInputError, match="PREFECT_ROBOFLOW_CACHE_MAX_BYTES") as caught:
        ContentCache(Path("anywhere"))
    assert caught.value.field == "cache_storage"


def test_the_cache_bound_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFECT_ROBOFLOW_CACHE_MAX_BYTES", raising=False)
    assert ContentCache(Path("anywhere")).max_bytes == DEFAULT_MAX_BYTES == 10 * 2**30
    monkeypatch.setenv("PREFECT_ROBOFLOW_CACHE_MAX_BYTES", "123456")
    assert ContentCache(Path("anywhere")).max_bytes == 123456
