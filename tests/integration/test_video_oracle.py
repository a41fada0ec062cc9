"""End to end against planted truth: `detect_crop_classify` on a rendered phone video (stored
sideways, display matrix "rotate 90") and on EXIF-rotated photos, served by the scene stand-in
(`benchmarks/scene_stub.py`: its OWLv2 finds the saturated blobs a test drew, plus a box in OWLv2's
square padding; its embeddings are the crops' hue histograms). The boxes, labels, tracker ids,
object counts and the annotated video are checked against what was drawn."""

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
from PIL import Image, ImageOps

from prefect_roboflow.blocks import InferenceServer, OwlV2
from prefect_roboflow.flows import ExampleSpec, detect_crop_classify
from prefect_roboflow.flows._steps.cache import resolve_cache
from prefect_roboflow.flows._steps.operations import detect_records
from prefect_roboflow.flows.records import ImageRecord
from prefect_roboflow.flows.steps import reference_examples

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.scene_stub import SceneStub  # noqa: E402

WIDTH, HEIGHT, FPS, SECONDS, SIDE = 640, 360, 30, 8, 48
LABELS = ["a red object", "a green object", "a blue object", "a yellow object", "a magenta object"]
COLOURS = {"red": (230, 30, 30), "green": (30, 200, 30), "blue": (40, 60, 230), "yellow": (230, 220, 20)}


def truth(time_s: float) -> dict[str, tuple[int, int, int, int]]:
    """Where each blob is (upright pixels, x2/y2 exclusive) at ``time_s``: red and green cross the
    picture at 70 px/s (no overlap between frames a second apart), blue stands still, yellow enters at 4 s."""
    x = round(20 + 70 * time_s)
    boxes = {
        "red": (x, 60, x + SIDE, 60 + SIDE),
        "green": (WIDTH - SIDE - x, 240, WIDTH - x, 240 + SIDE),
        "blue": (300, 150, 300 + SIDE, 150 + SIDE),
    }
    if time_s >= 4:
        y = round(20 + 40 * (time_s - 4))
        boxes["yellow"] = (150, y, 150 + SIDE, y + SIDE)
    return boxes


def _scene(time_s: float) -> np.ndarray:
    rng = np.random.default_rng(int(time_s * FPS))
    frame = (110 + rng.integers(-12, 12, (HEIGHT, WIDTH, 1))).repeat(3, axis=2).astype(np.uint8)  # grey texture
    for name, (x1, y1, x2, y2) in truth(time_s).items():
        frame[y1:y2, x1:x2] = COLOURS[name]
    return frame


def _phone_video(path: Path) -> Path:
    """The scene stored sideways (as a phone held upright stores it) with "rotate 90" in its display matrix."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = HEIGHT, WIDTH, "yuv420p"
        stream.options = {"crf": "12", "g": "30"}
        stream.set_display_rotation(90)  # counter-clockwise: shows the stored frame turned back upright
        for k in range(SECONDS * FPS):
            stored = np.ascontiguousarray(np.rot90(_scene(k / FPS), k=-1))
            frame = av.VideoFrame.from_ndarray(stored, format="rgb24")
            frame.pts, frame.time_base = k, Fraction(1, FPS)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


#: The transpose that undoes each EXIF orientation's turn (what a camera stores for an upright scene).
STORED = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
PHOTO_BOX = (200, 40, 260, 100)  # the magenta blob, upright pixels of a 320×240 photo


def _photo(path: Path, orientation: int) -> Path:
    upright = np.full((240, 320, 3), 120, np.uint8)
    x1, y1, x2, y2 = PHOTO_BOX
    upright[y1:y2, x1:x2] = (220, 30, 220)
    stored = Image.fromarray(upright).transpose(STORED[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, format="JPEG", quality=95, exif=exif.tobytes())
    with Image.open(path) as check:  # Pillow's own reading of the file shows the upright scene
        assert ImageOps.exif_transpose(check).size == (320, 240)
    return path


def _example(tmp: Path) -> list[ExampleSpec]:
    image = _scene(0.0)
    path = tmp / "example.png"
    Image.fromarray(image).save(path)
    x1, y1, x2, y2 = truth(0.0)["blue"]
    box = {"x": (x1 + x2) / 2, "y": (y1 + y2) / 2, "w": SIDE, "h": SIDE, "cls": "blob"}
    return [ExampleSpec(image=str(path), boxes=[box])]  # type: ignore[list-item]


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union


@pytest.fixture(scope="module")
def stub() -> Iterator[SceneStub]:
    with SceneStub() as running:
        yield running


def test_boxes_outside_the_image_are_dropped_and_counted_not_failed(stub: SceneStub, tmp_path: Path) -> None:
    photos = [_photo(tmp_path / f"p{o}.jpg", o) for o in (3, 6, 8)]
    detector = OwlV2(server=InferenceServer(api_url=stub.url))
    records, examples = [ImageRecord(str(p)) for p in photos], reference_examples(_example(tmp_path))
    found, report = detect_records(detector, records, examples, 0.5, resolve_cache(None))
    assert report.dropped == 3 and report.failed == 0  # one box in each photo's square padding
    for record in found:
        assert record.detections is not None and len(record.detections) == 1
        assert _iou(tuple(record.detections.xyxy[0]), PHOTO_BOX) > 0.95  # upright pixels, as the photo is shown


def test_detect_crop_classify_on_a_phone_video_matches_what_was_drawn(stub: SceneStub, tmp_path: Path) -> None:
    video = _phone_video(tmp_path / "phone.mov")
    photos = [str(_photo(tmp_path / f"photo-{o}.jpg", o)) for o in (3, 6, 8)]
    result = detect_crop_classify(
        [str(video), *photos],
        _example(tmp_path),
        LABELS,
        str(tmp_path / "out"),
        server=stub.url,
        confidence=0.5,
        batch_size=3,
        video_fps=1.0,
    )
    rows = pq.read_table(result.detections_path).to_pylist()
    assert result.detections_failed == 0 and all(r["status"] == "ok" for r in rows)  # padding boxes dropped
    frames = [r for r in rows if r["frame_index"] is not None]
    assert sorted({r["frame_index"] for r in frames}) == [FPS * k for k in range(SECONDS)]
    ids: dict[str, set[int | None]] = defaultdict(set)
    for row in frames:
        name = row["label"].split()[1]
        expected = truth(row["frame_time_s"])
        assert _iou(tuple(row["box_xyxy"]), expected[name]) > 0.9, row  # upright, where it was drawn
        ids[name].add(row["tracker_id"])
    seen = {(r["frame_time_s"], r["label"].split()[1]) for r in frames}
    assert seen == {(float(k), name) for k in range(SECONDS) for name in truth(k)}  # every blob, every frame
    named = {name: {i for i in found if i is not None} for name, found in ids.items()}
    assert all(len(found) == 1 for found in named.values()), ids  # one id per object across the frames
    assert len(set().union(*named.values())) == 4
    assert result.object_counts == {f"a {name} object": 1 for name in COLOURS}
    for photo in photos:
        (row,) = [r for r in rows if r["image_ref"] == photo]
        assert row["label"] == "a magenta object" and _iou(tuple(row["box_xyxy"]), PHOTO_BOX) > 0.95
    (annotated,) = result.annotated_videos
    with av.open(annotated) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height) == (WIDTH, HEIGHT)  # upright
        shown = [float(f.pts * f.time_base) for f in container.decode(stream)]
        duration = container.duration / 1_000_000
    assert shown == pytest.approx([float(k) for k in range(SECONDS)], abs=1e-4)
    assert SECONDS - 1 <= duration <= SECONDS - 1 + 1 / FPS + 1e-3  # the sampled span plus one source frame


def _sorted_rows(table: object) -> list[dict]:
    rows = table.to_pylist()  # type: ignore[attr-defined]
    return sorted(rows, key=lambda r: (r["image_ref"], r["frame_index"] or -1, r.get("detection_index") or -1))


def _shards_run_here(monkeypatch: pytest.MonkeyPatch, flow: Any) -> list[dict]:
    """Fan-out's shard runs in this process, as a work pool's worker would run them: the parameters
    of each are collected in the list returned."""
    from types import SimpleNamespace

    from prefect_roboflow.flows._run import fanout

    shards: list[dict] = []

    async def run_shard_here(deployment: str, parameters: dict, **_: object) -> SimpleNamespace:
        shards.append(parameters)
        state = await flow(**parameters, return_state=True)
        return SimpleNamespace(state=state, name=f"shard-{parameters['shard']['index']}")

    async def a_deployment(plan: object) -> str:
        return "a-flow/here"

    monkeypatch.setattr(fanout, "arun_deployment", run_shard_here)
    monkeypatch.setattr(fanout, "_deployment", a_deployment)
    return shards


def test_a_fanned_out_run_writes_the_tables_and_counts_of_a_plain_run(
    stub: SceneStub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    video = str(_phone_video(tmp_path / "phone.mov"))
    photos = [str(_photo(tmp_path / f"photo-{o}.jpg", o)) for o in (3, 6, 8)]
    images = [photos[0], photos[1], video, photos[2]]  # shard 0: photos only; shard 1: the video and a photo
    kwargs = {"server": stub.url, "confidence": 0.5, "batch_size": 2, "video_fps": 0.5, "video_sample": "fps"}
    plain = detect_crop_classify(images, _example(tmp_path), LABELS, str(tmp_path / "plain"), **kwargs)
    shards = _shards_run_here(monkeypatch, detect_crop_classify)
    fanned = detect_crop_classify(
        images, _example(tmp_path), LABELS, str(tmp_path / "fanned"), fan_out={"shard_size": 2}, **kwargs
    )
    assert [s["shard"]["index"] for s in shards] == [0, 1] and all(s["shard"]["videos"] for s in shards)
    assert all((s["video_fps"], s["video_sample"]) == (0.5, "fps") for s in shards)  # the parent's settings
    parts = sorted((tmp_path / "fanned" / "detections").glob("part-*.parquet"))
    assert len(parts) == 2 and len({str(pq.read_schema(p)) for p in parts}) == 1  # one schema, video columns too
    assert pq.read_schema(parts[0]).names == pq.read_schema(plain.detections_path).names
    assert _sorted_rows(pq.read_table(tmp_path / "fanned" / "detections")) == _sorted_rows(
        pq.read_table(plain.detections_path)
    )
    assert fanned.object_counts == plain.object_counts == {f"a {name} object": 1 for name in COLOURS}
    assert len(fanned.annotated_videos) == 1 and fanned.detections == plain.detections


def test_frames_are_decoded_and_encoded_off_the_flows_event_loop(
    stub: SceneStub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from prefect_roboflow.flows import embed_images
    from prefect_roboflow.flows._steps import sources

    made_on_loop: list[bool] = []
    original = sources.frame_records

    def watched(*args: object, **kwargs: object) -> Iterator[ImageRecord]:
        for record in original(*args, **kwargs):  # type: ignore[arg-type]
            try:  # the thread that decoded and encoded this frame runs an event loop, or not
                asyncio.get_running_loop()
                made_on_loop.append(True)
            except RuntimeError:
                made_on_loop.append(False)
            yield record

    monkeypatch.setattr(sources, "frame_records", watched)
    result = embed_images(str(_phone_video(tmp_path / "phone.mov")), str(tmp_path / "out"), server=stub.url)
    assert result.images == SECONDS and made_on_loop == [False] * SECONDS


@pytest.mark.parametrize("flow_name", ["embed_images", "classify_images"])
def test_every_batch_flow_fanned_out_writes_one_schema_and_the_rows_of_a_plain_run(
    stub: SceneStub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flow_name: str
) -> None:
    """A photo-only shard writes the video columns too when the job has a video (pandas, pyarrow
    and duckdb read a folder with one part's schema); the shards sample as the parent was told."""
    from prefect_roboflow import flows
    from prefect_roboflow.flows._run import totals

    flow = getattr(flows, flow_name)
    stem = {"embed_images": "embeddings", "classify_images": "classifications"}[flow_name]
    extra = {"labels": LABELS} if flow_name == "classify_images" else {}
    video = str(_phone_video(tmp_path / "phone.mov"))
    photos = [str(_photo(tmp_path / f"photo-{o}.jpg", o)) for o in (3, 6, 8)]
    images = [photos[0], photos[1], video, photos[2]]  # shard 0: photos only; shard 1: the video and a photo
    kwargs = {"server": stub.url, "batch_size": 2, "video_fps": 0.5, "video_sample": "fps", **extra}
    plain = flow(images, out_dir=str(tmp_path / "plain"), **kwargs)
    shards = _shards_run_here(monkeypatch, flow)
    events: list[tuple[str, dict]] = []
    monkeypatch.setattr(totals, "emit_completed", lambda key, payload: events.append((key, payload)))
    flow(images, out_dir=str(tmp_path / "fanned"), fan_out={"shard_size": 2}, **kwargs)
    # the job's one completion event (the trigger that curates each embed_images table), from the
    # parent, naming the folder of parts; none from the shards
    assert [payload[f"{stem}_path"] for _, payload in events] == [f"{tmp_path / 'fanned' / stem}/"]
    assert [s["shard"]["index"] for s in shards] == [0, 1] and all(s["shard"]["videos"] for s in shards)
    assert all((s["video_fps"], s["video_sample"]) == (0.5, "fps") for s in shards)
    parts = sorted((tmp_path / "fanned" / stem).glob("part-*.parquet"))
    plain_table = getattr(plain, f"{stem}_path")
    assert len(parts) == 2 and {pq.read_schema(p).names == pq.read_schema(plain_table).names for p in parts} == {True}
    assert _sorted_rows(pq.read_table(tmp_path / "fanned" / stem)) == _sorted_rows(pq.read_table(plain_table))
