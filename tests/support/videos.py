"""Test videos made on the spot with OpenCV's VideoWriter: planted scene changes and a moving shape.

``.mp4`` files are MPEG-4 Part 2 (fourcc ``mp4v``: inter-frame, a keyframe every 12 frames and at
cuts), ``.avi`` files Motion-JPEG (``MJPG``: every frame a keyframe), the encoders OpenCV's wheel
always has. Content is deterministic for given arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["BACKGROUNDS", "make_video", "pattern", "shape_box", "write_h264"]

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


def pattern(index: int, width: int = 160, height: int = 96) -> np.ndarray:
    """An RGB frame whose orientation shows: a red block at the top-left, a green bar along the
    bottom, a blue dot near the right edge, and a grey level that changes with ``index``."""
    frame = np.full((height, width, 3), 60 + (index * 7) % 120, np.uint8)
    frame[: height // 3, : width // 4] = (230, 30, 30)
    frame[-height // 6 :, :] = (30, 200, 30)
    frame[height // 3 : height // 2, -width // 8 :] = (30, 30, 230)
    return frame


def write_h264(
    path: Path,
    times: Sequence[float],
    size: tuple[int, int] = (160, 96),
    rotation: int = 0,
    hflip: bool = False,
    rotate_tag: str | None = None,
    bframes: int = 0,
    gop: int = 12,
) -> Path:
    """An H.264 video (PyAV's libx264) of `pattern` frames presented at ``times`` (seconds, on a
    90 kHz clock: uneven gaps make a variable-frame-rate file). ``rotation`` (counter-clockwise
    degrees) and ``hflip`` go into the display matrix, ``rotate_tag`` into an old-style ``rotate``
    metadata tag (clockwise degrees; use a ``.mkv`` path); ``bframes`` non-reference B-frames
    between references, a keyframe every ``gop`` frames."""
    from fractions import Fraction

    import av

    width, height = size
    tick = Fraction(1, 90_000)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264")
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = stream.codec_context.time_base = tick
        stream.options = {"bframes": str(bframes), "b-pyramid": "none", "g": str(gop), "keyint_min": str(gop)}
        stream.options["sc_threshold"] = "0"  # keyframes where told, not at content changes
        if rotation or hflip:
            stream.set_display_rotation(rotation, hflip=hflip)
        if rotate_tag is not None:
            stream.metadata["rotate"] = rotate_tag
        for index, time_s in enumerate(times):
            frame = av.VideoFrame.from_ndarray(pattern(index, width, height), format="rgb24")
            frame.pts, frame.time_base = round(time_s / tick), tick
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path
