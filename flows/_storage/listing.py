"""Sources expanded into image references, lazily: folders, globs, lists, buckets, blocks."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prefect_roboflow.blocks.exceptions import InvalidInputError

from .locate import BLOCK_SCHEME, MAGIC, WEB_SCHEMES, locate, split_url
from .stores import LIST_PAGE_SIZE, Store

if TYPE_CHECKING:
    pass

#: The file suffixes (lower case) that name an image, wherever a reference points.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def has_image_suffix(ref: str) -> bool:
    """Whether the path of a reference (any scheme; a URL's query or fragment ignored) ends in an image suffix."""
    path = ref.split("?", 1)[0].split("#", 1)[0] if "://" in ref else ref
    return os.path.splitext(path)[1].lower() in IMAGE_SUFFIXES


def looks_like_image(query: str) -> bool:
    """Whether a query string names an image rather than being a text: an ``http(s)://`` URL, or a
    path or storage reference (``s3://``, ``block://``, any fsspec URL, a local path) with an image suffix.

    Examples:
        ```python
        looks_like_image("s3://bucket/q.jpg"), looks_like_image("a red car")  # (True, False)
        ```
    """
    return query.startswith(("http://", "https://")) or has_image_suffix(query)


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
                if has_image_suffix(path):
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
        if split_url(ref)[0] in WEB_SCHEMES:
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
