"""Nothing waits on the flow's event loop: the slow parts of a run happen on worker threads.

A flow's event loop runs its body between awaits; storage, decoding and encoding done there hold
it (and the progress artifact, the wait on the next batch, Prefect's own coroutines) for as long as
they take — 15 s for one batch of 12 MP annotated images. The oracle is where the code runs: each
slow function, wrapped, notes whether its thread runs an event loop (``asyncio.get_running_loop``
succeeds only on a loop's thread). How long the loop is held is measured in the benchmark
(``benchmarks/loop_lag.py``), not asserted here.
"""

from __future__ import annotations

import asyncio
import io
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from support.fault_proxy import FaultProxy
from support.images import make_image, make_scene

from prefect_roboflow.flows import detect_crop_classify, embed_images
from prefect_roboflow.flows.demo import example_spec

LABELS = ["a photo of an apple", "a photo of a box", "a photo of a bottle"]


def _on_a_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class Where:
    """Which threads the wrapped functions ran on: ``name → [on an event loop's thread?]``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: dict[str, list[bool]] = defaultdict(list)
        self.monkeypatch = monkeypatch

    def watch(self, owner: Any, name: str) -> None:
        real = getattr(owner, name)
        key = f"{owner.__name__.rsplit('.', 1)[-1]}.{name}"

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self.calls[key].append(_on_a_loop())
            return real(*args, **kwargs)

        self.monkeypatch.setattr(owner, name, wrapped)

    def watch_generator(self, owner: Any, name: str) -> None:
        """A generator function, noted at each item it makes (its body runs where ``next`` is called)."""
        real: Callable[..., Iterator[Any]] = getattr(owner, name)
        key = f"{owner.__name__.rsplit('.', 1)[-1]}.{name}"

        def wrapped(*args: Any, **kwargs: Any) -> Iterator[Any]:
            for item in real(*args, **kwargs):
                self.calls[key].append(_on_a_loop())
                yield item

        self.monkeypatch.setattr(owner, name, wrapped)

    def on_the_loop(self) -> dict[str, int]:
        return {key: sum(flags) for key, flags in self.calls.items() if any(flags)}


def _scene_video(path: Path, frames: int = 20, fps: int = 10) -> Path:
    import cv2

    scene = np.asarray(Image.open(io.BytesIO(make_scene(5))).convert("RGB"))[:, :, ::-1]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (320, 240))
    for k in range(frames):
        writer.write(np.ascontiguousarray(np.roll(scene, 2 * k, axis=1)))
    writer.release()
    return path


def test_a_detect_run_over_photos_and_a_video_keeps_storage_and_codecs_off_its_event_loop(
    proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect_roboflow.flows._outputs.annotated import AnnotatedImageSink
    from prefect_roboflow.flows._steps import sources
    from prefect_roboflow.flows._storage.parquet import AtomicParquetWriter
    from prefect_roboflow.flows._video.sink import AnnotatedVideoSink

    where = Where(monkeypatch)
    where.watch(sources.SourceListing, "__init__")  # the listing (and a video's header)
    where.watch_generator(sources, "_records_of")  # each next record: a video's frames decoded
    where.watch(AtomicParquetWriter, "__init__")
    where.watch(AtomicParquetWriter, "write")
    where.watch(AtomicParquetWriter, "commit")
    where.watch(AnnotatedImageSink, "draw")  # decode, draw, JPEG encode, write
    where.watch(AnnotatedVideoSink, "write")  # H.264 encoding
    where.watch(AnnotatedVideoSink, "close")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        (photos / f"scene_{i}.png").write_bytes(make_scene(700 + i))
    video = _scene_video(tmp_path / "shelf.mp4")
    examples, _ = example_spec()
    result = detect_crop_classify(
        [str(video), *sorted(str(p) for p in photos.iterdir())],
        examples,
        LABELS,
        str(tmp_path / "out"),
        server=proxy.url,
        cache_storage=str(tmp_path / "cache"),
        video_fps=2.0,
        batch_size=2,
        confidence=0.95,  # the placeholder weights score these scenes ~0.98
    )
    assert result.images == 4 + 3 and result.annotated_videos
    assert set(where.calls) == {
        "SourceListing.__init__",
        "sources._records_of",
        "AtomicParquetWriter.__init__",
        "AtomicParquetWriter.write",
        "AtomicParquetWriter.commit",
        "AnnotatedImageSink.draw",
        "AnnotatedVideoSink.write",
        "AnnotatedVideoSink.close",
    }, "every slow part ran (else this checks nothing)"
    assert where.on_the_loop() == {}


def test_an_embed_run_into_an_index_keeps_the_index_update_off_its_event_loop(
    proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect_roboflow.flows import vector_index

    where = Where(monkeypatch)
    where.watch(vector_index.VectorIndex, "add")
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.png").write_bytes(make_image(600 + i))
    result = embed_images(
        str(folder),
        str(tmp_path / "out"),
        server=proxy.url,
        cache_storage=str(tmp_path / "cache"),
        index_path=str(tmp_path / "index"),
    )
    assert result.indexed == 5 and where.calls["VectorIndex.add"] == [False]
