"""Where images are read from and outputs written to: local folders, object stores, Prefect blocks.

A *source* names images; a *reference* (``ref``) names one image. References are plain strings
that never hold a credential, so they pickle to any task process, which re-creates its own
storage client from configuration and reads the bytes itself.

Sources, and the references they expand to:

- a local path, folder (its image files, not recursive) or glob (``**`` recursive):
  ``photos/``, ``photos/**/*.jpg`` → ``photos/a.jpg``; ``file:///data/photos/`` → ``file:///data/photos/a.jpg``
- an S3 URL: ``s3://bucket/prefix/`` (the images directly under the prefix), ``s3://bucket/photos/**/*.jpg``,
  ``s3://bucket/key.jpg`` → ``s3://bucket/photos/a.jpg``. Credentials and endpoint come from the
  standard AWS configuration (``AWS_ACCESS_KEY_ID``…, ``AWS_PROFILE``, ``~/.aws``, ``AWS_ENDPOINT_URL``
  for S3-compatible servers) or from a prefect-aws ``AwsCredentials``/``MinIOCredentials`` block
  passed as ``credentials``. Listing streams pages of ``list_objects_v2`` (s3fs's ``find``/``ls``
  collect and sort a whole listing first, so they are not used).
- any other URL whose scheme fsspec knows (``gs://``, ``az://``, ``memory://``…), configured the
  way that fsspec backend is; listed one directory at a time.
- a saved Prefect file-system block plus a path: ``block://<block-type-slug>/<block-name>/<path>``,
  e.g. ``block://s3-bucket/my-photos/2024/`` (an ``S3Bucket``, paths relative to its
  ``bucket_folder``), ``block://remote-file-system/name/...``, ``block://local-file-system/name/...``;
  `block_source` builds it from a block object. Task processes load the block by name.

In a list of sources, an element is expanded when it ends with ``/`` or holds a wildcard (or is a
local folder) and is otherwise taken as one object without a request, so a vanished one becomes a
failed row; a single source string is checked (a missing object or bucket is an error). ``http(s)://``
references pass through unchanged (downloaded elsewhere). Order is stable: full-path
(key) order, as S3 lists. Outputs (`write_bytes`, `AtomicParquetWriter`) appear whole or not at
all: a local temp file renamed into place (mode from the umask), one S3 PUT or completed multipart
upload, one object upload elsewhere.

Examples:
    ```python
    refs = iter_refs("s3://photos/2024/**/*.jpg")  # lazy: one page of keys at a time
    data = read_bytes(next(refs))  # in the task process
    write_bytes(join("s3://results/run-1/", "a.jpg"), data)
    ```
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, TypeVar

from prefect_roboflow.blocks.exceptions import InvalidImageError, InvalidInputError

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = [
    "BLOCK_SCHEME",
    "IMAGE_SUFFIXES",
    "LIST_PAGE_SIZE",
    "AtomicParquetWriter",
    "block_source",
    "check_output",
    "count_refs",
    "is_remote",
    "iter_refs",
    "join",
    "read_bytes",
    "write_bytes",
]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
#: Keys per S3 listing request (the S3 maximum).
LIST_PAGE_SIZE = 1000
BLOCK_SCHEME = "block"
_PASSTHROUGH = frozenset({"http", "https"})
_MAGIC = re.compile(r"[*?\[]")
_SLUG = re.compile(r"[a-z0-9-]+")


# --- stores: one storage system each, addressed by paths relative to a base -------------------


class _Store:
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

    def read(self, rel: str) -> bytes:
        raise NotImplementedError

    def write(self, rel: str, data: bytes) -> None:
        raise NotImplementedError

    def upload(self, rel: str, file: IO[bytes]) -> None:
        self.write(rel, file.read())

    def delete(self, rel: str) -> None:
        raise NotImplementedError(f"{self.ref_base} cannot delete files")

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


class _LocalStore(_Store):
    def __init__(self, ref_base: str = "", base: str = "") -> None:
        super().__init__(ref_base)
        self.base = base

    def _entries(self, folder: str) -> Iterator[tuple[str, bool]]:
        with os.scandir(self.base + folder or ".") as scan:
            for entry in scan:
                yield folder + entry.name, entry.is_dir()

    def list(self, folder: str, recursive: bool, page_size: int) -> Iterator[str]:
        return _walk(self._entries, folder, recursive)

    def kind(self, rel: str) -> str:
        path = self.base + rel
        return "dir" if os.path.isdir(path) else "file" if os.path.exists(path) else "missing"

    def read(self, rel: str) -> bytes:
        return Path(self.base + rel).read_bytes()

    def write(self, rel: str, data: bytes) -> None:
        with _LocalReplace(Path(self.base + rel)) as (file, _):
            file.write(data)

    def upload(self, rel: str, file: IO[bytes]) -> None:
        with _LocalReplace(Path(self.base + rel)) as (out, _):
            shutil.copyfileobj(file, out)

    def delete(self, rel: str) -> None:
        Path(self.base + rel).unlink(missing_ok=True)


class _LocalReplace:
    """A new file beside ``path``, created with the umask's mode, renamed onto ``path`` on success."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        self.file = os.fdopen(os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb")

    def __enter__(self) -> tuple[IO[bytes], Path]:
        return self.file, self.tmp

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self.file.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


class _S3Store(_Store):
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

    def kind(self, rel: str) -> str:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.base + rel)
            return "file"
        except ClientError as exc:
            if _s3_code(exc) not in {"404", "NoSuchKey", "NotFound"}:
                raise
        page = self.client.list_objects_v2(Bucket=self.bucket, Prefix=f"{self.base}{rel}/", MaxKeys=1)
        return "dir" if page.get("KeyCount", 0) else "missing"

    def read(self, rel: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.base + rel)["Body"].read()
        except ClientError as exc:
            if _s3_code(exc) in {"404", "NoSuchKey"}:
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

    def explain(self, exc: BaseException) -> str | None:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return (
                "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), "
                "or give an AwsCredentials or S3Bucket block"
            )
        if isinstance(exc, ClientError):
            return _S3_REASONS.get(_s3_code(exc), "S3 answered {code}").format(bucket=self.bucket, code=_s3_code(exc))
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


def _s3_code(exc: Any) -> str:
    response = getattr(exc, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


class _FsspecStore(_Store):
    def __init__(self, fs: Any, ref_base: str, base: str = "") -> None:
        super().__init__(ref_base)
        self.fs, self.base = fs, base

    def _entries(self, folder: str) -> Iterator[tuple[str, bool]]:
        for info in self.fs.ls((self.base + folder).rstrip("/") or "/", detail=True):
            name = info["name"].rstrip("/")
            yield name[len(self.base) :], info["type"] == "directory"

    def list(self, folder: str, recursive: bool, page_size: int) -> Iterator[str]:
        return _walk(self._entries, folder, recursive)

    def kind(self, rel: str) -> str:
        path = self.base + rel
        return "dir" if self.fs.isdir(path) else "file" if self.fs.isfile(path) else "missing"

    def read(self, rel: str) -> bytes:
        return bytes(self.fs.cat_file(self.base + rel))

    def write(self, rel: str, data: bytes) -> None:
        self.fs.pipe_file(self.base + rel, data)

    def upload(self, rel: str, file: IO[bytes]) -> None:
        with self.fs.open(self.base + rel, "wb") as out:  # object stores publish the object on close
            shutil.copyfileobj(file, out)

    def delete(self, rel: str) -> None:
        self.fs.rm_file(self.base + rel)


class _BlockStore(_Store):
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


# --- clients, per process -------------------------------------------------------------------------

_LOCK = threading.Lock()
_CLIENTS: dict[tuple[Any, ...], Any] = {}
#: Environment that selects the S3 client's configuration (the secret key is not part of the key).
_AWS_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)


def _cached(key: tuple[Any, ...], make: Callable[[], Any]) -> Any:
    """One object per process and key: clients are made afresh in each task process."""
    key = (os.getpid(), *key)
    with _LOCK:
        if key not in _CLIENTS:
            _CLIENTS[key] = make()
        return _CLIENTS[key]


def _s3_client(credentials: Any, field: str) -> Any:
    if credentials is not None:
        return credentials.get_s3_client()  # prefect-aws caches it per process and block
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise InvalidInputError(field, "s3:// needs the s3 extra: pip install 'prefect-roboflow[s3]'") from None
    config = Config(
        connect_timeout=10, read_timeout=60, retries={"mode": "standard", "max_attempts": 4}, max_pool_connections=16
    )
    env = tuple(os.environ.get(name) for name in _AWS_ENV)
    return _cached(("s3", env), lambda: boto3.session.Session().client("s3", config=config))


def _load_block(slug: str, name: str, field: str) -> Any:
    from prefect.blocks.core import Block
    from prefect.exceptions import ObjectNotFound

    try:
        return _cached(("block", slug, name), lambda: Block.load(f"{slug}/{name}", _sync=True))  # type: ignore[call-arg]
    except (ObjectNotFound, ValueError, KeyError):
        raise InvalidInputError(field, f"no saved block {slug}/{name}") from None


# --- parsing --------------------------------------------------------------------------------------


def _split_url(ref: str) -> tuple[str, str]:
    """``(scheme, rest)`` of ``scheme://rest``; ``("", ref)`` for a local path."""
    scheme, sep, rest = ref.partition("://")
    return (scheme.lower(), rest) if sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme) else ("", ref)


def _reject_userinfo(scheme: str, rest: str, field: str) -> None:
    authority = rest.split("/", 1)[0]
    userinfo = authority.rpartition("@")[0]
    if userinfo and (scheme in {"s3", "s3a"} or ":" in userinfo):
        raise InvalidInputError(
            field, f"credentials in a {scheme}:// URL are not accepted: use the store's configuration or a block"
        )


def _locate(ref: str, field: str, credentials: Any = None) -> tuple[_Store, str]:
    """The store holding ``ref`` and the path of ``ref`` in it."""
    scheme, rest = _split_url(ref)
    if not scheme:
        return _LocalStore(), ref
    _reject_userinfo(scheme, rest, field)
    if scheme == "file":
        host, _, path = rest.partition("/")
        if host not in {"", "localhost"}:
            raise InvalidInputError(field, f"file:// URLs name this machine, not {host!r}")
        return _LocalStore(ref_base=f"file://{host}"), "/" + path
    if scheme in {"s3", "s3a"}:
        bucket, _, key = rest.partition("/")
        if not bucket or _MAGIC.search(bucket):
            raise InvalidInputError(field, f"{scheme}:// URLs need a bucket name without wildcards")
        return _S3Store(_s3_client(credentials, field), bucket, f"{scheme}://{bucket}/"), key
    if scheme == BLOCK_SCHEME:
        return _locate_block(rest, field)
    return _fsspec_store(scheme, ref, field)


def _fsspec_store(scheme: str, ref: str, field: str) -> tuple[_Store, str]:
    import fsspec
    from fsspec.registry import known_implementations, registry

    if scheme not in known_implementations and scheme not in registry:
        raise InvalidInputError(field, f"unknown URL scheme {scheme!r}")
    try:
        fs = fsspec.filesystem(scheme)
    except ImportError:
        hint = known_implementations.get(scheme, {}).get("err", "its fsspec backend is not installed")
        raise InvalidInputError(field, f"{scheme}:// is not available here: {hint}") from None
    rel = fs._strip_protocol(ref)
    rel = rel + "/" if ref.endswith("/") and not rel.endswith("/") else rel
    return _FsspecStore(fs, f"{scheme}://"), rel


def _locate_block(rest: str, field: str) -> tuple[_Store, str]:
    slug, _, tail = rest.partition("/")
    name, _, rel = tail.partition("/")
    if not (_SLUG.fullmatch(slug) and _SLUG.fullmatch(name)):
        raise InvalidInputError(field, "expected block://<block-type-slug>/<block-name>/<path>")
    block = _load_block(slug, name, field)
    ref_base = f"{BLOCK_SCHEME}://{slug}/{name}/"
    if slug == "s3-bucket":
        folder = (block.bucket_folder or "").strip("/")
        client = block.credentials.get_s3_client()
        return _S3Store(client, block.bucket_name, ref_base, folder + "/" if folder else ""), rel
    if slug == "local-file-system":
        base = str(Path(block.basepath or ".").expanduser()) + "/"
        return _LocalStore(ref_base, base), rel
    if slug == "remote-file-system":
        fs = block.filesystem
        return _FsspecStore(fs, ref_base, fs._strip_protocol(block.basepath).rstrip("/") + "/"), rel
    return _BlockStore(block, ref_base), rel


def block_source(block: Any, path: str = "", field: str = "images") -> str:
    """The source string of a saved file-system block plus a path in it.

    Examples:
        ```python
        block_source(S3Bucket.load("my-photos"), "2024/")  # 'block://s3-bucket/my-photos/2024/'
        ```
    """
    name = getattr(block, "_block_document_name", None)
    if not name or getattr(block, "_is_anonymous", False):
        raise InvalidInputError(field, f"the {type(block).__name__} block must be saved (task processes load it)")
    return f"{BLOCK_SCHEME}://{block.get_block_type_slug()}/{name}/{path.lstrip('/')}"


# --- sources --------------------------------------------------------------------------------------


def _expand(ref: str, field: str, credentials: Any, probe: bool, page_size: int) -> Iterator[str]:
    """The references one source string names (the string itself for a plain file)."""
    store, rel = _locate(ref, field, credentials)
    remote = bool(_split_url(ref)[0])
    try:
        magic = _MAGIC.search(rel)
        if magic:
            yield from _expand_glob(store, rel, magic.start(), field, page_size)
            return
        # a local path is looked at (as before); a remote one only when it is the whole source
        kind = store.kind(rel) if rel and not rel.endswith("/") and (probe or not remote) else None
        if not rel or rel.endswith("/") or kind == "dir":
            folder = rel + "/" if kind == "dir" else rel
            for path in store.list(folder, recursive=False, page_size=page_size):
                if os.path.splitext(path)[1].lower() in IMAGE_SUFFIXES:
                    yield store.ref(path)
        elif remote and kind == "missing":
            raise InvalidInputError(field, f"nothing found at {ref}")
        else:
            yield ref  # a missing file becomes a failed row, not a crash
    except InvalidInputError:
        raise
    except Exception as exc:
        reason = store.explain(exc)
        if reason is None:
            raise
        raise InvalidInputError(field, f"{reason} (listing {ref})") from None


def _expand_glob(store: _Store, rel: str, first_magic: int, field: str, page_size: int) -> Iterator[str]:
    from fsspec.utils import glob_translate

    folder = rel[: rel.rfind("/", 0, first_magic) + 1]
    try:
        pattern = re.compile(glob_translate(rel))
    except ValueError as exc:
        raise InvalidInputError(field, f"bad pattern: {exc}") from None
    recursive = "/" in rel[len(folder) :]
    for path in store.list(folder, recursive=recursive, page_size=page_size):
        if pattern.match(path):
            yield store.ref(path)


def iter_refs(
    images: str | os.PathLike[str] | Sequence[str] | tuple[Any, str],
    *,
    field: str = "images",
    credentials: Any = None,
    page_size: int = LIST_PAGE_SIZE,
) -> Iterator[str]:
    """Expand a source into image references, lazily and in a stable order.

    Args:
        images: A source string (see the module docstring), a list of them, or a
            ``(saved file-system block, path)`` pair.
        field: The parameter named in errors.
        credentials: A prefect-aws ``AwsCredentials``/``MinIOCredentials`` block for ``s3://``
            URLs; None for the standard AWS configuration.
        page_size: Keys per S3 listing request.

    Raises:
        InvalidInputError: naming ``field``, on the first use of the iterator, when the source
            names nothing (a prefix or folder with no images, an empty list), a bucket does not
            exist or cannot be read, no credentials are found, a URL has an unknown scheme or
            carries credentials.

    Examples:
        ```python
        list(iter_refs("s3://photos/2024/"))  # ['s3://photos/2024/a.jpg', 's3://photos/2024/b.png']
        ```
    """
    if isinstance(images, tuple) and len(images) == 2 and not isinstance(images[0], str):
        images = block_source(images[0], images[1], field)
    single = isinstance(images, str | os.PathLike)
    refs = [os.fspath(images)] if single else list(images)  # type: ignore[arg-type]
    if not refs:
        raise InvalidInputError(field, "no images given")
    found = False
    for index, ref in enumerate(refs):
        name = field if single else f"{field}[{index}]"
        if not isinstance(ref, str | os.PathLike):
            raise InvalidInputError(name, f"expected paths or URLs as strings, got {type(ref).__name__}")
        ref = os.fspath(ref)
        if _split_url(ref)[0] in _PASSTHROUGH:
            found = True
            yield ref
            continue
        for expanded in _expand(ref, name, credentials, probe=single, page_size=page_size):
            found = True
            yield expanded
    if not found:
        where = refs[0] if single else f"{len(refs)} sources"
        raise InvalidInputError(field, f"no image files found in {where} (sub-folders need a ** glob)")


def count_refs(images: Any, **options: Any) -> int:
    """How many references `iter_refs` yields, counted as they stream (never all held at once)."""
    return sum(1 for _ in iter_refs(images, **options))


# --- reading and writing --------------------------------------------------------------------------


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
    if _split_url(ref)[0] in _PASSTHROUGH:
        raise ValueError(f"{ref} is downloaded over HTTP, not read from storage")
    store, rel = _locate(ref, field, credentials)
    try:
        return store.read(rel)
    except FileNotFoundError:
        raise InvalidImageError(field, f"not found: {ref}") from None
    except Exception as exc:
        reason = store.explain(exc)
        if reason is None:
            raise
        raise InvalidImageError(field, f"cannot read {ref}: {reason}") from None


def is_remote(location: str | os.PathLike[str]) -> bool:
    """Whether an output location is an object store or block (else a local folder)."""
    scheme = _split_url(os.fspath(location))[0]
    return bool(scheme) and scheme != "file"


def join(location: str | os.PathLike[str], name: str) -> str:
    """``name`` inside the folder or prefix ``location``."""
    location = os.fspath(location)
    return f"{location.rstrip('/')}/{name}" if location else name


def _output_error(store: _Store, url: str, field: str, exc: Exception) -> InvalidInputError | None:
    reason = store.explain(exc)
    return None if reason is None else InvalidInputError(field, f"cannot write {url}: {reason}")


def write_bytes(url: str, data: bytes, *, credentials: Any = None, field: str = "out_dir") -> None:
    """Write one whole object or file: readers see the old one or the new one, never a part."""
    store, rel = _locate(url, field, credentials)
    try:
        store.write(rel, data)
    except Exception as exc:
        error = _output_error(store, url, field, exc)
        if error is None:
            raise
        raise error from None


def check_output(location: str | os.PathLike[str], *, credentials: Any = None, field: str = "out_dir") -> None:
    """Fail early, naming ``field``, when outputs cannot go to ``location`` (e.g. no such bucket).

    Local folders are created; S3 buckets are checked with one HEAD request.
    """
    location = os.fspath(location)
    store, rel = _locate(location, field, credentials)
    try:
        if isinstance(store, _S3Store):
            store.client.head_bucket(Bucket=store.bucket)
        elif isinstance(store, _LocalStore):
            Path(store.base + rel).mkdir(parents=True, exist_ok=True)
    except Exception as exc:
        if isinstance(store, _S3Store) and _s3_code(exc) in {"404", "NoSuchBucket"}:  # HEAD has no error code
            raise InvalidInputError(field, f"bucket {store.bucket!r} does not exist") from None
        error = _output_error(store, location, field, exc)
        if error is None:
            raise
        raise error from None


_W = TypeVar("_W", bound="AtomicParquetWriter")


class AtomicParquetWriter:
    """Stream rows into a parquet table that appears whole at ``url`` on `commit`.

    Local tables are written beside their final name and renamed into place; remote ones are
    spooled to a local temp file and uploaded as one object. On an exception nothing changes at
    ``url``. The result is a plain parquet object: pandas, pyarrow and duckdb read it from the bucket.

    Examples:
        ```python
        with AtomicParquetWriter("s3://results/run-1/embeddings.parquet", schema) as sink:
            sink.write([{"image_ref": "s3://photos/a.jpg", ...}])
        pandas.read_parquet("s3://results/run-1/embeddings.parquet")
        ```
    """

    def __init__(
        self, url: str | os.PathLike[str], schema: pa.Schema, *, credentials: Any = None, field: str = "out_dir"
    ) -> None:
        import pyarrow.parquet as pq

        self.url, self.schema, self.field, self.rows = os.fspath(url), schema, field, 0
        self._store, self._rel = _locate(self.url, field, credentials)
        self._local: _LocalReplace | None = None
        if isinstance(self._store, _LocalStore):
            self._local = _LocalReplace(Path(self._store.base + self._rel))
            self._file: IO[bytes] = self._local.file
        else:
            self._file = tempfile.TemporaryFile()  # noqa: SIM115 - closed by commit or abort
        self._writer: Any = pq.ParquetWriter(self._file, schema, compression="zstd")

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Append rows (dicts keyed by column name)."""
        import pyarrow as pa

        if rows:
            assert self._writer is not None, "writer already closed"
            self._writer.write_table(pa.Table.from_pylist(rows, schema=self.schema))
            self.rows += len(rows)

    def commit(self) -> str:
        """Finish the table and publish it at ``url``; returns ``url``."""
        assert self._writer is not None, "writer already closed"
        self._writer.close()
        self._writer = None
        if self._local is not None:
            self._local.__exit__(None)
            return self.url
        try:
            self._file.seek(0)
            self._store.upload(self._rel, self._file)
        except Exception as exc:
            error = _output_error(self._store, self.url, self.field, exc)
            if error is None:
                raise
            raise error from None
        finally:
            self._file.close()
        return self.url

    def abort(self) -> None:
        """Drop everything written; ``url`` is left as it was."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._local is not None:
            self._local.__exit__(RuntimeError)
        else:
            self._file.close()

    def __enter__(self: _W) -> _W:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
