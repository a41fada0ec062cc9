"""Frames of one video, decoded as a stream with PyAV (FFmpeg's libraries), one frame in memory at
a time: a two-hour video costs what a two-minute one does.

A local video is read where it is. A video in a bucket, an fsspec location or a ``block://`` is
first copied through `_storage` to a temporary file (streamed, never whole in memory: containers
such as MP4 keep their index at the end, so decoding needs to seek), removed when decoding ends.

Only the frames the sampling keeps are converted to RGB (the others are decoded, as inter-frame
codecs need, and dropped); for ``"keyframes"`` the decoder skips every other frame outright.

```python
for frame in iter_frames("clip.mp4", VideoSampling(fps=1.0)):
    frame.index, frame.time_s, frame.rgb.shape   # 0, 0.0, (1080, 1920, 3); 30, 1.0, ...
```
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from prefect_roboflow.blocks.exceptions import InvalidImageError, InvalidInputError

from .._storage.access import local_copy
from .sample import THUMBNAIL, FpsGate, SceneGate, VideoSampling

__all__ = ["Frame", "VideoReadError", "iter_frames", "local_video", "probe_frames"]


#: A video decoding to fewer than this share of the frames its header announces is reported truncated
#: (after the frames it has): some containers (AVI) end silently where the file was cut.
TRUNCATED_SHARE = 0.98


class VideoReadError(InvalidImageError):
    """A video that cannot be opened or decoded (empty, truncated, corrupt, no video stream, no decoder).

    Attributes:
        frames_read: Frames yielded before the error (0 when the video could not be opened).
    """

    def __init__(self, reason: str, frames_read: int = 0) -> None:
        super().__init__("image", reason)
        self.frames_read = frames_read


@dataclass(frozen=True)
class Frame:
    """One sampled frame.

    Attributes:
        index: Its position in the decoded stream (0 = the first frame).
        time_s: Its presentation time in seconds from the start of the stream.
        rgb: ``(height, width, 3)`` uint8.
    """

    index: int
    time_s: float
    rgb: np.ndarray


@contextmanager
def local_video(ref: str) -> Iterator[str]:
    """A local path holding the video ``ref``: the file itself, or a temporary copy of a remote one
    (`_storage.access.local_copy`: streamed, removed on leaving).

    Raises:
        VideoReadError: the file or object is missing or cannot be read.
    """
    try:
        with local_copy(ref) as path:
            if not path.is_file():
                raise VideoReadError(f"not found: {ref}")
            yield str(path)
    except VideoReadError:
        raise
    except InvalidInputError as error:
        raise VideoReadError(error.reason) from None


def _open(path: str) -> Any:
    import av

    if os.path.getsize(path) == 0:
        raise VideoReadError("video is empty (0 bytes)")
    try:
        container = av.open(path, metadata_errors="ignore")
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise VideoReadError(f"not a readable video: {_reason(exc)}") from None
    if not container.streams.video:
        container.close()
        raise VideoReadError("the file has no video stream (audio only?)")
    stream = container.streams.video[0]
    if stream.codec_context is None or stream.codec_context.codec is None:
        container.close()
        raise VideoReadError("no decoder for the video's codec (unknown or unsupported codec)")
    return container


def probe_frames(path: str, sampling: VideoSampling) -> int:
    """About how many frames ``sampling`` keeps of a local video, from its header (for progress); 1 when unknown."""
    try:
        container = _open(path)
    except VideoReadError:
        return 1
    with container:
        stream = container.streams.video[0]
        duration = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
        if duration is None and container.duration:
            duration = container.duration / 1_000_000
        rate = float(stream.average_rate or stream.guessed_rate or 0) or None
    if not duration or not rate:
        return 1
    if sampling.mode == "keyframes" or sampling.fps is None or sampling.fps >= rate:
        return max(1, round(duration * rate))
    return max(1, int(duration * sampling.fps) + 1)


def iter_frames(path: str, sampling: VideoSampling) -> Iterator[Frame]:
    """The frames of a local video that ``sampling`` keeps, in presentation order, as they decode.

    Raises:
        VideoReadError: when the video cannot be opened (before any frame), or decoding fails
            part-way (after the frames read so far); with a reason for the video's failed row.
    """
    import av

    container = _open(path)
    read = 0
    with container:
        stream = container.streams.video[0]
        keyframes = sampling.mode == "keyframes"
        if keyframes:
            stream.codec_context.skip_frame = "NONKEY"
        rate = float(stream.average_rate or stream.guessed_rate or 30)
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        fps = FpsGate(None if keyframes else sampling.fps)
        scene = SceneGate(sampling.scene_threshold) if sampling.mode == "scene" else None
        position = -1
        try:
            for frame in container.decode(stream):
                position += 1
                time_s = (frame.time - start) if frame.time is not None else position / rate
                index = round(time_s * rate) if keyframes else position
                if not fps.keep(time_s):
                    continue
                if scene is not None:
                    width, height = THUMBNAIL
                    thumbnail = frame.reformat(width=width, height=height, format="gray").to_ndarray()
                    if not scene.keep(thumbnail):
                        continue
                yield Frame(index, round(time_s, 6), frame.to_ndarray(format="rgb24"))
                read += 1
        except (av.FFmpegError, OSError, ValueError) as exc:
            raise VideoReadError(f"decoding stopped after frame {position}: {_reason(exc)}", read) from None
        announced = stream.frames  # 0 when the container does not say
    if read == 0:
        raise VideoReadError("no frame could be decoded")
    if not keyframes and announced and position + 1 < announced * TRUNCATED_SHARE:
        raise VideoReadError(
            f"the video ends early: {position + 1} of the {announced} frames its header announces (truncated?)", read
        )


def _reason(exc: Exception) -> str:
    """An FFmpeg error's message, without the (possibly temporary) file name."""
    return str(getattr(exc, "strerror", None) or exc)
