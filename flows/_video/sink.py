"""Annotated videos: a video's sampled frames with their boxes, labels and tracker ids drawn, encoded
as H.264 MP4 (PyAV's libx264, ``yuv420p``: plays in browsers) on the source's clock.

Each frame keeps its presentation time in the source (``frame_time_s``, at `TIME_BASE` resolution)
and lasts until the next sampled frame; the last one lasts one source frame. The MP4 thus plays in
real time whatever the sampling: ``video_fps=None`` gives the clip's own length, frames sampled at 0,
30 and 60 s (``"scene"``) give a 60 s video that shows each for 30 s, and a variable-frame-rate
source keeps its timing.

Each video is encoded into a local temporary file as its frames arrive (one frame held, to know its
duration) and published whole through `_storage` when its last frame is in: a local folder sees the
file appear complete, a bucket gets one object.

```python
sink = AnnotatedVideoSink(join(out, "annotated"))
sink.write(batch)      # crop batches from `classify`, after `VideoTracks.track`
sink.close()           # publishes the last video; returns the published paths
```
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from .._storage.access import join, upload_file
from ..records import Batch, ImageRecord
from .track import video_of

__all__ = ["TIME_BASE", "AnnotatedVideoSink", "annotated_video_name"]

#: x264 constant-rate factor of annotated videos (23: x264's default; lower is larger and sharper).
VIDEO_CRF = 23
#: Timestamps of annotated videos are multiples of this (MPEG's 90 kHz clock).
TIME_BASE = Fraction(1, 90_000)
#: A source frame's duration when a video has a single sampled frame to tell it by (seconds).
DEFAULT_FRAME_SECONDS = 1 / 30


def annotated_video_name(video_ref: str) -> str:
    """File name of a video's annotated copy: its stem plus a prefix of its reference's hash (refs may clash)."""
    digest = hashlib.sha256(video_ref.encode()).hexdigest()[:10]
    return f"{Path(video_ref.split('?')[0]).stem}-{digest}.mp4"


class _Encoder:
    """One H.264 MP4 being written to a local file, its frames stamped with their source times.

    A frame is encoded when the next one arrives (its duration is the gap between them), the last
    one at `close` with one source frame's duration (estimated from the indices and times seen).
    """

    def __init__(self, path: str, width: int, height: int) -> None:
        import av

        self.path, self.size = path, (width - width % 2, height - height % 2)
        self.container: Any = av.open(path, mode="w")
        self.stream: Any = self.container.add_stream("libx264")
        self.stream.width, self.stream.height = self.size
        self.stream.pix_fmt = "yuv420p"
        self.stream.time_base = self.stream.codec_context.time_base = TIME_BASE
        self.stream.options = {"crf": str(VIDEO_CRF), "preset": "veryfast"}
        self.frames = 0
        self._held: tuple[np.ndarray, int, int] | None = None  # pixels, pts, source frame index
        self._durations: dict[int, int] = {}
        self._frame_ticks: int | None = None  # one source frame, in TIME_BASE ticks

    def add(self, rgb: np.ndarray, time_s: float, index: int) -> None:
        pts = round(time_s / TIME_BASE)
        if self._held is not None:
            held_pixels, held_pts, held_index = self._held
            if pts <= held_pts:  # not after the held frame: the source repeats a time; keep the first
                return
            if index > held_index:
                self._frame_ticks = max(1, round((pts - held_pts) / (index - held_index)))
            self._encode(held_pixels, held_pts, pts - held_pts)
        self._held = (rgb, pts, index)

    def _encode(self, rgb: np.ndarray, pts: int, duration: int) -> None:
        import av

        width, height = self.size
        if rgb.shape[1] != width or rgb.shape[0] != height:
            rgb = np.ascontiguousarray(_fit(rgb, width, height))
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts, frame.time_base = pts, TIME_BASE
        self._durations[pts] = duration
        self._mux(self.stream.encode(frame))
        self.frames += 1

    def _mux(self, packets: list[Any]) -> None:
        for packet in packets:
            if packet.pts is not None:
                packet.duration = self._durations.pop(packet.pts, packet.duration)
            self.container.mux(packet)

    def close(self) -> None:
        if self._held is not None:
            held_pixels, held_pts, _ = self._held
            self._encode(held_pixels, held_pts, self._frame_ticks or round(DEFAULT_FRAME_SECONDS / TIME_BASE))
            self._held = None
        self._mux(self.stream.encode(None))
        self.container.close()


def _fit(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    import cv2

    return cv2.resize(rgb, (width, height))


class AnnotatedVideoSink:
    """Draws each video frame's detections (captioned ``#id label score``) into one annotated MP4
    per video under ``folder`` (a local folder or a bucket prefix); photos are left to the image sink.

    Attributes:
        written: The published videos' locations, in order.
    """

    def __init__(self, folder: str) -> None:
        import supervision as sv

        self.folder = folder
        self.written: list[str] = []
        self._work = tempfile.TemporaryDirectory(prefix="prefect-roboflow-annotated-")
        self._video: str | None = None
        self._encoder: _Encoder | None = None
        self._boxes = sv.BoxAnnotator(thickness=2)
        self._labels = sv.LabelAnnotator(text_scale=0.4)

    def write(self, batch: Batch) -> None:
        """Add the batch's video frames (with or without detections) to their videos' encoders."""
        for parent, crops in batch.by_parent():
            video = video_of(parent)
            if video is None or not parent.ok or parent.data is None or parent.frame_time_s is None:
                continue
            if video != self._video:
                self._finish()
                self._video = video
            self._add(parent, crops)

    def _add(self, parent: ImageRecord, crops: list[ImageRecord]) -> None:
        from PIL import Image

        assert parent.data is not None
        with Image.open(io.BytesIO(parent.data)) as image:
            scene = np.asarray(image.convert("RGB"))[:, :, ::-1].copy()
        found = parent.detections
        if crops and found is not None:
            captions = []
            for crop in crops:
                tracked = crop.crop.tracker_id if crop.crop is not None else None
                prefix = f"#{tracked} " if tracked is not None else ""
                captions.append(
                    f"{prefix}{crop.label.name} {crop.label.score:.2f}" if crop.ok and crop.label else "failed"
                )
            scene = self._boxes.annotate(scene, found)
            scene = self._labels.annotate(scene, found, labels=captions)
        if self._encoder is None:
            assert self._video is not None
            path = os.path.join(self._work.name, annotated_video_name(self._video))
            self._encoder = _Encoder(path, scene.shape[1], scene.shape[0])
        assert parent.frame_time_s is not None and parent.frame_index is not None
        self._encoder.add(scene[:, :, ::-1], parent.frame_time_s, parent.frame_index)

    def _finish(self) -> None:
        if self._encoder is None or self._video is None:
            return
        encoder, self._encoder = self._encoder, None
        encoder.close()
        target = join(self.folder, annotated_video_name(self._video))
        upload_file(target, encoder.path)
        os.unlink(encoder.path)
        self.written.append(target)

    def close(self) -> list[str]:
        """Publish the video still being written; the published locations. Closing again does nothing."""
        try:
            self._finish()
        finally:
            self._work.cleanup()
        return self.written

    def abort(self) -> None:
        """Drop the video still being written (its encoder and local file), publishing nothing more."""
        encoder, self._encoder = self._encoder, None
        try:
            if encoder is not None:
                with contextlib.suppress(Exception):  # a half-written file is deleted just below
                    encoder.container.close()
        finally:
            self._work.cleanup()
