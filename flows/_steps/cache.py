"""Content-addressed result cache: an item the server has seen is never sent again.

One rule for keys — the sha256 of the content (image bytes, crop bytes or a label text) plus the
model's family and version and every parameter that changes the output; never the API key, the
server URL or the run id. Steps consult the cache before sending and fill it as answers arrive,
so a rerun sends nothing, a run over a superset sends only the new items, and a crash loses at
most the requests of the batches in flight.

A task reads and writes its batch's entries at once: in a local folder as one query and one
transaction of the folder's SQLite file (`_storage.entries`: no file per entry), on a storage
block concurrently, one object per entry (each is a request there). Each entry is framed (a magic,
the payload's length and its CRC-32) and checked on reading, so an entry that is damaged, torn or
left by the unframed format of earlier versions is a miss — recomputed and written over — never a
wrong result.

A local folder's cache is bounded: at most `max_cache_bytes` of entries (10 GiB, or
``PREFECT_ROBOFLOW_CACHE_MAX_BYTES``), the entries used longest ago evicted by the write that goes
over (`_storage.entries`); `ContentCache.prune` shrinks it on demand. An evicted entry is only a
miss: recomputed if needed again. A storage block's entries are bounded by the storage's own rules
(an S3 lifecycle expiration on the ``items/`` prefix, for one).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import sqlite3
import struct
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from prefect.blocks.core import Block
from prefect.filesystems import WritableFileSystem
from prefect.settings import PREFECT_HOME

from prefect_roboflow.blocks import InferenceError, ResponseInfo, record_responses
from prefect_roboflow.blocks.exceptions import InvalidInputError

from .._storage.entries import LocalEntries
from .._storage.locate import _is_block_slug

__all__ = [
    "DEFAULT_MAX_BYTES",
    "ContentCache",
    "content_key",
    "content_keys",
    "frame",
    "max_cache_bytes",
    "through_cache",
    "unframe",
]

T = TypeVar("T")

#: Bump when the meaning of a result changes (it is in every key). 2: family names in keys.
CACHE_FORMAT = "2"
#: An entry: magic, payload length, payload CRC-32, then the payload. Entries without it (written
#: before entries were framed, or torn) are misses, recomputed and written over.
_FRAME = struct.Struct("<4sQI")
_MAGIC = b"PRC\x01"
#: Entries of a storage block read or written at once (each is a request to the storage).
BLOCK_CONCURRENCY = 16
#: A local cache's bound when ``PREFECT_ROBOFLOW_CACHE_MAX_BYTES`` does not set one.
DEFAULT_MAX_BYTES = 10 * 2**30
MAX_BYTES_VARIABLE = "PREFECT_ROBOFLOW_CACHE_MAX_BYTES"


def max_cache_bytes() -> int:
    """A local cache's bound in bytes: ``PREFECT_ROBOFLOW_CACHE_MAX_BYTES``, else `DEFAULT_MAX_BYTES`.

    Raises:
        InvalidInputError: naming ``cache_storage``, when the variable is not a positive integer.
    """
    text = os.environ.get(MAX_BYTES_VARIABLE, "").strip()
    if not text:
        return DEFAULT_MAX_BYTES
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        reason = f"{MAX_BYTES_VARIABLE} must be a positive number of bytes, got {text!r}"
        raise InvalidInputError("cache_storage", reason)
    return value


def frame(payload: bytes) -> bytes:
    """A payload as a cache entry: checked on reading by `unframe`."""
    return _FRAME.pack(_MAGIC, len(payload), zlib.crc32(payload)) + payload


def unframe(entry: bytes) -> bytes | None:
    """The payload of a cache entry, or None for one that is torn, truncated or not framed."""
    if len(entry) < _FRAME.size:
        return None
    magic, length, crc = _FRAME.unpack_from(entry)
    payload = entry[_FRAME.size :]
    if magic != _MAGIC or length != len(payload) or zlib.crc32(payload) != crc:
        return None
    return payload


def content_key(step: str, content_sha256: str, model: dict[str, Any], params: dict[str, Any]) -> str:
    """The cache key of one item's result at one step.

    Args:
        step: What was computed, e.g. ``"detect"`` or ``"embed"``.
        content_sha256: sha256 of the item's bytes.
        model: Model identity (`ModelBlock.identity`), e.g. ``{"family": "clip", "version": "ViT-B-16"}``.
        params: Every parameter that changes the result (confidence, examples...).
    """
    material = json.dumps(
        {"format": CACHE_FORMAT, "step": step, "content": content_sha256, "model": model, "params": params},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(material.encode()).hexdigest()


def content_keys(step: str, shas: Sequence[str], model: dict[str, Any], params: dict[str, Any]) -> list[str]:
    """`content_key` of many items at one step, equal to it key for key: the material that does not
    depend on the content is serialised once (``"content"`` sorts first among the keys)."""
    rest = json.dumps(
        {"format": CACHE_FORMAT, "step": step, "model": model, "params": params},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    sha256 = hashlib.sha256
    return [sha256(f'{{"content":{json.dumps(sha)},{rest[1:]}'.encode()).hexdigest() for sha in shas]


class ContentCache:
    """Per-item results, stored in a local folder or any Prefect `WritableFileSystem` block.

    A local folder keeps them in one SQLite file (``entries.sqlite``, a batch per transaction), at
    most ``max_bytes`` of them (`max_cache_bytes` by default; the least recently used evicted); a
    block keeps one object per entry (``items/<2 hex>/<key>``). Every entry is framed and checked,
    so a damaged or torn one is a miss and recomputed, never a wrong result.

    Examples:
        ```python
        cache = ContentCache(Path("~/.prefect/prefect-roboflow-cache").expanduser())
        key = content_key("embed", sha, {"family": "clip", "version": "ViT-B-16"}, {})
        cache.get(key)  # None on the first run
        cache.put(key, vector.tobytes())
        ```
    """

    def __init__(self, storage: Path | WritableFileSystem, max_bytes: int | None = None) -> None:
        self.storage = storage
        self.max_bytes = max_cache_bytes() if max_bytes is None and isinstance(storage, Path) else max_bytes

    def _entries(self) -> LocalEntries:
        assert isinstance(self.storage, Path)
        return LocalEntries(self.storage, self.max_bytes)

    def prune(self, max_bytes: int) -> tuple[int, int]:
        """Remove the local cache's least recently used entries until they take at most
        ``max_bytes`` (a storage block's cache: nothing; bound it with the storage's own rules).

        Returns:
            ``(entries removed, bytes freed)``.

        Examples:
            ```python
            resolve_cache(None).prune(2 * 2**30)  # the default cache, down to 2 GiB
            ```
        """
        if not isinstance(self.storage, Path):
            return 0, 0
        return self._entries().prune(max_bytes)

    @staticmethod
    def _relative(key: str) -> str:
        return f"items/{key[:2]}/{key}"

    def _read(self, key: str) -> bytes | None:
        """One entry of a storage block."""
        assert not isinstance(self.storage, Path)
        try:
            entry = _resolved(self.storage.read_path(self._relative(key)))
        except Exception:  # a missing or unreadable entry is a miss, whatever the storage
            return None
        return unframe(entry) if isinstance(entry, bytes) else None

    def _write(self, key: str, value: bytes) -> None:
        """One entry of a storage block."""
        assert not isinstance(self.storage, Path)
        _resolved(self.storage.write_path(self._relative(key), frame(value)))

    def get(self, key: str) -> bytes | None:
        """The stored bytes for ``key``, or None (missing, unreadable, or damaged)."""
        return self.get_many([key]).get(key)

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        """The stored entries among ``keys``."""
        keys = list(keys)
        if isinstance(self.storage, Path):
            try:
                stored = self._entries().get_many(keys)
            except (OSError, sqlite3.Error):  # an unreadable cache is a cache of misses
                return {}
            values = [unframe(stored[key]) if key in stored else None for key in keys]
        elif len(keys) < 2:
            values = [self._read(key) for key in keys]
        else:
            with ThreadPoolExecutor(min(BLOCK_CONCURRENCY, len(keys)), "prefect-roboflow-cache") as pool:
                values = list(pool.map(self._read, keys))
        return {key: value for key, value in zip(keys, values, strict=True) if value is not None}

    def put(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key``."""
        self.put_many({key: value})

    def put_many(self, entries: Mapping[str, bytes]) -> None:
        """Store every ``key: value`` of ``entries``: in a local folder in one transaction."""
        if isinstance(self.storage, Path):
            self._entries().put_many({key: frame(value) for key, value in entries.items()})
        elif len(entries) < 2:
            for key, value in entries.items():
                self._write(key, value)
        else:
            with ThreadPoolExecutor(min(BLOCK_CONCURRENCY, len(entries)), "prefect-roboflow-cache") as pool:
                list(pool.map(self._write, entries.keys(), entries.values()))


def _resolved(value: Any) -> Any:
    """The value of a storage block call: some blocks' methods are sync, some async only."""
    if inspect.iscoroutine(value):
        from prefect.utilities.asyncutils import run_coro_as_sync

        return run_coro_as_sync(value)
    return value


def through_cache(
    cache: ContentCache,
    keys: Sequence[str],
    codec: tuple[Callable[[T], bytes], Callable[[bytes], T]],
    compute: Callable[[list[int]], Sequence[T | InferenceError]],
    accept: Callable[[T], bool] | None = None,
) -> tuple[list[T | InferenceError], int, list[ResponseInfo]]:
    """A result per key: stored ones decoded, the rest computed and stored.

    ``compute(indexes)`` answers a result or an `InferenceError` for each index it is given;
    errors are returned, never stored. A stored result that ``accept`` refuses (e.g. a vector of
    another size than the model's) is a miss: computed again and stored over. Also returns how
    many keys were computed and the server's answers to those requests.

    Examples:
        ```python
        outcomes, sent, infos = through_cache(cache, keys, (encode, decode), compute)
        ```
    """
    encode, decode = codec
    found = cache.get_many(keys)
    outcomes: list[Any] = [decode(found[key]) if key in found else None for key in keys]
    misses = [i for i, key in enumerate(keys) if key not in found or (accept is not None and not accept(outcomes[i]))]
    infos: list[ResponseInfo] = []
    if misses:
        with record_responses() as infos:
            answers = compute(misses)
        fresh = {}
        for i, answer in zip(misses, answers, strict=True):
            if not isinstance(answer, InferenceError):
                fresh[keys[i]] = encode(answer)
            outcomes[i] = answer
        cache.put_many(fresh)
    return outcomes, len(misses), infos


#: A flow's ``cache_storage`` parameter: a folder, a saved block as ``type-slug/name``, a cache, or None.
CacheStorage = str | ContentCache | None


def resolve_cache(cache_storage: CacheStorage) -> ContentCache:
    """The per-item content cache of a flow.

    ``cache_storage`` is a folder (absolute or relative, existing or not), or a saved
    `WritableFileSystem` block as ``"block-type-slug/name"`` of a registered block type (e.g.
    ``"s3-bucket/cache"``); ``None`` means ``$PREFECT_HOME/prefect-roboflow-cache``.
    """
    if isinstance(cache_storage, ContentCache):
        return cache_storage
    if cache_storage is not None and _is_block_slug(cache_storage):
        block = Block.load(cache_storage, _sync=True)  # type: ignore[call-arg]
        if not isinstance(block, WritableFileSystem):
            raise InvalidInputError("cache_storage", f"{cache_storage} is not a writable file system block")
        return ContentCache(block)
    folder = Path(cache_storage) if cache_storage else Path(PREFECT_HOME.value()) / "prefect-roboflow-cache"
    return ContentCache(folder.expanduser().resolve())
