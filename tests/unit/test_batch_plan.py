"""How a run cuts its source into batches: ``batch_size`` images, growing over a cached rerun.

A task run costs Prefect the same whatever its size, so after a batch that sent the server
nothing the next ones grow (×4, up to 16 × ``batch_size``, within a byte budget of files whose
size is known without reading them); a batch that sends anything brings them back. These tests
drive `BatchRun.batches` the way `BatchRun.process` does (each batch accounted before the next is
cut) with step reports saying what was sent; the flows' own reruns are in the integration tests.
A batch's big local files are read and hashed on several threads (both release the GIL).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from prefect_roboflow.blocks import InvalidInputError
from prefect_roboflow.flows._run import growth
from prefect_roboflow.flows._run.batch import BatchRun
from prefect_roboflow.flows.records import Batch, StepReport

FILE_BYTES = 1000


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    for i in range(200):
        (tmp_path / f"img_{i:03d}.jpg").write_bytes(b"\xff" * FILE_BYTES)
    return tmp_path


def _plan(run: BatchRun, sent: Callable[[int], int]) -> list[Batch]:
    """The batches of ``run``, each accounted as having sent ``sent(index)`` items before the next is cut."""
    batches = []
    for index, batch in enumerate(run.batches()):
        batch.reports.append(StepReport("embed", "clip ViT-B-16", len(batch), sent=sent(index)))
        run.account(batch)
        batches.append(batch)
    return batches


def test_a_cold_run_keeps_batch_size(folder: Path) -> None:
    batches = _plan(BatchRun("embed-images", str(folder), 8, "test"), lambda i: 8)
    assert [len(b) for b in batches] == [8] * 25
    assert [b.label for b in batches] == [f"{i}/25" for i in range(1, 26)]


def test_a_cached_rerun_grows_its_batches_and_keeps_every_image_in_order(folder: Path) -> None:
    run = BatchRun("embed-images", str(folder), 8, "test")
    batches = _plan(run, lambda i: 0)
    # ×4 after each batch that sent nothing, up to 16 × batch_size
    assert [len(b) for b in batches] == [8, 32, 128, 32]
    assert [r.ref for b in batches for r in b] == sorted(str(p) for p in folder.iterdir())
    assert batches[-1].label == "4/4" and run.images == 200


def test_a_batch_that_sends_brings_the_size_back(folder: Path) -> None:
    # the third batch (cut at 128 after two cached ones) holds new images: the next is 8 again
    batches = _plan(BatchRun("embed-images", str(folder), 8, "test"), lambda i: 5 if i == 2 else 0)
    assert [len(b) for b in batches] == [8, 32, 128, 8, 24]


def test_a_grown_batch_holds_at_most_the_byte_budget(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(growth, "GROWN_BATCH_BYTES", 20 * FILE_BYTES)
    batches = _plan(BatchRun("embed-images", str(folder), 8, "test"), lambda i: 0)
    assert {len(b) for b in batches[1:-1]} == {20}  # grown, but within the budget
    assert sum(len(b) for b in batches) == 200


def test_a_budget_under_batch_size_never_shrinks_a_batch(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(growth, "GROWN_BATCH_BYTES", 3 * FILE_BYTES)
    batches = _plan(BatchRun("embed-images", str(folder), 8, "test"), lambda i: 0)
    assert [len(b) for b in batches] == [8] * 25


def test_remote_images_keep_batch_size() -> None:
    # their size is not known without a request: a batch of them never grows
    urls = [f"https://example.invalid/img_{i}.jpg" for i in range(40)]
    batches = _plan(BatchRun("embed-images", urls, 8, "test"), lambda i: 0)
    assert [len(b) for b in batches] == [8] * 5


def test_batch_size_is_checked_before_anything_runs(folder: Path) -> None:
    with pytest.raises(InvalidInputError, match="batch_size"):
        BatchRun("embed-images", str(folder), 0, "test")


def test_big_local_files_are_read_and_hashed_on_several_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib
    import threading

    from support.images import make_image

    from prefect_roboflow.flows._steps import sources
    from prefect_roboflow.flows.records import ImageRecord

    paths = []
    for i in range(6):
        path = tmp_path / f"big_{i}.png"
        path.write_bytes(make_image(i, size=(64, 64)))
        paths.append(path)
    small = [ImageRecord(str(p)) for p in paths]
    threads: set[str] = set()
    real_load = sources.load

    def load(record: ImageRecord) -> ImageRecord:
        threads.add(threading.current_thread().name)
        return real_load(record)

    monkeypatch.setattr(sources, "load", load)
    monkeypatch.setenv("PREFECT_ROBOFLOW_RESIZE_WORKERS", "3")
    # small files (a few KB): one thread, the caller's
    loaded = sources.load_all(small)
    assert threads == {threading.current_thread().name}
    # the same files taken as big: the pool's threads, the same records in order
    monkeypatch.setattr(sources, "BIG_FILE_BYTES", min(p.stat().st_size for p in paths))
    threads.clear()
    parallel = sources.load_all(small)
    assert threads and all(name.startswith("prefect-roboflow-read") for name in threads)
    assert parallel == loaded and [r.sha256 for r in parallel] == [
        hashlib.sha256(p.read_bytes()).hexdigest() for p in paths
    ]
    assert all(r.ok and r.data == p.read_bytes() for r, p in zip(parallel, paths, strict=True))
    # one worker set: the caller's thread again
    monkeypatch.setenv("PREFECT_ROBOFLOW_RESIZE_WORKERS", "1")
    threads.clear()
    assert sources.load_all(small) == loaded and threads == {threading.current_thread().name}


def test_a_source_is_listed_once_and_read_back_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect_roboflow.flows._steps import sources

    # names with a newline or quotes come back as they were; past SPOOL_BYTES the list is on disk
    refs = [f'https://example.invalid/{i}{chr(10) if i % 7 == 0 else ""}"x".jpg' for i in range(500)]
    monkeypatch.setattr(sources, "SPOOL_BYTES", 1024)
    listed: list[object] = []
    real = sources.iter_image_refs
    monkeypatch.setattr(sources, "iter_image_refs", lambda images: listed.append(images) or real(images))
    run = BatchRun("embed-images", refs, 64, "test")
    assert listed == [refs] and (run.expected, run.videos) == (500, 0)
    assert run.listing._spool._rolled  # type: ignore[attr-defined]  # on disk, not in memory
    assert [r.ref for b in _plan(run, lambda i: 64) for r in b] == refs
    assert list(run.listing.refs()) == refs and listed == [refs]  # read back again: still one listing
