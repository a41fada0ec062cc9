"""Tracker ids do not depend on how a run cuts its frames into batches, nor on its cache.

`detect_crop_classify` on two rendered videos with a photo between them, served by the scene
stand-in (`benchmarks/scene_stub.py`: its OWLv2 finds the saturated blobs drawn, its embeddings are
the crops' hue histograms), with one frame per batch, a few, one batch for the whole job, and again
with the cache warm (a cached rerun's batches grow: `_run.growth`). Checked against what was drawn:
every row of an object seen in two sampled frames or more carries that object's one id (a track
born on a batch's last frame too), a one-frame blip none; and the tables, the annotated videos and
images and the object counts are the same in every run.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from prefect_roboflow.flows import ExampleSpec, detect_crop_classify

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.scene_stub import SceneStub  # noqa: E402

WIDTH, HEIGHT, FPS, SIDE = 320, 240, 10, 40
RGB = {
    "red": (230, 30, 30),
    "green": (30, 200, 30),
    "blue": (40, 60, 230),
    "yellow": (230, 220, 20),
    "magenta": (220, 30, 220),
    "cyan": (30, 200, 220),
}
LABELS = [f"a {name} object" for name in RGB]


def scene_a(time_s: float) -> dict[str, tuple[int, int, int, int]]:
    """Video A (8 s, sampled at 0..7 s): red crosses from the first frame; blue stands still from
    3 s; yellow shows in the frame at 5 s only (a blip); green enters at 6 s, on the last two frames."""
    x = round(10 + 20 * time_s)
    boxes = {"red": (x, 20, x + SIDE, 20 + SIDE)}
    if time_s >= 3:
        boxes["blue"] = (200, 100, 200 + SIDE, 100 + SIDE)
    if 4.95 <= time_s < 5.05:
        boxes["yellow"] = (40, 170, 40 + SIDE, 170 + SIDE)
    if time_s >= 6:
        boxes["green"] = (120, 170, 120 + SIDE, 170 + SIDE)
    return boxes


def scene_b(time_s: float) -> dict[str, tuple[int, int, int, int]]:
    """Video B (4 s, sampled at 0..3 s): magenta throughout, cyan in the last frame only (a blip)."""
    boxes = {"magenta": (60, 60, 60 + SIDE, 60 + SIDE)}
    if time_s >= 2.95:
        boxes["cyan"] = (220, 150, 220 + SIDE, 150 + SIDE)
    return boxes


SCENES = {"a.mp4": (scene_a, 8), "b.mp4": (scene_b, 4)}


def _draw(boxes: dict[str, tuple[int, int, int, int]]) -> np.ndarray:
    frame = np.full((HEIGHT, WIDTH, 3), 110, np.uint8)
    for name, (x1, y1, x2, y2) in boxes.items():
        frame[y1:y2, x1:x2] = RGB[name]
    return frame


def _video(path: Path) -> str:
    scene, seconds = SCENES[path.name]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"crf": "12", "g": str(FPS)}
        for k in range(seconds * FPS):
            frame = av.VideoFrame.from_ndarray(_draw(scene(k / FPS)), format="rgb24")
            frame.pts, frame.time_base = k, Fraction(1, FPS)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return str(path)


@pytest.fixture(scope="module")
def stub() -> Iterator[SceneStub]:
    with SceneStub() as running:
        yield running


def _decoded(path: str) -> list[np.ndarray]:
    with av.open(path) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return w * h / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h)


def _check_against_drawing(rows: list[dict[str, Any]], name: str) -> None:
    """Every blob drawn in a sampled frame has its row; an object seen in two frames or more has one
    id on every row of it (from its first sighting on), a blip none; one id per object of a video."""
    ids: defaultdict[tuple[str, str], list[int | None]] = defaultdict(list)
    for row in rows:
        if row["frame_index"] is None:
            continue
        video = Path(row["image_ref"].split("#frame=")[0]).name
        drawn = SCENES[video][0](row["frame_time_s"])
        colour = max(drawn, key=lambda c: _iou(tuple(row["box_xyxy"]), drawn[c]))
        assert _iou(tuple(row["box_xyxy"]), drawn[colour]) > 0.9, (name, row)
        ids[(video, colour)].append(row["tracker_id"])
    sightings = {
        (video, colour): sum(colour in scene(float(t)) for t in range(seconds))
        for video, (scene, seconds) in SCENES.items()
        for colour in RGB
    }
    assert {key: len(found) for key, found in ids.items()} == {k: n for k, n in sightings.items() if n}, name
    for key, found in ids.items():
        if sightings[key] >= 2:  # an object: one id on every row of it, from its first sighting
            assert None not in found and len(set(found)) == 1, (name, key, found)
        else:  # a blip is no object
            assert found == [None], (name, key, found)
    objects = {(key[0], found[0]) for key, found in ids.items() if sightings[key] >= 2}
    assert len(objects) == 4, (name, objects)  # ids are per video


@pytest.fixture()
def job(tmp_path: Path) -> tuple[list[str], list[ExampleSpec]]:
    """Video A, a photo, video B; the example box is red's first."""
    images = [_video(tmp_path / "a.mp4"), str(tmp_path / "photo.png"), _video(tmp_path / "b.mp4")]
    Image.fromarray(_draw({"magenta": (100, 80, 140, 120)})).save(images[1])
    example = tmp_path / "example.png"
    Image.fromarray(_draw(scene_a(0.0))).save(example)
    x1, y1, x2, y2 = scene_a(0.0)["red"]
    box = {"x": (x1 + x2) / 2, "y": (y1 + y2) / 2, "w": SIDE, "h": SIDE, "cls": "blob"}
    return images, [ExampleSpec(image=str(example), boxes=[box])]  # type: ignore[list-item]


OBJECTS = {"a red object": 1, "a blue object": 1, "a green object": 1, "a magenta object": 1}


def test_tracker_ids_are_the_same_whatever_the_batches_and_the_cache(
    stub: SceneStub, tmp_path: Path, job: tuple[list[str], list[ExampleSpec]]
) -> None:
    images, examples = job
    kwargs: dict[str, Any] = {"server": stub.url, "confidence": 0.5, "video_fps": 1.0}
    cache = str(tmp_path / "cache")
    runs = {  # name: (batch_size, cache)
        "one frame a batch": (1, cache),
        "the cache warm": (1, cache),  # the same run again: everything from the cache, batches grow
        "three frames a batch": (3, None),
        "one batch": (64, None),
    }
    results = {}
    for name, (batch_size, cache_storage) in runs.items():
        out = str(tmp_path / name.replace(" ", "-"))
        results[name] = detect_crop_classify(
            images, examples, LABELS, out, batch_size=batch_size, cache_storage=cache_storage, **kwargs
        )
    assert results["the cache warm"].requests == 0 and results["the cache warm"].from_cache > 0
    tables = {name: pq.read_table(result.detections_path).to_pylist() for name, result in results.items()}
    for name, rows in tables.items():  # against what was drawn, in every run
        _check_against_drawing(rows, name)
        assert results[name].object_counts == OBJECTS, name

    # the same outputs whatever the batches: tables (ids and row order too), videos, images, counts
    reference = results["one batch"]
    annotated = {p.name: p.read_bytes() for p in Path(reference.annotated_dir).rglob("*.jpg")}
    assert len(annotated) == 13  # every image and sampled frame has a detection
    for name, result in results.items():
        assert tables[name] == tables["one batch"], name
        assert (result.images, result.detections) == (reference.images, reference.detections) == (13, 22)
        assert result.images_without_detections == reference.images_without_detections
        assert result.label_counts == reference.label_counts
        assert [Path(v).name for v in result.annotated_videos] == [Path(v).name for v in reference.annotated_videos]
        for video, expected in zip(result.annotated_videos, reference.annotated_videos, strict=True):
            mine, theirs = _decoded(video), _decoded(expected)
            assert len(mine) == len(theirs) and all(np.array_equal(a, b) for a, b in zip(mine, theirs, strict=True))
        assert {p.name: p.read_bytes() for p in Path(result.annotated_dir).rglob("*.jpg")} == annotated, name


def test_auto_label_and_a_delivery_track_the_same_whatever_the_batches(
    stub: SceneStub, tmp_path: Path, job: tuple[list[str], list[ExampleSpec]]
) -> None:
    from prefect import task

    from prefect_roboflow.flows import auto_label
    from prefect_roboflow.flows.deliveries import run_delivery

    delivery = task(run_delivery)  # a delivery runs in a task run (the task worker's)

    images, examples = job
    kwargs: dict[str, Any] = {"server": stub.url, "confidence": 0.5, "video_fps": 1.0}
    labelled, delivered = {}, {}
    for batch_size in (1, 64):
        out = str(tmp_path / f"auto-label-{batch_size}")
        result = auto_label(images, examples, LABELS, out, batch_size=batch_size, **kwargs)
        assert result.object_counts == OBJECTS, batch_size
        labelled[batch_size] = pq.read_table(result.labels_path).to_pylist()
        done = delivery(
            "d1", "detect_crop_classify", images, str(tmp_path / f"delivery-{batch_size}"),
            examples=examples, labels=LABELS, batch_size=batch_size, **kwargs,
        )  # fmt: skip
        assert (done.images, done.images_failed) == (13, 0)
        delivered[batch_size] = pq.read_table(done.table).to_pylist()
    for tables, name in ((labelled, "auto_label"), (delivered, "delivery")):
        _check_against_drawing(tables[1], name)
        assert tables[1] == tables[64], name
