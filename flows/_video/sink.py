"""Annotated videos: a video's sampled frames with their boxes, labels and tracker ids drawn, encoded
as H.264 MP4 (PyAV's libx264, ``yuv420p``: plays in browsers) at the sampling rate.

Each video is encoded into a local temporary file as its frames arrive (one frame in memory at a
time) and published whole through `_storage` when its last frame is in: a local folder sees the
file appear complete, a bucket gets one object.

```python
sink = AnnotatedVideoSink(join(out, "annotated"), fps=1.0)
sink.write(batch)      # crop batches from `classify`, after `VideoTracks.track`
sink.close()           # publishes the last video; returns the published paths
```
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .._storage.access import join, upload_file
from ..records import Batch, ImageRecord
from .track import video_of

__all__ = ["AnnotatedVideoSink", "annotated_video_name"]

#: x264 constant-rate factor of annotated videos (23: x264's default; lower is larger and sharper).
VIDEO_CRF = 23


def annotated_video_name(video_ref: str) -> str:
    """File name of a video's annotated copy: its stem plus a prefix of its reference's hash (refs may clash)."""
    digest = hashlib.sha256(video_ref.encode()).hexdigest()[:10]
    return f"{Path(video_ref.split('?')[0]).stem}-{digest}.mp4"


class _Encoder:
    """One H.264 MP4 being written to a local file."""

    def __init__(self, path: str, fps: float, width: int, height: int) -> None:
        from fractions import Fraction

        import av

        self.path, self.size = path, (width - width % 2, height - height % 2)
        self.container: Any = av.open(path, mode="w")
        rate = Fraction(fps).limit_denominator(1000)
        self.stream: Any = self.container.add_stream("libx264", rate=rate)
        self.stream.width, self.stream.height = self.size
        self.stream.pix_fmt = "yuv420p"
        self.stream.options = {"crf": str(VIDEO_CRF), "preset": "veryfast"}
        self.frames = 0

    def add(self, rgb: np.ndarray) -> None:
        import av

        width, height = self.size
        if rgb.shape[1] != width or rgb.shape[0] != height:
            rgb = np.ascontiguousarray(_fit(rgb, width, height))
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts = self.frames
        self.container.mux(self.stream.encode(frame))
        self.frames += 1

    def close(self) -> None:
        self.container.mux(self.stream.encode(None))
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

    def __init__(self, folder: str, fps: float | None) -> None:
        import supervision as sv

        self.folder, self.fps = folder, fps or 1.0
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
            if video is None or not parent.ok or parent.data is None:
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
            self._encoder = _Encoder(path, self.fps, scene.shape[1], scene.shape[0])
        self._encoder.add(scene[:, :, ::-1])

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
        """Publish the video still being written; the published locations."""
        try:
            self._finish()
        finally:
            self._work.cleanup()
        return self.written
