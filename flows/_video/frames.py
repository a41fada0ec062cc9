"""A video reference expanded into frame records: each sampled frame an `ImageRecord` whose ref
names the video and the frame (``clip.mp4#frame=120``), with its index and presentation time, its
bytes the frame as deterministic JPEG (same pixels, same bytes: a rerun's sha256 matches and every
cache hits), or one failed record with the reason the video cannot be read.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np

from prefect_roboflow.blocks.images import JPEG_QUALITY

from .._storage.listing import is_video
from ..records import Failure, ImageRecord
from .decode import VideoReadError, iter_frames, local_video, probe_frames
from .sample import VideoSampling

__all__ = ["encode_frame", "estimate_frames", "frame_records", "frame_ref", "is_video"]


def frame_ref(video_ref: str, index: int) -> str:
    """The reference of one frame of a video: ``clip.mp4#frame=120``."""
    return f"{video_ref}#frame={index}"


def encode_frame(bgr: np.ndarray) -> bytes:
    """A frame's BGR pixels as JPEG bytes (the library's `JPEG_QUALITY`, 4:2:0); the same pixels
    always give the same bytes. OpenCV's encoder: the bytes Pillow's gives (both are libjpeg-turbo
    with its defaults), without an RGB copy and an image object per frame.

    Raises:
        ValueError: when OpenCV cannot encode the array.
    """
    import cv2

    ok, encoded = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ValueError(f"cannot encode a {bgr.shape} frame as JPEG")
    return encoded.tobytes()


def frame_records(video_ref: str, sampling: VideoSampling) -> Iterator[ImageRecord]:
    """The sampled frames of one video as read records, lazily; a video that cannot be read ends
    in one failed record (ref: the video, or the frame after the last one read) with its reason."""
    last = -1
    try:
        with local_video(video_ref) as path:
            for frame in iter_frames(path, sampling):
                data = encode_frame(frame.bgr)
                last = frame.index
                yield ImageRecord(
                    frame_ref(video_ref, frame.index),
                    hashlib.sha256(data).hexdigest(),
                    data,
                    frame_index=frame.index,
                    frame_time_s=frame.time_s,
                )
    except VideoReadError as error:
        ref = video_ref if error.frames_read == 0 else frame_ref(video_ref, last + 1)
        yield ImageRecord(ref, failure=Failure("read", error.reason, type(error).__name__))


def estimate_frames(ref: str, sampling: VideoSampling) -> int:
    """About how many records `frame_records` makes of ``ref`` (header only, local files); 1 for a remote one."""
    if "://" in ref and not ref.startswith("file://"):
        return 1
    try:
        with local_video(ref) as path:
            return probe_frames(path, sampling)
    except VideoReadError:
        return 1
