"""One process that runs 200 flows, as a long-lived worker or `serve` process does, keeps a flat
count of threads, open files and sockets: runs that succeed, fail their failure rule, fail on a
server that refuses connections, and draw an annotated video. Measured as the process sees itself
(``/proc/self``), with the garbage collector left to its own pace: a resource held only by garbage
grows until a full collection, which a busy process may not reach for hours."""

from __future__ import annotations

import os
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest
from support.images import make_image
from support.videos import make_video

from prefect_roboflow.flows import detect_crop_classify, embed_images
from prefect_roboflow.flows._outputs.annotated import AnnotatedImageSink

pytestmark = [pytest.mark.server, pytest.mark.slow]

RUNS = 200


def _open_files() -> tuple[int, int]:
    """Open file descriptors of this process, and how many of them are sockets."""
    files = sockets = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the listing's own descriptor, closed by now
            continue
        files += 1
        sockets += target.startswith("socket:")
    return files, sockets


def _resources() -> dict[str, int]:
    files, sockets = _open_files()
    return {"threads": threading.active_count(), "files": files, "sockets": sockets}


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_two_hundred_flow_runs_keep_threads_files_and_sockets_flat(inference_url: str, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        (photos / f"{i}.png").write_bytes(make_image(900 + i))
    clips = tmp_path / "clips"
    clips.mkdir()
    make_video(clips / "clip.mp4", seconds=2.0, fps=5)
    examples = [{"image": str(photos / "0.png"), "boxes": [{"x": 160, "y": 120, "w": 80, "h": 60, "cls": "can"}]}]
    cache = str(tmp_path / "cache")
    dead = f"http://127.0.0.1:{_closed_port()}"

    kwargs: dict[str, Any] = {"cache_storage": cache, "server": inference_url, "return_state": True}
    missing = [str(photos / "0.png"), str(photos / "gone.png")]

    def run(i: int) -> Any:
        if i % 25 == 24:  # a video: frames, tracks and the annotated MP4
            return detect_crop_classify(str(clips), examples, ["a can", "a lid"], str(tmp_path / "video"), **kwargs)
        if i % 10 == 3:  # the failure rule: one image of two is missing
            return embed_images(missing, str(tmp_path / "rule"), **{**kwargs, "max_failure_rate": 0.0})
        if i % 10 == 6:  # a server that refuses connections
            return embed_images(
                str(photos),
                str(tmp_path / "dead"),
                **{**kwargs, "server": dead, "cache_storage": str(tmp_path / "none")},
            )
        return embed_images(str(photos), str(tmp_path / f"ok{i % 10}"), **kwargs)

    seen: dict[int, dict[str, int]] = {}
    for i in range(RUNS):
        state = run(i)
        assert state.is_failed() == (i % 25 != 24 and i % 10 in (3, 6)), (i, state)
        if i + 1 in (50, RUNS):
            seen[i + 1] = _resources()
    warm, end = seen[50], seen[RUNS]
    assert end["threads"] <= warm["threads"] + 2, seen
    assert end["files"] <= warm["files"] + 6, seen  # garbage not yet collected, at most a few
    assert end["sockets"] <= warm["sockets"] + 4, seen


def test_an_error_mid_run_closes_the_video_sink_and_publishes_nothing(
    inference_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that fails while drawing its video (here: the image sink raises on the second batch)
    leaves no annotated MP4, no temporary encoder file and no open video file behind."""
    clips = tmp_path / "clips"
    clips.mkdir()
    make_video(clips / "clip.mp4", seconds=4.0, fps=5)
    reference = tmp_path / "reference.png"
    reference.write_bytes(make_image(950))
    examples = [{"image": str(reference), "boxes": [{"x": 160, "y": 120, "w": 80, "h": 60, "cls": "can"}]}]
    calls = []
    original = AnnotatedImageSink.write

    def failing(self: AnnotatedImageSink, batch: Any) -> Any:
        calls.append(len(batch))
        if len(calls) == 2:
            raise OSError("disk full (injected)")
        return original(self, batch)

    monkeypatch.setattr(AnnotatedImageSink, "write", failing)
    temp_root = Path(tempfile.gettempdir())
    before = set(temp_root.glob("prefect-roboflow-annotated-*"))
    state = detect_crop_classify(
        str(clips), examples, ["a can"], str(tmp_path / "out"), server=inference_url, batch_size=4,
        video_fps=2.0, cache_storage=str(tmp_path / "cache"), return_state=True,
    )  # fmt: skip
    assert state.is_failed() and "disk full (injected)" in str(state.message)
    assert len(calls) == 2  # the error came mid-run, after a batch had gone into the video
    assert not list((tmp_path / "out").rglob("*.mp4"))
    assert set(temp_root.glob("prefect-roboflow-annotated-*")) == before
    open_videos = [t for t in (_target(fd) for fd in os.listdir("/proc/self/fd")) if t and t.endswith(".mp4")]
    assert open_videos == []


def _target(fd: str) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
