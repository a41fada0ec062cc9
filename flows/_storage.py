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
upload, one object upload elsewhere. The storage systems are in `_stores`; which one holds a reference,
in `_locate`.

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
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, TypeVar

from prefect_roboflow.blocks.exceptions import InvalidImageError, InvalidInputError

from ._locate import BLOCK_SCHEME, MAGIC, locate, split_url
from ._stores import LocalReplace, LocalStore, S3Store, Store, output_error, s3_code

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
    "delete",
    "is_remote",
    "iter_refs",
    "join",
    "list_files",
    "read_bytes",
    "write_bytes",
]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
#: Keys per S3 listing request (the S3 maximum).
LIST_PAGE_SIZE = 1000
_PASSTHROUGH = frozenset({"http", "https"})


# --- sources --------------------------------------------------------------------------------------


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


def _expand(ref: str, field: str, credentials: Any, probe: bool, page_size: int) -> Iterator[str]:
    """The references one source string names (the string itself for a plain file)."""
    store, rel = locate(ref, field, credentials)
    remote = bool(split_url(ref)[0])
    try:
        magic = MAGIC.search(rel)
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


def _expand_glob(store: Store, rel: str, first_magic: int, field: str, page_size: int) -> Iterator[str]:
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
        if split_url(ref)[0] in _PASSTHROUGH:
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
    if split_url(ref)[0] in _PASSTHROUGH:
        raise ValueError(f"{ref} is downloaded over HTTP, not read from storage")
    store, rel = locate(ref, field, credentials)
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
    scheme = split_url(os.fspath(location))[0]
    return bool(scheme) and scheme != "file"


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
        self._store, self._rel = locate(self.url, field, credentials)
        self._local: LocalReplace | None = None
        if isinstance(self._store, LocalStore):
            self._local = LocalReplace(Path(self._store.base + self._rel))
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
            error = output_error(self._store, self.url, self.field, exc)
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
