"""Video sources: frames sampled from videos made here (OpenCV VideoWriter: MPEG-4 Part 2 ``mp4v``
in ``.mp4``, Motion-JPEG in ``.avi``; see support/videos.py), run through the flows against the
real server behind a counting proxy: frame counts and times per sampling mode, cache hits on a
rerun, bad videos as failed rows, a video in a moto bucket, a SIGKILLed run resumed, memory flat
over a long video, and tracking."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from prefect.settings import PREFECT_API_URL
from support.cache import cached_entries
from support.fault_proxy import FaultProxy
from support.images import make_image, make_scene
from support.s3 import MotoBucket, s3, s3_server  # noqa: F401
from support.videos import make_video

from prefect_roboflow.blocks import InferenceServer, InvalidInputError
from prefect_roboflow.flows import auto_label, classify_images, detect_crop_classify, embed_images
from prefect_roboflow.flows._video.decode import iter_frames
from prefect_roboflow.flows._video.sample import SCENE_THRESHOLD, SceneGate, VideoSampling
from prefect_roboflow.flows._video.track import Tracker
from prefect_roboflow.flows.demo import example_spec

pytestmark = pytest.mark.server

LABELS = ["a photo of a cat", "a photo of a dog", "a photo of a box"]


@pytest.fixture(scope="module")
def clip_mp4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 s at 30 fps, 320×240, scene cuts at 3, 6 and 9 s, a square moving 2 px a frame."""
    return make_video(tmp_path_factory.mktemp("videos") / "clip.mp4")


def _rows(path: str) -> list[dict]:
    return pq.read_table(path).to_pylist()


def _frames(path: Path, **sampling: object) -> list[tuple[int, float]]:
    return [(f.index, f.time_s) for f in iter_frames(str(path), VideoSampling(**sampling))]  # type: ignore[arg-type]


def test_sampling_modes_take_the_frames_they_promise(clip_mp4: Path, tmp_path: Path) -> None:
    every = _frames(clip_mp4, fps=None)
    assert [i for i, _ in every] == list(range(300))
    assert all(t == pytest.approx(i / 30, abs=1e-6) for i, t in every)
    # fps: the first frame at or after each multiple of 1 / video_fps
    assert _frames(clip_mp4, fps=1.0) == [(30 * k, float(k)) for k in range(10)]
    assert [i for i, _ in _frames(clip_mp4, fps=2.5)] == [12 * k for k in range(25)]
    assert [i for i, _ in _frames(clip_mp4, fps=60.0)] == list(range(300))  # above the video's rate: all
    # keyframes: exactly the frames the container marks as key
    with av.open(str(clip_mp4)) as container:
        marked = [round(float(p.pts * p.time_base) * 30) for p in container.demux(video=0) if p.is_keyframe]
    keyframes = _frames(clip_mp4, mode="keyframes")
    assert [i for i, _ in keyframes] == sorted(marked) and 0 < len(keyframes) < 300
    assert {90, 180, 270} <= {i for i, _ in keyframes}  # the encoder cuts at scene changes
    # scene: the first frame and the planted cuts, not the moving square
    assert _frames(clip_mp4, fps=None, mode="scene") == [(0, 0.0), (90, 3.0), (180, 6.0), (270, 9.0)]
    assert _frames(clip_mp4, fps=1.0, mode="scene") == [(0, 0.0), (90, 3.0), (180, 6.0), (270, 9.0)]
    # Motion-JPEG: every frame is a keyframe
    avi = make_video(tmp_path / "clip.avi", seconds=2.0)
    assert [i for i, _ in _frames(avi, mode="keyframes")] == list(range(60))


def test_scene_threshold_separates_a_cut_from_noise() -> None:
    rng = np.random.default_rng(0)
    base = np.full((36, 64), 100, np.uint8)
    noisy = np.clip(base + rng.normal(0, 3, base.shape), 0, 255).astype(np.uint8)
    assert SceneGate.difference(base, noisy) < SCENE_THRESHOLD < SceneGate.difference(base, base + 60)
    gate = SceneGate()
    assert [gate.keep(f) for f in (base, noisy, base + 60, base + 61)] == [True, False, True, False]


@pytest.mark.parametrize(
    ("parameters", "field"),
    [
        ({"video_fps": 0}, "video_fps"),
        ({"video_fps": -1.0}, "video_fps"),
        ({"video_fps": float("nan")}, "video_fps"),
        ({"video_sample": "every-other"}, "video_sample"),
    ],
)
def test_bad_sampling_parameters_fail_before_any_request(
    proxy: FaultProxy, clip_mp4: Path, tmp_path: Path, parameters: dict, field: str
) -> None:
    examples, _ = example_spec()
    out, server = str(tmp_path / "out"), proxy.url
    calls = [
        lambda: embed_images(str(clip_mp4), out, server=server, **parameters),
        lambda: classify_images(str(clip_mp4), LABELS, out, server=server, **parameters),
        lambda: detect_crop_classify(str(clip_mp4), examples, LABELS, out, server=server, **parameters),
        lambda: auto_label(str(clip_mp4), examples, LABELS, out, server=server, **parameters),
    ]
    for call in calls:
        with pytest.raises(InvalidInputError, match=field) as raised:
            call()
        assert raised.value.field == field
    assert proxy.count() == 0


def test_video_frames_are_embedded_and_a_rerun_sends_nothing(proxy: FaultProxy, clip_mp4: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "clip.mp4").write_bytes(clip_mp4.read_bytes())
    (folder / "photo.png").write_bytes(make_image(7))
    kwargs = {"server": proxy.url, "cache_storage": str(tmp_path / "cache"), "batch_size": 4}
    result = embed_images(str(folder), str(tmp_path / "out"), **kwargs)
    rows = _rows(result.embeddings_path)
    assert pq.read_schema(result.embeddings_path).names[:4] == [
        "image_ref",
        "image_sha256",
        "frame_index",
        "frame_time_s",
    ]
    frames = [r for r in rows if r["frame_index"] is not None]
    assert [(r["image_ref"], r["frame_index"], r["frame_time_s"]) for r in frames] == [
        (f"{folder / 'clip.mp4'}#frame={30 * k}", 30 * k, float(k)) for k in range(10)
    ]
    photo = [r for r in rows if r["frame_index"] is None]
    assert [r["image_ref"] for r in photo] == [str(folder / "photo.png")] and photo[0]["frame_time_s"] is None
    assert all(r["status"] == "ok" and len(r["embedding"]) == 512 for r in rows)
    assert result.images == 11 and proxy.count("/clip/embed_image") == 11
    assert len({r["image_sha256"] for r in frames}) == 10  # the moving square makes every frame differ
    # the frame bytes are deterministic: a rerun hits the cache for every frame and sends nothing
    proxy.clear()
    again = embed_images(str(folder), str(tmp_path / "out"), **kwargs)
    assert proxy.count() == 0 and again.requests == 0 and again.from_cache == 11
    assert _rows(again.embeddings_path) == rows
    # an overlapping rerun (twice the rate) sends only the frames not taken before
    proxy.clear()
    denser = embed_images(str(folder), str(tmp_path / "out2"), video_fps=2.0, **kwargs)
    assert denser.images == 21 and proxy.count("/clip/embed_image") == 10


def _audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        for k in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, k * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def test_bad_videos_are_failed_rows_and_the_rest_completes(proxy: FaultProxy, clip_mp4: Path, tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    good = clip_mp4.read_bytes()
    avi = make_video(tmp_path / "mjpeg.avi", seconds=4.0).read_bytes()
    (folder / "a_good.mp4").write_bytes(good)
    (folder / "b_empty.mp4").write_bytes(b"")
    (folder / "c_truncated.mp4").write_bytes(good[: len(good) // 2])  # the MP4 index is at the end: lost
    (folder / "d_garbage.mkv").write_bytes(np.random.default_rng(1).integers(0, 256, 4096, np.uint8).tobytes())
    _audio_only(folder / "e_audio.mp4")
    (folder / "f_unknown_codec.avi").write_bytes(avi.replace(b"MJPG", b"ZZZZ"))
    (folder / "g_cut.avi").write_bytes(avi[: len(avi) // 2])  # AVI decodes up to the cut, silently
    kwargs = {"server": proxy.url, "cache_storage": str(tmp_path / "cache"), "max_failure_rate": 1.0}
    result = embed_images(str(folder), str(tmp_path / "out"), **kwargs)
    rows = _rows(result.embeddings_path)
    failed = {Path(r["image_ref"]).name: r["error"] for r in rows if r["status"] == "failed"}
    assert failed.pop("b_empty.mp4") == "video is empty (0 bytes)"
    assert failed.pop("c_truncated.mp4").startswith("not a readable video")
    assert failed.pop("d_garbage.mkv").startswith("not a readable video")
    assert failed.pop("e_audio.mp4") == "the file has no video stream (audio only?)"
    assert "no decoder" in failed.pop("f_unknown_codec.avi")
    (cut_ref, cut_reason), *others = failed.items()
    assert others == [] and cut_ref.startswith("g_cut.avi#frame=")
    assert "ends early" in cut_reason or "decoding stopped" in cut_reason  # where FFmpeg notices the cut
    ok = [r for r in rows if r["status"] == "ok"]
    assert [Path(r["image_ref"]).name for r in ok if "a_good" in r["image_ref"]] == [
        f"a_good.mp4#frame={30 * k}" for k in range(10)
    ]
    cut_frames = [r["frame_index"] for r in ok if "g_cut" in r["image_ref"]]
    assert 0 < len(cut_frames) < 4 and cut_frames == [30 * k for k in range(len(cut_frames))]
    assert proxy.count("/clip/embed_image") == len(ok)
    assert result.failed == 6 and result.succeeded == len(ok)


def test_a_video_in_a_bucket_is_streamed_and_sampled(
    proxy: FaultProxy,
    clip_mp4: Path,
    s3: MotoBucket,  # noqa: F811
    tmp_path: Path,
) -> None:
    url = s3.put("videos/clip.mp4", clip_mp4.read_bytes())
    s3.put("videos/photo.jpg", make_image(3, fmt="JPEG"))
    kwargs = {"server": proxy.url, "cache_storage": str(tmp_path / "cache"), "video_sample": "scene", "video_fps": None}
    result = embed_images(f"s3://{s3.bucket}/videos/", f"s3://{s3.bucket}/out/", **kwargs)
    rows = pq.read_table(io.BytesIO(s3.get("out/embeddings.parquet"))).to_pylist()
    assert [(r["image_ref"], r["frame_time_s"]) for r in rows] == [
        *((f"{url}#frame={i}", i / 30) for i in (0, 90, 180, 270)),
        (f"s3://{s3.bucket}/videos/photo.jpg", None),
    ]
    assert all(r["status"] == "ok" for r in rows) and result.images == 5


CRASHING_RUN = textwrap.dedent(
    """
    import sys
    from prefect_roboflow.flows import embed_images
    embed_images(sys.argv[1], sys.argv[2], server=sys.argv[3], batch_size=8, cache_storage=sys.argv[4], video_fps=2.0)
    """
)


def test_a_killed_video_run_resumes_sending_only_the_missing_frames(proxy: FaultProxy, tmp_path: Path) -> None:
    video = make_video(tmp_path / "long.mp4", seconds=60.0, fps=10)  # 120 frames at video_fps=2
    proxy.latency = 0.1
    InferenceServer(api_url=proxy.url, max_concurrency=2).save("video-slow-link", overwrite=True)
    out, cache = tmp_path / "out", tmp_path / "cache"
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    run = subprocess.Popen(
        [sys.executable, "-c", CRASHING_RUN, str(video), str(out), "video-slow-link", str(cache)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        while proxy.count("/clip/embed_image") < 40 and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.05)
        assert run.poll() is None, "the flow finished before it could be killed"
        os.kill(run.pid, signal.SIGKILL)
    finally:
        run.wait(timeout=30)
    assert not (out / "embeddings.parquet").exists()
    cached = cached_entries(cache)
    assert 0 < cached < 120
    proxy.latency = 0.0
    proxy.clear()
    result = embed_images(
        str(video), str(out), server="video-slow-link", batch_size=8, cache_storage=str(cache), video_fps=2.0
    )
    assert proxy.count("/clip/embed_image") == 120 - cached
    rows = _rows(result.embeddings_path)
    assert [r["frame_index"] for r in rows] == [5 * k for k in range(120)] and all(r["status"] == "ok" for r in rows)


MEMORY_RUN = textwrap.dedent(
    """
    import sys
    from prefect_roboflow.flows._steps.sources import iter_record_batches
    from prefect_roboflow.flows._video.sample import VideoSampling
    frames = sum(len(b) for b in iter_record_batches(sys.argv[1], 32, VideoSampling(fps=None)))
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the (larger) parent through fork and exec
    peak = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(frames, peak)
    """
)


def _peak_rss(video: Path) -> tuple[int, int]:
    done = subprocess.run([sys.executable, "-c", MEMORY_RUN, str(video)], capture_output=True, text=True, check=True)
    frames, peak_kib = done.stdout.split()
    return int(frames), int(peak_kib)


def test_memory_stays_flat_over_a_long_video(tmp_path: Path) -> None:
    short = make_video(tmp_path / "short.mp4", seconds=5.0, fps=15, size=(640, 360))
    long = make_video(tmp_path / "long.mp4", seconds=100.0, fps=15, size=(640, 360))
    (short_frames, short_peak), (long_frames, long_peak) = _peak_rss(short), _peak_rss(long)
    assert (short_frames, long_frames) == (75, 1500)
    # every frame decoded and encoded; 20x the frames may not cost more than a few percent of memory
    # (holding the decoded frames would cost 1500 x 675 KiB ~ 1 GiB)
    assert long_peak <= 1.2 * short_peak


def test_tracker_keeps_an_id_for_a_shape_moving_across_frames() -> None:
    rng = np.random.default_rng(2)
    tracker = Tracker()
    seen: list[list[int | None]] = []
    for k in range(40):
        moving = [20 + 6 * k, 50, 60 + 6 * k, 90]  # 6 px a frame: consecutive boxes overlap
        still = [400, 300, 450, 350]
        boxes = np.array([moving, still], float) + rng.normal(0, 1.0, (2, 4))
        order = rng.permutation(2)  # detections come in any order
        tracks = tracker.update(boxes[order], np.array([0.9, 0.8])[order], time_s=k / 30)
        seen.append([tracks[list(order).index(0)], tracks[list(order).index(1)]])  # type: ignore[list-item]
    assert {(a.id, b.id) for a, b in seen} == {(1, 2)}  # type: ignore[union-attr]
    # a low-confidence sighting keeps its track; a miss of a few frames too; a new object is tentative
    (again,) = tracker.update(np.array([[20 + 6 * 40, 50, 60 + 6 * 40, 90]]), np.array([0.3]), time_s=40 / 30)
    assert again is not None and again.id == 1
    for k in range(41, 44):
        tracker.update(np.zeros((0, 4)), time_s=k / 30)
    later = tracker.update(
        np.array([[20 + 6 * 44, 50, 60 + 6 * 44, 90], [10, 400, 50, 440]]), np.array([0.9, 0.9]), time_s=44 / 30
    )
    assert [t.id if t else 0 for t in later] == [1, None]
    assert tracker.update(np.array([[0, 0, 5, 5]]), np.array([0.05]), time_s=45 / 30) == [None]  # below the floor


def _scene_video(path: Path, frames: int = 30, fps: int = 10) -> Path:
    """A make_scene picture sliding 2 px a frame (objects the placeholder OWLv2 weights can match)."""
    import cv2

    scene = np.asarray(Image.open(io.BytesIO(make_scene(5))).convert("RGB"))[:, :, ::-1]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (320, 240))
    for k in range(frames):
        writer.write(np.ascontiguousarray(np.roll(scene, 2 * k, axis=1)))
    writer.release()
    return path


def test_detect_crop_classify_tracks_and_counts_objects_on_video(proxy: FaultProxy, tmp_path: Path) -> None:
    video = _scene_video(tmp_path / "shelf.mp4")
    (tmp_path / "photo").mkdir()
    examples, _ = example_spec()
    kwargs = {"server": proxy.url, "cache_storage": str(tmp_path / "cache"), "video_fps": 2.0, "batch_size": 4}
    kwargs["confidence"] = 0.95  # the placeholder weights score these frames ~0.98 (boxes meaningless)
    result = detect_crop_classify(
        [str(video), str(tmp_path / "photo.png")], examples, LABELS, str(tmp_path / "out"), **kwargs
    )
    rows = _rows(result.detections_path)
    names = pq.read_schema(result.detections_path).names
    assert (
        names[2:4] == ["frame_index", "frame_time_s"] and names[names.index("detector_confidence") + 1] == "tracker_id"
    )
    frames = sorted({r["frame_index"] for r in rows if r["frame_index"] is not None})
    # six frames, and the example box looked for in its own image (one request: one reference image)
    assert frames == [5 * k for k in range(6)] and proxy.count("/owlv2/infer") == 6 + 1
    tracked = [r for r in rows if r["status"] == "ok" and r["frame_index"] is not None]
    assert tracked, "the placeholder weights find the scene's objects"
    for frame in frames:  # within a frame, each tracked object is one detection
        ids = [r["tracker_id"] for r in tracked if r["frame_index"] == frame and r["tracker_id"] is not None]
        assert len(ids) == len(set(ids)) and all(i >= 1 for i in ids)
    objects = {r["tracker_id"] for r in tracked if r["tracker_id"] is not None}
    assert sum(result.object_counts.values()) == len(objects) and set(result.object_counts) <= set(LABELS)
    assert len(objects) <= len(tracked)
    # the annotated video: one H.264 frame per sampled frame
    (annotated,) = result.annotated_videos
    with av.open(annotated) as container:
        assert container.streams.video[0].codec_context.name == "h264"
        assert sum(1 for _ in container.decode(video=0)) == 6
    proxy.clear()
    again = detect_crop_classify(
        [str(video), str(tmp_path / "photo.png")], examples, LABELS, str(tmp_path / "out"), **kwargs
    )
    assert proxy.count() == 0 and _rows(again.detections_path) == rows and again.object_counts == result.object_counts


def test_an_annotated_video_is_published_whole_to_a_bucket(clip_mp4: Path, s3: MotoBucket, tmp_path: Path) -> None:  # noqa: F811
    from prefect_roboflow.flows._video.frames import frame_records
    from prefect_roboflow.flows._video.sink import AnnotatedVideoSink, annotated_video_name
    from prefect_roboflow.flows.records import Batch

    frames = list(frame_records(str(clip_mp4), VideoSampling(fps=2.0)))
    sink = AnnotatedVideoSink(f"s3://{s3.bucket}/run/annotated")
    sink.write(Batch([], "1/2", parents=frames[:12]))
    assert s3.keys("run/") == []  # nothing visible until the video is complete
    sink.write(Batch([], "2/2", parents=frames[12:]))
    key = f"run/annotated/{annotated_video_name(str(clip_mp4))}"
    assert sink.close() == [f"s3://{s3.bucket}/{key}"] and s3.keys("run/") == [key]
    (tmp_path / "copy.mp4").write_bytes(s3.get(key))
    with av.open(str(tmp_path / "copy.mp4")) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.width, stream.height) == ("h264", 320, 240)
        assert sum(1 for _ in container.decode(stream)) == 20
