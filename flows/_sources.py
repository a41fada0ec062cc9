"""Where a flow's images come from: a folder, a glob, or a list of paths and https URLs.

Flows take image *references* (Prefect refuses flow parameters over 512 KiB) and read each
batch only when it is processed, so memory does not grow with the number of images. The
sha256 of each image's bytes is computed once, here, and keys every cache downstream.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from prefect_roboflow.blocks.exceptions import InvalidInputError
from prefect_roboflow.blocks.images import read_image_bytes, validate_encoded_image, validate_url

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

if TYPE_CHECKING:
    import httpx

ImageSource = str | Sequence[str]
#: URLs of one batch downloaded at once; they come from other servers than the inference one.
DOWNLOAD_CONCURRENCY = 8


@dataclass(frozen=True)
class ImageItem:
    """One input image, read: its reference, content hash, and bytes (or URL), or why not.

    Attributes:
        ref: The path or URL as the user gave it (after folder/glob expansion).
        sha256: Hex digest of the image bytes (for a URL, of the bytes it served).
        data: The encoded bytes; None when the image could not be read.
        error: Why the image cannot be processed, or None.
    """

    ref: str
    sha256: str | None
    data: bytes | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the image can be sent."""
        return self.error is None

    @property
    def content(self) -> tuple[str, bytes]:
        """``(sha256, bytes)`` of a readable image, as the batch tasks take it."""
        if self.sha256 is None or self.data is None:
            raise ValueError(f"{self.ref} is not readable: {self.error}")
        return self.sha256, self.data


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


def read_item(ref: str, client: httpx.Client | None = None) -> ImageItem:
    """Read one image reference, catching every way it can be unusable.

    URLs are downloaded here rather than by the server, so that an image is known by its
    content: the same picture at a new URL is not sent again, a changed one is.
    """
    try:
        data = _download(ref, client) if _is_url(ref) else read_image_bytes(ref)
        digest = hashlib.sha256(data).hexdigest()
        try:
            validate_encoded_image(data)
        except InvalidInputError as error:
            return ImageItem(ref, digest, None, error.reason)
        return ImageItem(ref, digest, data)
    except InvalidInputError as error:
        return ImageItem(ref, None, None, error.reason)


def read_items(refs: Sequence[str]) -> list[ImageItem]:
    """`read_item` for a batch, in order; its URLs downloaded concurrently over one pooled client."""
    if not any(_is_url(ref) for ref in refs):
        return [read_item(ref) for ref in refs]
    with _download_client() as client, ThreadPoolExecutor(DOWNLOAD_CONCURRENCY) as pool:
        return list(pool.map(lambda ref: read_item(ref, client), refs))


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
