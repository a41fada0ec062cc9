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

import heapq
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from prefect_roboflow.blocks.exceptions import InvalidImageError, InvalidInputError

from .._storage.access import local_copy
from .sample import THUMBNAIL, FpsGate, SceneGate, VideoSampling

__all__ = ["Frame", "Orientation", "VideoReadError", "iter_frames", "local_video", "orientation_of", "probe_frames"]


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
    """One sampled frame, upright.

    Attributes:
        index: Its position in presentation order among the stream's frames (0 = the first).
        time_s: Its presentation time in seconds from the start of the stream.
        bgr: ``(height, width, 3)`` uint8, OpenCV's channel order (what its JPEG encoder takes).
    """

    index: int
    time_s: float
    bgr: np.ndarray

    @property
    def rgb(self) -> np.ndarray:
        """The pixels in RGB order (a view)."""
        return self.bgr[:, :, ::-1]


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


@dataclass(frozen=True)
class Orientation:
    """How a video's stored frames are turned to be shown upright: the 2×2 part of its display
    matrix, rounded to quarter turns and mirrors (``(x', y') = (a·x + c·y, b·x + d·y)``, FFmpeg's
    convention). ``Orientation()`` leaves frames as stored.

    Examples:
        ```python
        Orientation.of_matrix(0, 1, -1, 0).apply(rgb)  # a phone's "rotate 90": turned a quarter clockwise
        ```
    """

    a: int = 1
    b: int = 0
    c: int = 0
    d: int = 1

    @classmethod
    def of_matrix(cls, a: float, b: float, c: float, d: float) -> Orientation:
        """The orientation a display matrix's 2×2 part gives: exact for the quarter turns and mirrors
        phones and editors write; another angle is rounded to the nearest quarter turn."""
        scale = max(math.hypot(a, b), math.hypot(c, d))
        if not scale or not math.isfinite(scale):
            return cls()
        ra, rb, rc, rd = (round(v / scale) for v in (a, b, c, d))
        if (ra != 0) == (rd != 0) and (rb != 0) == (rc != 0) and (ra != 0) != (rb != 0):
            return cls(ra, rb, rc, rd)  # a quarter turn, mirrored or not
        quarter = round(math.atan2(b, a) / (math.pi / 2)) % 4
        cos, sin = ((1, 0), (0, 1), (-1, 0), (0, -1))[quarter]
        return cls(cos, sin, -sin, cos)

    @classmethod
    def clockwise(cls, degrees: float) -> Orientation:
        """The orientation an old-style ``rotate`` tag (clockwise degrees) asks for."""
        radians = math.radians(degrees)
        return cls.of_matrix(math.cos(radians), math.sin(radians), -math.sin(radians), math.cos(radians))

    @property
    def as_stored(self) -> bool:
        """Whether frames are shown as stored."""
        return (self.a, self.b, self.c, self.d) == (1, 0, 0, 1)

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """``(height, width, ...)`` pixels as shown (a view when nothing moves, else a copy)."""
        if self.as_stored:
            return pixels
        out = pixels
        if self.a == 0:  # x' follows y: the axes swap
            out = out.swapaxes(0, 1)
            if self.c < 0:
                out = out[:, ::-1]
            if self.b < 0:
                out = out[::-1]
        else:
            if self.a < 0:
                out = out[:, ::-1]
            if self.d < 0:
                out = out[::-1]
        return np.ascontiguousarray(out)


def orientation_of(frame: Any, stream: Any) -> Orientation:
    """A decoded frame's orientation: its display matrix (side data), else its stream's old-style
    ``rotate`` tag (clockwise degrees), else as stored."""
    for data in frame.side_data:
        if str(getattr(data, "type", "")).rsplit(".", 1)[-1].upper() == "DISPLAYMATRIX":
            raw = np.frombuffer(bytes(data), dtype="<i4")
            if raw.size >= 5:
                return Orientation.of_matrix(*(float(v) / 65536 for v in (raw[0], raw[1], raw[3], raw[4])))
    tags = {str(k).lower(): v for k, v in (stream.metadata or {}).items()}
    try:
        degrees = float(tags.get("rotate", 0))
    except ValueError:
        degrees = 0.0
    return Orientation.clockwise(degrees) if degrees % 360 else Orientation()


class _Ranks:
    """Each decoded frame's index: how many of the stream's packets present before it. The same frame
    gets the same index whichever frames are decoded (decoders output frames in presentation order,
    so every packet presented earlier has been read by then), on variable frame rates too."""

    def __init__(self) -> None:
        self._waiting: list[int] = []
        self._before = 0
        self.packets = 0

    def read(self, pts: int | None) -> None:
        self.packets += 1
        if pts is not None:
            heapq.heappush(self._waiting, pts)

    def index(self, pts: int | None, fallback: int) -> int:
        if pts is None:
            return fallback
        while self._waiting and self._waiting[0] < pts:
            heapq.heappop(self._waiting)
            self._before += 1
        return self._before


def iter_frames(path: str, sampling: VideoSampling) -> Iterator[Frame]:
    """The frames of a local video that ``sampling`` keeps, upright (display matrix or ``rotate``
    tag applied: see `Orientation`), in presentation order, as they decode.

    A frame's index is its rank in presentation order among the stream's packets (`_Ranks`): the
    same in every sampling mode. Frames no sampling instant can take are not reconstructed where the
    codec allows it (FFmpeg's ``skip_frame``: non-reference frames between instants; in
    ``"keyframes"`` every frame but the keyframes), and the decoder uses every core.

    Raises:
        VideoReadError: when the video cannot be opened (before any frame), or decoding fails
            part-way (after the frames read so far); with a reason for the video's failed row.
    """
    import av
    from av.video.reformatter import VideoReformatter

    container = _open(path)
    read = 0
    to_bgr = VideoReformatter()  # one conversion context for the video, not one per frame
    with container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        context = stream.codec_context
        keyframes = sampling.mode == "keyframes"
        context.skip_frame = "NONKEY" if keyframes else "DEFAULT"
        base = float(stream.time_base) if stream.time_base else 0.0
        rate = float(stream.average_rate or stream.guessed_rate or 30)
        start = stream.start_time * base if stream.start_time is not None else 0.0
        fps = FpsGate(None if keyframes else sampling.fps)
        scene = SceneGate(sampling.scene_threshold) if sampling.mode == "scene" else None
        ranks, position, orientation = _Ranks(), -1, None
        skipping = False
        try:
            for packet in container.demux(stream):
                pts = packet.pts if packet.pts is not None else packet.dts
                if packet.size:
                    ranks.read(pts)
                if not keyframes and fps.fps is not None and pts is not None and base:
                    # nothing before the next sampling instant is kept: its non-reference frames need no picture
                    early = pts * base - start < fps.upcoming
                    if early != skipping:
                        context.skip_frame, skipping = ("NONREF" if early else "DEFAULT"), early
                for frame in stream.decode(packet):
                    position += 1
                    time_s = (frame.time - start) if frame.time is not None else position / rate
                    index = ranks.index(frame.pts, position)
                    if not fps.keep(time_s):
                        continue
                    if scene is not None:
                        width, height = THUMBNAIL
                        thumbnail = frame.reformat(width=width, height=height, format="gray").to_ndarray()
                        if not scene.keep(thumbnail):
                            continue
                    if orientation is None:
                        orientation = orientation_of(frame, stream)
                    bgr = to_bgr.reformat(frame, format="bgr24").to_ndarray()
                    yield Frame(index, round(time_s, 6), orientation.apply(bgr))
                    read += 1
        except (av.FFmpegError, OSError, ValueError) as exc:
            raise VideoReadError(f"decoding stopped after frame {position}: {_reason(exc)}", read) from None
        announced = stream.frames  # 0 when the container does not say
    if read == 0:
        raise VideoReadError("no frame could be decoded")
    if announced and ranks.packets < announced * TRUNCATED_SHARE:
        raise VideoReadError(
            f"the video ends early: {ranks.packets} of the {announced} frames its header announces (truncated?)", read
        )


def _reason(exc: Exception) -> str:
    """An FFmpeg error's message, without the (possibly temporary) file name."""
    return str(getattr(exc, "strerror", None) or exc)
