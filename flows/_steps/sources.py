"""Where a flow's images come from: folders, globs, paths, https URLs, object stores, blocks.

Flows take image *references* (Prefect refuses flow parameters over 512 KiB) and the steps read
each batch where they run, so memory does not grow with the number of images. The sha256 of
each image's bytes is computed once, here, and keys every cache downstream.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING

from prefect_roboflow.blocks._resize import resize_workers
from prefect_roboflow.blocks.exceptions import InvalidInputError
from prefect_roboflow.blocks.images import validate_encoded_image, validate_url

from .._storage.access import local_size
from .._storage.access import read_bytes as storage_read_bytes
from .._storage.listing import count_refs, is_video, iter_refs
from .._video.frames import estimate_frames, frame_records
from .._video.sample import VideoSampling, check_sampling
from ..records import Failure, ImageRecord, register_expansion

if TYPE_CHECKING:
    import httpx

ImageSource = str | Sequence[str]
#: URLs of one batch downloaded at once; they come from other servers than the inference one.
DOWNLOAD_CONCURRENCY = 8
#: A batch's local files are read and hashed on the resize pool's number of threads when the first
#: `BIG_FILE_SAMPLE` of them average this much: hashing 512 KiB takes ~1 ms, a 30 KB file ~0.05 ms
#: (less than handing it to a thread).
BIG_FILE_BYTES = 512 * 2**10
BIG_FILE_SAMPLE = 8
#: A listed source's references stay in memory up to this many bytes, then go to a temporary file.
SPOOL_BYTES = 4 * 2**20


def _is_web(ref: str) -> bool:
    """An http(s) URL: downloaded here (not by the server), to know the image by its content."""
    return ref.split("://", 1)[0].lower() in ("http", "https") and "://" in ref


def iter_image_refs(images: ImageSource) -> Iterator[str]:
    """Image references in a stable order, lazily, from a folder (its image files, not recursive),
    a glob (``**`` recursive), a path, an https URL, an object-store prefix or glob
    (``s3://bucket/photos/``, ``s3://bucket/**/*.jpg``, any fsspec URL), a saved file-system block
    and a path (``block://s3-bucket/name/photos/``), or a list of those (see `_storage`).

    Raises:
        InvalidInputError: naming ``images``, when the source names nothing or cannot be listed.
    """
    return iter_refs(images)


def _read(ref: str, field: str, client: httpx.Client | None) -> bytes:
    """The bytes behind a reference: downloaded over https, or the storage read (`_storage`) of a
    file, object or block path."""
    if _is_web(ref):
        return _download(ref, client)
    return storage_read_bytes(ref, field=field)


def _download(url: str, client: httpx.Client | None) -> bytes:
    import httpx

    validate_url(url)
    if client is None:
        with _download_client() as own:
            return _download(url, own)
    try:
        response = client.get(url)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        raise InvalidInputError("image", f"download failed: {type(exc).__name__}: {exc}") from None
    return response.content


def read_bytes(ref: str, field: str = "image", client: httpx.Client | None = None) -> bytes:
    """The bytes of a path or https URL, checked to be a whole encoded image.

    URLs are downloaded here rather than by the server, so that an image is known by its
    content: the same picture at a new URL is not sent again, a changed one is.

    Raises:
        InvalidInputError: naming ``field``, with why the image cannot be used.
    """
    data = _read(ref, field, client)
    validate_encoded_image(data, field)
    return data


def load(record: ImageRecord, client: httpx.Client | None = None) -> ImageRecord:
    """The record with its bytes and sha256, or failed at ``"read"`` with the reason.

    Records already read, and failed ones, come back as they are. A record that knows its
    sha256 but not its bytes (it was pickled: see `ImageRecord`) is read again and must match it.
    """
    if record.loaded or not record.ok:
        return record
    try:
        data = _read(record.ref, "image", client)
    except InvalidInputError as error:
        return record.failed(Failure.of("read", error))
    sha256 = hashlib.sha256(data).hexdigest()
    if record.sha256 is not None and record.sha256 != sha256:  # read again where a step runs, and changed
        reason = "the image changed while the run was using it (its bytes no longer match the sha256 read first)"
        return record.failed(Failure("read", reason, "ImageChanged"))
    loaded = replace(record, data=data, sha256=sha256)
    try:
        validate_encoded_image(data)
    except InvalidInputError as error:
        return replace(loaded, data=None, failure=Failure.of("read", error))
    return loaded


def load_all(records: Sequence[ImageRecord]) -> list[ImageRecord]:
    """`load` for a batch, in order; its URLs and stored objects read concurrently (one pooled
    client for the downloads), and local files too when they are big (`BIG_FILE_BYTES`):
    reading and hashing 96 photos of 3.7 MB takes ~0.7 s on one thread, and both release the GIL."""
    if not any("://" in r.ref and not r.loaded for r in records):
        workers = min(resize_workers(), len(records))
        if workers > 1 and _big(records):
            with ThreadPoolExecutor(workers, "prefect-roboflow-read") as pool:
                return list(pool.map(load, records))
        return [load(record) for record in records]
    with _download_client() as client, ThreadPoolExecutor(DOWNLOAD_CONCURRENCY) as pool:
        return list(pool.map(lambda record: load(record, client), records))


def _big(records: Sequence[ImageRecord]) -> bool:
    """Whether the batch's unread local files are big: `BIG_FILE_BYTES` on average over the first
    `BIG_FILE_SAMPLE` of them (looked at with a stat each, nothing read)."""
    unread = (r for r in records if not r.loaded and r.ok)
    sizes = [local_size(r.ref) or 0 for r in itertools.islice(unread, BIG_FILE_SAMPLE)]
    return bool(sizes) and sum(sizes) >= BIG_FILE_BYTES * len(sizes)


def _download_client() -> httpx.Client:
    import httpx

    limits = httpx.Limits(max_connections=DOWNLOAD_CONCURRENCY)
    return httpx.Client(timeout=30.0, follow_redirects=True, limits=limits)


def iter_batches(images: ImageSource, batch_size: int) -> Iterator[list[str]]:
    """Image references in consecutive batches of ``batch_size``."""
    if batch_size < 1:
        raise InvalidInputError("batch_size", f"must be at least 1, got {batch_size}")
    batch: list[str] = []
    for ref in iter_image_refs(images):
        batch.append(ref)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def count_images(images: ImageSource) -> int:
    """How many images a source holds (references streamed and counted, nothing read)."""
    return count_refs(images)


def iter_records(images: ImageSource, video: VideoSampling | None = None) -> Iterator[ImageRecord]:
    """The source's records in order: a photo's not yet read, a video's sampled frames read as
    they decode (see `_video.frames`: a frame's ref names the video and frame), lazily."""
    return _records_of(iter_image_refs(images), video or VideoSampling())


def _records_of(refs: Iterable[str], sampling: VideoSampling) -> Iterator[ImageRecord]:
    for ref in refs:
        if is_video(ref):
            yield from frame_records(ref, sampling)
        else:
            yield ImageRecord(ref)


def expand_refs(refs: Iterable[str], video_fps: float | None, video_sample: str) -> Iterator[ImageRecord]:
    """References as records, a video's as its sampled frames (what `Batch.of` gives), the sampling
    checked first.

    Raises:
        InvalidInputError: naming ``video_fps`` or ``video_sample``.
    """
    return _records_of(refs, check_sampling(video_fps, video_sample))


register_expansion(expand_refs)


def iter_record_batches(
    images: ImageSource, batch_size: int, video: VideoSampling | None = None
) -> Iterator[list[ImageRecord]]:
    """`iter_records` in consecutive batches of ``batch_size`` (a video's frames fill batches like photos)."""
    if batch_size < 1:
        raise InvalidInputError("batch_size", f"must be at least 1, got {batch_size}")
    batch: list[ImageRecord] = []
    for record in iter_records(images, video):
        batch.append(record)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


class SourceListing:
    """A source's references listed once, in order, and counted: a run lists its source once (a
    bucket's LIST calls are paid once), and reads the references back as it makes its batches.

    The references go to a temporary file as they stream in (in memory up to `SPOOL_BYTES`, then on
    disk), so memory does not grow with the source. A local video is counted by its header's
    duration (see `count_records`); nothing is read or decoded.

    Attributes:
        expected: About how many records the source makes.
        videos: How many of its references are videos.

    Raises:
        InvalidInputError: naming ``images``, when the source names nothing or cannot be listed.
    """

    def __init__(self, images: ImageSource, video: VideoSampling | None = None) -> None:
        self.sampling = video or VideoSampling()
        self.expected = self.videos = 0
        self._spool = tempfile.SpooledTemporaryFile(SPOOL_BYTES, mode="w+", encoding="utf-8")  # noqa: SIM115 - `close`
        for ref in iter_image_refs(images):
            self._spool.write(json.dumps(ref) + "\n")  # one JSON string a line: any character in a name
            if is_video(ref):
                self.videos += 1
                self.expected += estimate_frames(ref, self.sampling)
            else:
                self.expected += 1

    def refs(self) -> Iterator[str]:
        """The references, in listing order (one pass at a time)."""
        self._spool.seek(0)
        for line in self._spool:
            yield json.loads(line)

    def records(self) -> Iterator[ImageRecord]:
        """The records, as `iter_records` makes them (a video's sampled frames decoded as they are taken)."""
        return _records_of(self.refs(), self.sampling)

    def close(self) -> None:
        """Remove the temporary file."""
        self._spool.close()


def count_records(images: ImageSource, video: VideoSampling | None = None) -> tuple[int, int]:
    """About how many records a source makes, and how many of its references are videos (a local
    video counted by its header's duration, a remote one as 1: nothing is downloaded or decoded)."""
    sampling = video or VideoSampling()
    records = videos = 0
    for ref in iter_image_refs(images):
        if is_video(ref):
            videos += 1
            records += estimate_frames(ref, sampling)
        else:
            records += 1
    return records, videos
