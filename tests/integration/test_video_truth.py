"""Video true to the file: orientation, frame identity and time, checked against what the tests
planted (support/videos.py writes H.264 with PyAV: display matrices, old rotate tags, uneven
timestamps, B-frames) and against independent readers (OpenCV's own rotation handling,
``CAP_PROP_ORIENTATION_META``; PyAV reading the annotated MP4 back; Pillow's JPEG encoder)."""

from __future__ import annotations

import io
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from PIL import Image
from support.videos import pattern, write_h264

from prefect_roboflow.flows._video.decode import iter_frames
from prefect_roboflow.flows._video.frames import encode_frame, frame_records
from prefect_roboflow.flows._video.sample import VideoSampling
from prefect_roboflow.flows._video.sink import TIME_BASE, AnnotatedVideoSink
from prefect_roboflow.flows.records import Batch

#: Uneven gaps between frames (seconds): a variable-frame-rate file.
GAPS = (1 / 30, 1 / 10, 1 / 60, 1 / 24, 1 / 30, 1 / 5)


def _vfr_times(frames: int) -> list[float]:
    times = [0.0]
    for k in range(frames - 1):
        times.append(times[-1] + GAPS[k % len(GAPS)])
    return times


def _first(path: Path) -> np.ndarray:
    return next(iter_frames(str(path), VideoSampling(fps=None))).rgb


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_a_rotated_video_is_decoded_upright(tmp_path: Path, rotation: int) -> None:
    video = write_h264(tmp_path / f"phone-{rotation}.mp4", [k / 30 for k in range(6)], rotation=rotation)
    ours = _first(video)
    planted = np.rot90(pattern(0), k=rotation // 90)  # the display matrix turns counter-clockwise
    assert ours.shape == planted.shape
    assert np.abs(ours.astype(int) - planted.astype(int)).mean() < 4  # H.264 is lossy, the layout is not
    capture = cv2.VideoCapture(str(video))  # an independent reader that applies the rotation itself
    assert capture.get(cv2.CAP_PROP_ORIENTATION_META) == (360 - rotation) % 360  # it is in the file
    ok, theirs = capture.read()
    capture.release()
    assert ok and theirs.shape == ours.shape
    assert np.abs(theirs[:, :, ::-1].astype(int) - ours.astype(int)).max() <= 2


def test_a_mirrored_display_matrix_and_an_old_rotate_tag_are_applied(tmp_path: Path) -> None:
    mirrored = write_h264(tmp_path / "mirror.mp4", [k / 30 for k in range(4)], hflip=True)
    assert np.abs(_first(mirrored).astype(int) - pattern(0)[:, ::-1].astype(int)).mean() < 4
    tagged = write_h264(tmp_path / "old.mkv", [k / 30 for k in range(4)], rotate_tag="90")  # clockwise
    ours = _first(tagged)
    assert ours.shape == (160, 96, 3)
    assert np.abs(ours.astype(int) - np.rot90(pattern(0), k=-1).astype(int)).mean() < 4


def test_frame_indices_are_the_same_frame_in_every_mode_on_a_variable_frame_rate_file(tmp_path: Path) -> None:
    times = _vfr_times(90)
    video = write_h264(tmp_path / "vfr.mp4", times, bframes=2, gop=10)
    every = {f.index: f for f in iter_frames(str(video), VideoSampling(fps=None))}
    assert sorted(every) == list(range(90))
    assert [round(every[k].time_s, 4) for k in range(90)] == [round(t, 4) for t in times]
    for sampling in (VideoSampling(mode="keyframes"), VideoSampling(fps=2.0), VideoSampling(fps=0.5, mode="scene")):
        taken = list(iter_frames(str(video), sampling))
        assert taken, sampling
        for frame in taken:  # the same index names the same frame: its time and its pixels
            assert frame.time_s == every[frame.index].time_s
            assert np.array_equal(frame.bgr, every[frame.index].bgr)
    keyframes = [f.index for f in iter_frames(str(video), VideoSampling(mode="keyframes"))]
    assert keyframes == list(range(0, 90, 10))
    # fps mode keeps the first frame at or after each instant, B-frames skipped or not
    at_two = [f.index for f in iter_frames(str(video), VideoSampling(fps=2.0))]
    expected, next_time = [], 0.0
    for k, t in enumerate(times):
        if t + 1e-6 >= next_time:
            expected.append(k)
            next_time = (np.floor(t * 2 + 1e-6) + 1) / 2
    assert at_two == expected


@pytest.mark.parametrize(
    "sampling",
    [
        VideoSampling(fps=None),
        VideoSampling(fps=2.0),
        VideoSampling(fps=None, mode="scene"),
        VideoSampling(mode="keyframes"),
    ],
    ids=["every-frame", "fps-2", "scene", "keyframes"],
)
def test_an_annotated_video_plays_on_the_sources_clock(tmp_path: Path, sampling: VideoSampling) -> None:
    times = _vfr_times(60)
    video = write_h264(tmp_path / "vfr.mp4", times, gop=15)
    frames = [r for r in frame_records(str(video), sampling) if r.ok]
    sink = AnnotatedVideoSink(str(tmp_path / "annotated"))
    sink.write(Batch([], parents=frames[: len(frames) // 2]))
    sink.write(Batch([], parents=frames[len(frames) // 2 :]))
    (written,) = sink.close()
    with av.open(written) as container:  # read back by PyAV's demuxer and decoder
        stream = container.streams.video[0]
        shown = [float(f.pts * f.time_base) for f in container.decode(stream)]
        duration = container.duration / 1_000_000
    sources = [r.frame_time_s for r in frames]
    assert len(shown) == len(sources)
    assert all(abs(a - b) <= float(TIME_BASE) + 1e-6 for a, b in zip(shown, sources, strict=True))
    span = sources[-1] - sources[0]
    assert span <= duration - shown[0] <= span + max(GAPS) + 1e-3  # plays in real time, to one source frame


def test_frames_are_sent_as_the_jpeg_pillow_makes(tmp_path: Path) -> None:
    video = write_h264(tmp_path / "clip.mp4", [k / 30 for k in range(3)], size=(320, 240))
    for frame in iter_frames(str(video), VideoSampling(fps=None)):
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(frame.rgb)).save(buffer, format="JPEG", quality=95)
        assert encode_frame(frame.bgr) == buffer.getvalue()  # reruns hit caches filled before the switch
