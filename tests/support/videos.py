"""Test videos made on the spot with OpenCV's VideoWriter: planted scene changes and a moving shape.

``.mp4`` files are MPEG-4 Part 2 (fourcc ``mp4v``: inter-frame, a keyframe every 12 frames and at
cuts), ``.avi`` files Motion-JPEG (``MJPG``: every frame a keyframe), the encoders OpenCV's wheel
always has. Content is deterministic for given arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["BACKGROUNDS", "make_video", "shape_box"]

#: Background grey level of each planted scene, in turn (far apart: a cut moves the picture by ~80 levels).
BACKGROUNDS = (40, 200, 110)
SHAPE = 40


def shape_box(index: int, width: int, height: int, speed: int = 2) -> tuple[int, int, int, int]:
    """Where the moving square is in frame ``index``: ``speed`` pixels right per frame, wrapping."""
    x = (index * speed) % (width - SHAPE)
    y = height // 2 - SHAPE // 2
    return x, y, x + SHAPE, y + SHAPE


def make_video(
    path: Path,
    seconds: float = 10.0,
    fps: int = 30,
    size: tuple[int, int] = (320, 240),
    scene_seconds: float | None = 3.0,
    cuts: Sequence[float] | None = None,
    speed: int = 2,
) -> Path:
    """Write a video: a plain background that changes at each cut (every ``scene_seconds`` unless
    ``cuts`` lists the times), and a red square moving right by ``speed`` pixels a frame."""
    import cv2

    width, height = size
    fourcc = "MJPG" if path.suffix.lower() == ".avi" else "mp4v"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, size)
    assert writer.isOpened(), f"OpenCV cannot write {fourcc} here"
    if cuts is None:
        cuts = [] if scene_seconds is None else list(np.arange(scene_seconds, seconds, scene_seconds))
    frame = np.empty((height, width, 3), np.uint8)
    for index in range(round(seconds * fps)):
        scene = sum(1 for cut in cuts if index >= round(cut * fps))
        frame[:] = BACKGROUNDS[scene % len(BACKGROUNDS)]
        x1, y1, x2, y2 = shape_box(index, width, height, speed)
        frame[y1:y2, x1:x2] = (0, 0, 255)
        writer.write(frame)
    writer.release()
    return path
