"""Which frames of a video a run takes: a fixed rate of video time, the container's keyframes, or
the frames where the scene changes.

``"fps"`` keeps the first frame at or after each multiple of ``1 / video_fps`` seconds of
presentation time (``video_fps=None``: every frame). ``"keyframes"`` keeps the frames the
container marks as keyframes (only those are decoded; ``video_fps`` is not used). ``"scene"`` looks
at the frames ``"fps"`` would keep and keeps one when it differs from the last kept frame by more
than `SCENE_THRESHOLD`: the mean absolute difference of the two frames' grayscale thumbnails
(`THUMBNAIL` pixels), in 0–255 levels. A static camera then sends its first frame and a frame per
real change, not one per second.

```python
sampling = VideoSampling(fps=1.0, mode="scene")
```
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from prefect_roboflow.blocks.exceptions import InvalidInputError

__all__ = ["SAMPLE_MODES", "SCENE_THRESHOLD", "THUMBNAIL", "FpsGate", "SceneGate", "VideoSampling", "check_sampling"]

SampleMode = Literal["fps", "keyframes", "scene"]
SAMPLE_MODES: tuple[str, ...] = ("fps", "keyframes", "scene")
#: Mean absolute grayscale difference (0–255) between thumbnails above which "scene" keeps a frame:
#: a cut or a large object entering moves it by tens of levels; sensor noise and compression by 1–3.
SCENE_THRESHOLD = 12.0
#: (width, height) of the grayscale thumbnail "scene" compares.
THUMBNAIL = (64, 36)
#: Presentation times within this many seconds of a sampling instant count as on it.
_TIME_SLACK = 1e-6


@dataclass(frozen=True)
class VideoSampling:
    """How a run samples the frames of its videos.

    Attributes:
        fps: Frames kept per second of video time; None keeps every frame (``"fps"``, ``"scene"``).
        mode: ``"fps"``, ``"keyframes"`` or ``"scene"``.
        scene_threshold: For ``"scene"``: see `SCENE_THRESHOLD`.
    """

    fps: float | None = 1.0
    mode: SampleMode = "fps"
    scene_threshold: float = SCENE_THRESHOLD


def check_sampling(video_fps: float | None, video_sample: str) -> VideoSampling:
    """The sampling a flow's ``video_fps`` and ``video_sample`` ask for, checked before any request.

    Raises:
        InvalidInputError: naming ``video_fps`` (not a positive finite number) or ``video_sample``
            (not one of `SAMPLE_MODES`).
    """
    number = isinstance(video_fps, (int, float)) and not isinstance(video_fps, bool)
    if video_fps is not None and (not number or not math.isfinite(video_fps) or video_fps <= 0):
        raise InvalidInputError(
            "video_fps", f"must be a positive number of frames per second or None, got {video_fps!r:.80}"
        )
    if video_sample not in SAMPLE_MODES:
        raise InvalidInputError("video_sample", f"must be one of {', '.join(SAMPLE_MODES)}; got {video_sample!r}")
    return VideoSampling(None if video_fps is None else float(video_fps), video_sample)  # type: ignore[arg-type]


class FpsGate:
    """Keeps the first frame at or after each sampling instant ``start + k / fps``."""

    def __init__(self, fps: float | None) -> None:
        self.fps = fps
        self._next: float | None = None
        self._start = 0.0

    @property
    def upcoming(self) -> float:
        """The next sampling instant: a frame presented before it will not be kept (-inf before the first)."""
        return -math.inf if self.fps is None or self._next is None else self._next - _TIME_SLACK

    def keep(self, time_s: float) -> bool:
        """Whether the frame presented at ``time_s`` is kept (frames come in presentation order)."""
        if self.fps is None:
            return True
        if self._next is None:
            self._start, self._next = time_s, time_s
        if time_s + _TIME_SLACK < self._next:
            return False
        steps = math.floor((time_s - self._start) * self.fps + _TIME_SLACK) + 1
        self._next = self._start + steps / self.fps
        return True


class SceneGate:
    """Keeps a frame whose thumbnail differs from the last kept one's by more than ``threshold``."""

    def __init__(self, threshold: float = SCENE_THRESHOLD) -> None:
        self.threshold = threshold
        self._last: np.ndarray | None = None

    @staticmethod
    def difference(a: np.ndarray, b: np.ndarray) -> float:
        """Mean absolute difference of two grayscale thumbnails, in 0–255 levels."""
        return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())

    def keep(self, thumbnail: np.ndarray) -> bool:
        """Whether a frame with this grayscale thumbnail is kept (the first always is)."""
        if self._last is not None and self.difference(thumbnail, self._last) <= self.threshold:
            return False
        self._last = thumbnail
        return True
