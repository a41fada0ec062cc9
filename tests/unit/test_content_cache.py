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

from prefect_roboflow.flows._steps.cache import ContentCache, frame, through_cache, unframe
from prefect_roboflow.flows._storage.entries import ENTRIES_FILE
from prefect_roboflow.flows.records import Batch, Failure, ImageRecord, StepReport

KEYS = [f"{i:02x}" * 32 for i in range(40)]


def _stored(root: Path, key: str) -> bytes:
    with sqlite3.connect(root / ENTRIES_FILE) as db:
        return bytes(db.execute("SELECT value FROM entries WHERE key = ?", (key,)).fetchone()[0])


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


def test_threads_and_processes_share_one_local_cache(tmp_path: Path) -> None:
    # given two writer processes and four writer threads at once, on one folder
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), tag]) for tag in ("p1", "p2")]
    cache = ContentCache(tmp_path)

    def write(tag: str) -> None:
        for batch in range(20):
            cache.put_many({f"{tag}-{batch}-{i}": f"{tag}{batch}{i}".encode() * 64 for i in range(64)})

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(write, ["t1", "t2", "t3", "t4"]))
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    # then every entry of every writer is there, whole
    keys = [f"{tag}-{b}-{i}" for tag in ("p1", "p2", "t1", "t2", "t3", "t4") for b in range(20) for i in range(64)]
    found = ContentCache(tmp_path).get_many(keys)
    assert len(found) == len(keys) and all(found[k] == k.replace("-", "").encode() * 64 for k in keys)


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
