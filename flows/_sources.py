"""Where a flow's images come from: a folder, a glob, or a list of paths and https URLs.

Flows take image *references* (Prefect refuses flow parameters over 512 KiB) and the steps read
each batch where they run, so memory does not grow with the number of images. The sha256 of
each image's bytes is computed once, here, and keys every cache downstream.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from prefect_roboflow.blocks.exceptions import InvalidInputError
from prefect_roboflow.blocks.images import read_image_bytes, validate_encoded_image, validate_url

from .records import Failure, ImageRecord

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

if TYPE_CHECKING:
    import httpx

ImageSource = str | Sequence[str]
#: URLs of one batch downloaded at once; they come from other servers than the inference one.
DOWNLOAD_CONCURRENCY = 8


def _is_url(ref: str) -> bool:
    return "://" in ref


def iter_image_refs(images: ImageSource) -> Iterator[str]:
    """Expand a folder (its image files, sorted, not recursive), a glob, a single path or URL,
    or a list of paths and URLs, into image references in a stable order.

    Raises:
        InvalidInputError: the source names nothing (empty list, empty folder, no glob match).
    """
    refs = [images] if isinstance(images, str) else list(images)
    if not refs:
        raise InvalidInputError("images", "no images given")
    found = False
    for ref in refs:
        if not isinstance(ref, str):
            raise InvalidInputError("images", f"expected paths or URLs as strings, got {type(ref).__name__}")
        if _is_url(ref):
            found = True
            yield ref
        elif os.path.isdir(ref):
            for path in sorted(Path(ref).iterdir()):
                if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                    found = True
                    yield str(path)
        elif glob.has_magic(ref):
            for match in sorted(glob.glob(ref, recursive=True)):
                if os.path.isfile(match):
                    found = True
                    yield match
        else:
            found = True
            yield ref  # a missing file becomes a failed row, not a crash
    if not found:
        raise InvalidInputError("images", f"no image files found in {images!r}")


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
    data = _download(ref, client) if _is_url(ref) else read_image_bytes(ref, field)
    validate_encoded_image(data, field)
    return data


def load(record: ImageRecord, client: httpx.Client | None = None) -> ImageRecord:
    """The record with its bytes and sha256, or failed at ``"read"`` with the reason.

    Records already read, and failed ones, come back as they are.
    """
    if record.loaded or not record.ok:
        return record
    try:
        data = _download(record.ref, client) if _is_url(record.ref) else read_image_bytes(record.ref)
    except InvalidInputError as error:
        return record.failed(Failure.of("read", error))
    loaded = replace(record, data=data, sha256=hashlib.sha256(data).hexdigest())
    try:
        validate_encoded_image(data)
    except InvalidInputError as error:
        return replace(loaded, data=None, failure=Failure.of("read", error))
    return loaded


def load_all(records: Sequence[ImageRecord]) -> list[ImageRecord]:
    """`load` for a batch, in order; its URLs downloaded concurrently over one pooled client."""
    if not any(_is_url(r.ref) and not r.loaded for r in records):
        return [load(record) for record in records]
    with _download_client() as client, ThreadPoolExecutor(DOWNLOAD_CONCURRENCY) as pool:
        return list(pool.map(lambda record: load(record, client), records))


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
    """How many images a source holds (cheap: references only, nothing is read)."""
    return sum(1 for _ in iter_image_refs(images))
