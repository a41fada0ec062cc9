"""When the client-side resize pays: only images big for the model *and* big in bytes or pixels;
and the resize pool, one per process, sized by ``PREFECT_ROBOFLOW_RESIZE_WORKERS``."""

from __future__ import annotations

import base64

import pytest
from support.images import make_photo

from prefect_roboflow.blocks import Clip, InvalidInputError, OwlV2, PerceptionEncoder
from prefect_roboflow.blocks._resize import (
    SMALL_FILE_BYTES,
    WORKERS_ENV,
    ResizePlan,
    prepare_images,
    resize_workers,
)

CLIP_PLAN = ResizePlan("crop", 224, "bicubic")


@pytest.mark.parametrize(
    ("size", "nbytes", "expected"),
    [
        ((640, 480), 30_000, None),  # a small photo: resizing costs more CPU than it saves link
        ((640, 480), SMALL_FILE_BYTES, None),
        ((640, 480), SMALL_FILE_BYTES + 1, (224, 224)),  # big in bytes: worth it
        ((1000, 1000), 30_000, None),  # SMALL_IMAGE_PIXELS exactly
        ((1001, 1000), 30_000, (224, 224)),  # over 1 MP: the server would decode every pixel
        ((4000, 3000), 3_000_000, (224, 224)),
        ((320, 240), 10_000_000, None),  # big in bytes but not for the model
    ],
)
def test_resize_only_when_it_pays(size: tuple[int, int], nbytes: int, expected: tuple[int, int] | None) -> None:
    assert CLIP_PLAN.target_size(*size, nbytes) == expected


def test_small_photo_is_sent_byte_for_byte_by_default() -> None:
    small = make_photo(1, size=(640, 480), quality=60)
    assert len(small) < SMALL_FILE_BYTES
    for block in (Clip(), PerceptionEncoder(), OwlV2()):
        prepared = block.prepare_images([small])[0]
        assert base64.b64decode(prepared["value"]) == small  # type: ignore[index]


def test_big_photo_is_still_resized() -> None:
    big = make_photo(2, size=(1600, 1200))
    prepared = Clip().prepare_images([big])[0]
    assert len(base64.b64decode(prepared["value"])) < len(big) / 10  # type: ignore[index]


def test_one_thread_and_every_core_send_the_same_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    photos = [make_photo(seed, size=(1200, 1000)) for seed in range(4)]
    monkeypatch.setenv(WORKERS_ENV, "1")
    assert resize_workers() == 1
    one = prepare_images(photos, "images", CLIP_PLAN)
    monkeypatch.setenv(WORKERS_ENV, "3")
    assert resize_workers() == 3
    pooled = prepare_images(photos, "images", CLIP_PLAN)
    assert [p.image for p in one] == [p.image for p in pooled]  # type: ignore[union-attr]
    assert all(p.sent_size == (224, 224) for p in pooled)  # type: ignore[union-attr]


@pytest.mark.parametrize("value", ["0", "-2", "many", "1.5"])
def test_a_bad_worker_count_is_a_typed_error_naming_the_variable(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(WORKERS_ENV, value)
    with pytest.raises(InvalidInputError, match=WORKERS_ENV):
        resize_workers()


def test_default_is_every_core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(WORKERS_ENV, raising=False)
    assert resize_workers() >= 1


@pytest.mark.parametrize("workers", [1, 2])
def test_callers_in_several_threads_share_the_pool_and_its_bound(monkeypatch: pytest.MonkeyPatch, workers: int) -> None:
    # given four callers at once (a flow's pipelined batch tasks, each in its own thread)
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from prefect_roboflow.blocks import _resize

    monkeypatch.setenv(WORKERS_ENV, str(workers))
    photos = [make_photo(seed, size=(1200, 1000)) for seed in range(2)]
    lock, running, peak, threads = threading.Lock(), [0], [0], set()
    real = _resize.resize_encoded

    def counted(*args: object, **kwargs: object) -> object:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            threads.add(threading.current_thread().name)
        try:
            return real(*args, **kwargs)  # type: ignore[arg-type]
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(_resize, "resize_encoded", counted)
    with ThreadPoolExecutor(4, thread_name_prefix="caller") as callers:
        results = list(callers.map(lambda _: prepare_images(photos, "images", CLIP_PLAN), range(4)))
    # then every decode ran on the resize pool, never more at once than its size, one image alone too
    assert all(name.startswith("prefect-roboflow-resize") for name in threads) and peak[0] <= workers
    assert prepare_images(photos[:1], "images", CLIP_PLAN)[0].sent_size == (224, 224)  # type: ignore[union-attr]
    assert all(p.sent_size == (224, 224) for batch in results for p in batch)  # type: ignore[union-attr]
