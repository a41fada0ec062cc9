"""The content cache's entries and the batch's cost to Prefect: what the cheap client paths keep.

Entries are framed and checked, so an entry torn by an OS crash (local entries are renamed into
place without an fsync each) or left by the unframed format is a miss, never a wrong result; a
batch's entries are read and written at once, concurrently on a storage block. A `Batch` is not
walked by Prefect's parameter resolution (it holds no futures, and walking its records cost
~10 ms of CPU per task run).
"""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import numpy as np
import pytest
from prefect.filesystems import LocalFileSystem
from prefect.utilities.collections import visit_collection
from prefect.utilities.engine import collect_task_run_inputs_sync

from prefect_roboflow.flows._steps.cache import ContentCache, frame, through_cache, unframe
from prefect_roboflow.flows.records import Batch, Failure, ImageRecord, StepReport

KEYS = [f"{i:02x}" * 32 for i in range(40)]


def _entry_path(root: Path, key: str) -> Path:
    return root / "items" / key[:2] / key


def test_entries_round_trip_framed(tmp_path: Path) -> None:
    cache = ContentCache(tmp_path)
    values = {key: np.full(512, i, dtype=np.float32).tobytes() for i, key in enumerate(KEYS)}
    cache.put_many(values)
    assert cache.get_many(KEYS) == values
    stored = _entry_path(tmp_path, KEYS[3]).read_bytes()
    assert stored != values[KEYS[3]] and unframe(stored) == values[KEYS[3]]  # framed on disk
    assert unframe(frame(b"")) == b""


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
    path = _entry_path(tmp_path, KEYS[0])
    path.write_bytes(damage(path.read_bytes()))  # type: ignore[operator]
    assert cache.get(KEYS[0]) is None and cache.get_many(KEYS[:1]) == {}
    computed: list[list[int]] = []

    def compute(misses: list[int]) -> list[np.ndarray]:
        computed.append(misses)
        return [vector for _ in misses]

    codec = (lambda v: np.asarray(v, dtype=np.float32).tobytes(), lambda b: np.frombuffer(b, dtype=np.float32))
    outcomes, sent, _ = through_cache(cache, KEYS[:1], codec, compute)
    assert computed == [[0]] and sent == 1 and np.array_equal(outcomes[0], vector)
    assert unframe(path.read_bytes()) == vector.tobytes()  # recomputed and stored over


def test_local_entries_are_renamed_into_place_without_an_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    ContentCache(tmp_path).put_many({key: b"x" * 2048 for key in KEYS})
    assert synced == [] and len(list((tmp_path / "items").rglob("*"))) == len(KEYS) + len({k[:2] for k in KEYS})
    assert not list(tmp_path.rglob("*.tmp"))  # no temp file left behind


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
