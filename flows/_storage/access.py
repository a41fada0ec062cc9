"""Reading, writing, listing and deleting one reference: each whole or not at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect_roboflow.blocks.exceptions import InvalidImageError, InvalidInputError

from .atomic import atomic_write_bytes
from .locate import WEB_SCHEMES, locate, split_url
from .stores import LIST_PAGE_SIZE, LocalStore, S3Store, Store, output_error, s3_code

if TYPE_CHECKING:
    pass

__all__ = [
    "atomic_write_bytes",
    "check_output",
    "delete",
    "is_remote",
    "join",
    "list_files",
    "local_copy",
    "local_size",
    "read_at",
    "read_bytes",
    "write_bytes",
]


def read_bytes(ref: str, *, credentials: Any = None, field: str = "image") -> bytes:
    """The bytes of one reference, read in the calling process with its own client.

    Raises:
        InvalidImageError: the object is missing (e.g. deleted after listing) or cannot be read;
            its ``reason`` is meant for the image's failed row.

    Examples:
        ```python
        read_bytes("s3://photos/2024/a.jpg")[:3]  # b'\\xff\\xd8\\xff'
        ```
    """
    if split_url(ref)[0] in WEB_SCHEMES:
        raise ValueError(f"{ref} is downloaded over HTTP, not read from storage")
    store, rel = locate(ref, field, credentials)
    return read_at(store, rel, field=field)


def read_at(store: Store, rel: str, *, field: str) -> bytes:
    """`read_bytes` of a file of a store already located (the one storage read: same errors)."""
    ref = store.ref(rel)
    try:
        return store.read(rel)
    except FileNotFoundError:
        raise InvalidImageError(field, f"not found: {ref}") from None
    except Exception as exc:
        reason = store.explain(exc)
        if reason is None:
            raise
        raise InvalidImageError(field, f"cannot read {ref}: {reason}") from None


@contextlib.contextmanager
def local_copy(ref: str | os.PathLike[str], *, credentials: Any = None, field: str = "image") -> Iterator[Path]:
    """A local file holding the bytes of ``ref``: the file itself for a local path, else the object
    streamed into a temp file (never whole in memory) that is removed on leaving the block.

    Raises:
        InvalidInputError: naming ``field``, when the object is missing or cannot be read.
    """
    ref = os.fspath(ref)
    store, rel = locate(ref, field, credentials)
    if isinstance(store, LocalStore):
        yield Path(store.base + rel)
        return
    with tempfile.TemporaryDirectory(prefix="prefect-roboflow-") as folder:
        path = Path(folder) / (rel.rsplit("/", 1)[-1] or "object")
        try:
            with path.open("wb") as file:
                store.download(rel, file)
        except FileNotFoundError:
            raise InvalidInputError(field, f"not found: {ref}") from None
        except Exception as exc:
            reason = store.explain(exc)
            if reason is None:
                raise
            raise InvalidInputError(field, f"cannot read {ref}: {reason}") from None
        yield path


def is_remote(location: str | os.PathLike[str]) -> bool:
    """Whether an output location is an object store or block (else a local folder)."""
    scheme = split_url(os.fspath(location))[0]
    return bool(scheme) and scheme != "file"


def local_size(ref: str) -> int | None:
    """The size in bytes of a local file (a path or ``file://`` reference), without reading it; None
    for a remote reference or a file that cannot be looked at (its read will say why)."""
    scheme, _ = split_url(ref)
    if scheme not in ("", "file"):
        return None
    try:
        store, rel = locate(ref, "image")
        return os.stat(store.base + rel).st_size if isinstance(store, LocalStore) else None
    except (InvalidInputError, OSError):
        return None


def join(location: str | os.PathLike[str], name: str) -> str:
    """``name`` inside the folder or prefix ``location``."""
    location = os.fspath(location)
    return f"{location.rstrip('/')}/{name}" if location else name


def write_bytes(url: str, data: bytes, *, credentials: Any = None, field: str = "out_dir") -> None:
    """Write one whole object or file: readers see the old one or the new one, never a part."""
    store, rel = locate(url, field, credentials)
    try:
        store.write(rel, data)
    except Exception as exc:
        error = output_error(store, url, field, exc)
        if error is None:
            raise
        raise error from None


def list_files(location: str | os.PathLike[str], *, field: str = "out_dir") -> Iterator[str]:
    """The files directly in a folder or prefix, as full references, in name order (lazily)."""
    folder = os.fspath(location).rstrip("/") + "/"
    store, rel = locate(folder, field)
    if store.kind(rel.rstrip("/")) == "missing" and not isinstance(store, S3Store):
        return
    for path in store.list(rel, recursive=False, page_size=LIST_PAGE_SIZE):
        yield store.ref(path)


def delete(url: str, *, field: str = "out_dir") -> None:
    """Remove one file or object; a missing one is no error."""
    store, rel = locate(url, field)
    store.delete(rel)


def check_output(location: str | os.PathLike[str], *, credentials: Any = None, field: str = "out_dir") -> None:
    """Fail early, naming ``field``, when outputs cannot go to ``location`` (e.g. no such bucket).

    Local folders are created; S3 buckets are checked with one HEAD request.
    """
    location = os.fspath(location)
    store, rel = locate(location, field, credentials)
    try:
        if isinstance(store, S3Store):
            store.client.head_bucket(Bucket=store.bucket)
        elif isinstance(store, LocalStore):
            Path(store.base + rel).mkdir(parents=True, exist_ok=True)
    except Exception as exc:
        if isinstance(store, S3Store) and s3_code(exc) in {"404", "NoSuchBucket"}:  # HEAD has no error code
            raise InvalidInputError(field, f"bucket {store.bucket!r} does not exist") from None
        error = output_error(store, location, field, exc)
        if error is None:
            raise
        raise error from None


def upload_file(url: str, path: str | os.PathLike[str], *, credentials: Any = None, field: str = "out_dir") -> None:
    """Publish a finished local file as one whole file or object (streamed, not read into memory)."""
    store, rel = locate(url, field, credentials)
    try:
        with open(path, "rb") as file:
            store.upload(rel, file)
    except Exception as exc:
        error = output_error(store, url, field, exc)
        if error is None:
            raise
        raise error from None
