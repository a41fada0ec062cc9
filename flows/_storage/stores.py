"""Storage systems, one class each, addressed by paths relative to a base.

A `Store` reads, writes, lists and deletes files of one storage system (a local folder, an S3
bucket, an fsspec file system, a Prefect file-system block) and explains its failures for a user
without secrets; `locate` picks the store that holds a reference. Writes are whole or nothing:
a local file is renamed into place once complete and fsynced (`atomic`), S3 takes one PUT or a
completed multipart upload, other file systems publish an object on close. Reads are whole
(`read`) or streamed into a file (`download`), so a large object never sits in memory.

Examples:
    ```python
    store = LocalStore(base="/data/")
    store.write("out/a.txt", b"hi")  # /data/out/a.txt appears whole
    list(store.list("out/", recursive=False, page_size=1000))  # ['out/a.txt']
    ```
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import os
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from prefect_roboflow.blocks.exceptions import InvalidInputError

from .atomic import LocalReplace

__all__ = [
    "LIST_PAGE_SIZE",
    "LOCK_SUFFIX",
    "BlockStore",
    "FsspecStore",
    "LocalStore",
    "S3Store",
    "Store",
    "output_error",
    "s3_code",
]


#: Keys per S3 listing request (the S3 maximum).
LIST_PAGE_SIZE = 1000
#: `LocalStore.write_if` locks ``.<name>`` + this beside the file; never delete one (a writer
#: may hold it).
LOCK_SUFFIX = ".lock"


class Store:
    """A storage system. ``rel`` paths are '/'-separated; a folder's ends with '/' ('' is the root)."""

    def __init__(self, ref_base: str) -> None:
        self.ref_base = ref_base

    def ref(self, rel: str) -> str:
        return self.ref_base + rel

    def list(self, folder: str, recursive: bool, page_size: int) -> Iterator[str]:
        raise NotImplementedError(f"{self.ref_base} cannot list files: name the files")

    def kind(self, rel: str) -> str:
        """``"file"``, ``"dir"`` or ``"missing"``."""
        return "file"

    def entries(self, folder: str) -> Sequence[str]:
        """The names directly in a folder, files and sub-folders (these end with '/'); none for a
        missing folder."""
        try:
            return [path[len(folder) :] for path in self.list(folder, recursive=False, page_size=LIST_PAGE_SIZE)]
        except FileNotFoundError:
            return []

    def read(self, rel: str) -> bytes:
        raise NotImplementedError

    def write(self, rel: str, data: bytes) -> None:
        raise NotImplementedError

    def download(self, rel: str, file: IO[bytes]) -> None:
        """Stream a file into ``file`` (raises `FileNotFoundError` for a missing one)."""
        file.write(self.read(rel))

    def upload(self, rel: str, file: IO[bytes]) -> None:
        self.write(rel, file.read())

    def makedirs(self, folder: str) -> None:
        """Make a folder where the storage has folders (object stores have none: nothing to do)."""

    def delete(self, rel: str) -> None:
        """Remove a file; a missing one is no error."""
        raise NotImplementedError(f"{self.ref_base} cannot delete files")

    def read_tagged(self, rel: str) -> tuple[bytes, str]:
        """A file's bytes and a tag naming this version of it, for `write_if` (raises
        `FileNotFoundError` for a missing one). Here: the bytes' sha256."""
        data = self.read(rel)
        return data, hashlib.sha256(data).hexdigest()

    def write_if(self, rel: str, data: bytes, tag: str | None) -> bool:
        """Write a file only if it is still the version ``tag`` names (`read_tagged`), or, for a
        ``tag`` of None, only if there is none: False, writing nothing, when another writer got
        there first. Here: checked and written under a lock of this process (an fsspec file system
        has no conditional write; writers in other processes are not excluded)."""
        with _process_lock(self.ref(rel)):
            return self._write_if_current(rel, data, tag)

    def _write_if_current(self, rel: str, data: bytes, tag: str | None) -> bool:
        """`write_if`'s check and write, for a caller holding the lock that makes them one step."""
        try:
            current: str | None = self.read_tagged(rel)[1]
        except FileNotFoundError:
            current = None
        if current != tag:
            return False
        self.write(rel, data)
        return True

    def modified(self, folder: str) -> dict[str, float]:
        """The files directly in a folder, by name, with when each was last written (seconds
        since the epoch); a file whose time the storage does not say is left out."""
        return {}

    def explain(self, exc: BaseException) -> str | None:
        """Why an operation failed, for a user (no secrets); None for errors that are bugs."""
        if isinstance(exc, NotImplementedError | OSError):
            return str(exc) if isinstance(exc, NotImplementedError) else f"{type(exc).__name__}: {exc}"
        return None


def _walk(entries: Callable[[str], Iterable[tuple[str, bool]]], folder: str, recursive: bool) -> Iterator[str]:
    """Files under ``folder`` in full-path order, one directory listed at a time."""
    for path, is_dir in sorted(entries(folder), key=lambda entry: entry[0] + "/" * entry[1]):
        if not is_dir:
            yield path
        elif recursive:
            yield from _walk(entries, path + "/", recursive)


_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _process_lock(key: str) -> threading.Lock:
    """One lock per file in this process."""
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(key, threading.Lock())


#: Where fsspec file systems put a file's modification time in its ``info``.
_TIME_KEYS = ("mtime", "LastModified", "last_modified", "updated", "created")


def _epoch(value: Any) -> float | None:
    """A file system's modification time as seconds since the epoch (None when it gives none)."""
    if isinstance(value, datetime.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=datetime.timezone.utc)).timestamp()
    if isinstance(value, int | float):
        return float(value)
    return None


class _WalkedStore(Store):
    """A store listed one directory at a time (`_entries`): a local folder, an fsspec file system."""

    def _entries(self, folder: str) -> Iterator[tuple[str, bool]]:
        raise NotImplementedError

    def list(self, folder: str, recursive: bool, page_size: int) -> Iterator[str]:
        return _walk(self._entries, folder, recursive)

    def entries(self, folder: str) -> Sequence[str]:
        try:
            return sorted(path[len(folder) :] + "/" * is_dir for path, is_dir in self._entries(folder))
        except FileNotFoundError:
            return []


class LocalStore(_WalkedStore):
    def __init__(self, ref_base: str = "", base: str = "") -> None:
        super().__init__(ref_base)
        self.base = base

    def _entries(self, folder: str) -> Iterator[tuple[str, bool]]:
        with os.scandir(self.base + folder or ".") as scan:
            for entry in scan:
                yield folder + entry.name, entry.is_dir()

    def kind(self, rel: str) -> str:
        path = self.base + rel
        return "dir" if os.path.isdir(path) else "file" if os.path.exists(path) else "missing"

    def read(self, rel: str) -> bytes:
        return Path(self.base + rel).read_bytes()

    def write(self, rel: str, data: bytes) -> None:
        with LocalReplace(Path(self.base + rel)) as (file, _):
            file.write(data)

    def download(self, rel: str, file: IO[bytes]) -> None:
        with open(self.base + rel, "rb") as source:
            shutil.copyfileobj(source, file)

    def upload(self, rel: str, file: IO[bytes]) -> None:
        with LocalReplace(Path(self.base + rel)) as (out, _):
            shutil.copyfileobj(file, out)

    def makedirs(self, folder: str) -> None:
        Path(self.base + folder).mkdir(parents=True, exist_ok=True)

    def delete(self, rel: str) -> None:
        Path(self.base + rel).unlink(missing_ok=True)

    def write_if(self, rel: str, data: bytes, tag: str | None) -> bool:
        """`Store.write_if` across processes and threads: checked and replaced under an exclusive
        ``flock`` of ``.<name>.lock`` beside the file, which the kernel releases when its holder
        dies (a killed writer cannot keep it). Readers take no lock: the rename is atomic."""
        path = Path(self.base + rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / f".{path.name}{LOCK_SUFFIX}", "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released on close, or when the process dies
            return self._write_if_current(rel, data, tag)

    def modified(self, folder: str) -> dict[str, float]:
        times = {}
        with contextlib.suppress(FileNotFoundError), os.scandir(self.base + folder or ".") as scan:
            for entry in scan:
                with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                    if entry.is_file(follow_symlinks=False):
                        times[entry.name] = entry.stat(follow_symlinks=False).st_mtime
        return times


class S3Store(Store):
    def __init__(self, client: Any, bucket: str, ref_base: str, base: str = "") -> None:
        super().__init__(ref_base)
        self.client, self.bucket, self.base = client, bucket, base

    def list(self, folder: str, recursive: bool, page_size: int) -> Iterator[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket,
            Prefix=self.base + folder,
            Delimiter="" if recursive else "/",
            PaginationConfig={"PageSize": page_size},
        )
        for page in pages:  # each page is requested only when the previous one is used up
            for item in page.get("Contents", ()):
                if not item["Key"].endswith("/"):
                    yield item["Key"][len(self.base) :]

    def entries(self, folder: str) -> Sequence[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.base + folder, Delimiter="/"
        )
        start = len(self.base + folder)
        names = []
        for page in pages:
            names += [item["Key"][start:] for item in page.get("Contents", ()) if item["Key"][start:]]
            names += [item["Prefix"][start:] for item in page.get("CommonPrefixes", ())]
        return sorted(names)

    def kind(self, rel: str) -> str:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.base + rel)
            return "file"
        except ClientError as exc:
            if s3_code(exc) not in {"404", "NoSuchKey", "NotFound"}:
                raise
        page = self.client.list_objects_v2(Bucket=self.bucket, Prefix=f"{self.base}{rel}/", MaxKeys=1)
        return "dir" if page.get("KeyCount", 0) else "missing"

    def read(self, rel: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.base + rel)["Body"].read()
        except ClientError as exc:
            if s3_code(exc) in {"404", "NoSuchKey"}:
                raise FileNotFoundError(self.ref(rel)) from None
            raise

    def download(self, rel: str, file: IO[bytes]) -> None:
        from botocore.exceptions import ClientError

        try:  # ranged GETs, several at once, streamed into the file
            self.client.download_fileobj(self.bucket, self.base + rel, file)
        except ClientError as exc:
            if s3_code(exc) in {"404", "NoSuchKey"}:
                raise FileNotFoundError(self.ref(rel)) from None
            raise

    def write(self, rel: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.base + rel, Body=data)  # one PUT: atomic

    def upload(self, rel: str, file: IO[bytes]) -> None:
        # A single PUT, or a multipart upload that readers see only once it is completed (and that
        # boto3 aborts when a part fails).
        self.client.upload_fileobj(file, self.bucket, self.base + rel)

    def delete(self, rel: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.base + rel)

    def read_tagged(self, rel: str) -> tuple[bytes, str]:
        """The object and its ETag."""
        from botocore.exceptions import ClientError

        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self.base + rel)
        except ClientError as exc:
            if s3_code(exc) in {"404", "NoSuchKey"}:
                raise FileNotFoundError(self.ref(rel)) from None
            raise
        return answer["Body"].read(), str(answer["ETag"])

    def write_if(self, rel: str, data: bytes, tag: str | None) -> bool:
        """`Store.write_if` as S3 does it: one PUT with ``If-Match: <ETag>`` (``If-None-Match: *``
        for a new object), refused by the server when the object changed meanwhile (412), or
        while another conditional write to it is under way (409). No lock is held, so none is
        left behind by a writer that dies."""
        from botocore.exceptions import ClientError

        condition = {"IfNoneMatch": "*"} if tag is None else {"IfMatch": tag}
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.base + rel, Body=data, **condition)
        except ClientError as exc:
            if s3_code(exc) in {"PreconditionFailed", "412", "ConditionalRequestConflict", "409", "NoSuchKey"}:
                return False
            raise
        return True

    def modified(self, folder: str) -> dict[str, float]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.base + folder, Delimiter="/"
        )
        start = len(self.base + folder)
        return {
            item["Key"][start:]: item["LastModified"].timestamp()
            for page in pages
            for item in page.get("Contents", ())
            if item["Key"][start:]
        }

    def explain(self, exc: BaseException) -> str | None:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return (
                "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), "
                "or give an AwsCredentials or S3Bucket block"
            )
        if isinstance(exc, ClientError):
            return _S3_REASONS.get(s3_code(exc), "S3 answered {code}").format(bucket=self.bucket, code=s3_code(exc))
        if isinstance(exc, BotoCoreError):
            return f"S3 request failed: {type(exc).__name__}: {exc}"
        return super().explain(exc)


_S3_REASONS = {
    "NoSuchBucket": "bucket {bucket!r} does not exist",
    "AccessDenied": "access denied to bucket {bucket!r}",
    "403": "access denied to bucket {bucket!r}",
    "AllAccessDisabled": "access denied to bucket {bucket!r}",
    "InvalidAccessKeyId": "the storage rejected the credentials ({code})",
    "SignatureDoesNotMatch": "the storage rejected the credentials ({code})",
    "ExpiredToken": "the storage rejected the credentials ({code})",
    "InvalidBucketName": "{bucket!r} is not a valid bucket name",
}


def s3_code(exc: Any) -> str:
    response = getattr(exc, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


class FsspecStore(_WalkedStore):
    def __init__(self, fs: Any, ref_base: str, base: str = "") -> None:
        super().__init__(ref_base)
        self.fs, self.base = fs, base

    def _entries(self, folder: str) -> Iterator[tuple[str, bool]]:
        for info in self.fs.ls((self.base + folder).rstrip("/") or "/", detail=True):
            name = info["name"].rstrip("/")
            yield name[len(self.base) :], info["type"] == "directory"

    def kind(self, rel: str) -> str:
        path = self.base + rel
        return "dir" if self.fs.isdir(path) else "file" if self.fs.isfile(path) else "missing"

    def read(self, rel: str) -> bytes:
        return bytes(self.fs.cat_file(self.base + rel))

    def download(self, rel: str, file: IO[bytes]) -> None:
        with self.fs.open(self.base + rel, "rb") as source:
            shutil.copyfileobj(source, file)

    def write(self, rel: str, data: bytes) -> None:
        self.fs.pipe_file(self.base + rel, data)

    def makedirs(self, folder: str) -> None:
        self.fs.makedirs((self.base + folder).rstrip("/") or "/", exist_ok=True)

    def upload(self, rel: str, file: IO[bytes]) -> None:
        with self.fs.open(self.base + rel, "wb") as out:  # object stores publish the object on close
            shutil.copyfileobj(file, out)

    def delete(self, rel: str) -> None:
        if self.fs.exists(self.base + rel):
            self.fs.rm_file(self.base + rel)

    def modified(self, folder: str) -> dict[str, float]:
        times = {}
        with contextlib.suppress(FileNotFoundError):
            for info in self.fs.ls((self.base + folder).rstrip("/") or "/", detail=True):
                if info["type"] != "directory":
                    when = next((info[k] for k in _TIME_KEYS if k in info), None)
                    if (seconds := _epoch(when)) is not None:
                        times[info["name"].rstrip("/").rsplit("/", 1)[-1]] = seconds
        return times


class BlockStore(Store):
    """Any other Prefect file-system block: read and write through it; it cannot list."""

    def __init__(self, block: Any, ref_base: str) -> None:
        super().__init__(ref_base)
        self.block = block

    def read(self, rel: str) -> bytes:
        return bytes(_resolved(self.block.read_path(rel)))

    def write(self, rel: str, data: bytes) -> None:
        _resolved(self.block.write_path(rel, data))


def _resolved(value: Any) -> Any:
    import inspect

    if inspect.iscoroutine(value):
        from prefect.utilities.asyncutils import run_coro_as_sync

        return run_coro_as_sync(value)
    return value


def output_error(store: Store, url: str, field: str, exc: Exception) -> InvalidInputError | None:
    """The error naming ``field`` for a failed write to ``url``; None for errors that are bugs."""
    reason = store.explain(exc)
    return None if reason is None else InvalidInputError(field, f"cannot write {url}: {reason}")
