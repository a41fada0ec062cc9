"""Content-addressed result caches: an image the server has seen is never sent again.

Two granularities, one rule for keys — the sha256 of the content (image bytes, crop bytes or
label texts) plus the model family, version and every parameter that changes the output;
never the API key, the server URL or the run id:

- `ContentCache` stores one result per item (an image's detections, a crop's embedding).
  Batch tasks consult it before sending and fill it as answers arrive, so a rerun sends
  nothing, a run over a superset sends only the new images, and a crash loses at most the
  requests in flight.
- `TextContentPolicy` is a Prefect cache policy for tasks whose whole input is content (the
  label prompts): Prefect persists the result and skips the task run on a hit.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.filesystems import WritableFileSystem

#: Bump when the stored format or the meaning of a result changes.
CACHE_FORMAT = "1"


def content_key(step: str, content_sha256: str, model: dict[str, Any], params: dict[str, Any]) -> str:
    """The cache key of one item's result at one step.

    Args:
        step: What was computed, e.g. ``"detect"`` or ``"embed"``.
        content_sha256: sha256 of the item's bytes.
        model: Model identity, e.g. ``{"family": "clip", "version": "ViT-B-16"}``.
        params: Every parameter that changes the result (confidence, examples, padding...).
    """
    material = json.dumps(
        {"format": CACHE_FORMAT, "step": step, "content": content_sha256, "model": model, "params": params},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(material.encode()).hexdigest()


class ContentCache:
    """Per-item results, stored in a local folder or any Prefect `WritableFileSystem` block.

    Local writes are atomic (temp file + rename), so a crash never leaves a half entry; an
    entry that cannot be read is treated as a miss and recomputed.

    Examples:
        ```python
        cache = ContentCache(Path("~/.prefect/prefect-roboflow-cache").expanduser())
        key = content_key("embed", sha, {"family": "clip", "version": "ViT-B-16"}, {})
        cache.get(key)  # None on the first run
        cache.put(key, vector.tobytes())
        ```
    """

    def __init__(self, storage: Path | WritableFileSystem) -> None:
        self.storage = storage

    def describe(self) -> str:
        """Where entries go, for logs and summaries."""
        if isinstance(self.storage, Path):
            return str(self.storage)
        return f"{type(self.storage).__name__} block"

    @staticmethod
    def _relative(key: str) -> str:
        return f"items/{key[:2]}/{key}"

    def get(self, key: str) -> bytes | None:
        """The stored bytes for ``key``, or None."""
        try:
            if isinstance(self.storage, Path):
                return (self.storage / self._relative(key)).read_bytes()
            return _resolved(self.storage.read_path(self._relative(key)))
        except Exception:  # a missing or unreadable entry is a miss, whatever the storage
            return None

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        """The stored entries among ``keys``."""
        found = {}
        for key in keys:
            value = self.get(key)
            if value is not None:
                found[key] = value
        return found

    def put(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key``."""
        if isinstance(self.storage, Path):
            atomic_write_bytes(self.storage / self._relative(key), value)
        else:
            _resolved(self.storage.write_path(self._relative(key), value))


def _resolved(value: Any) -> Any:
    """The value of a storage block call: some blocks' methods are sync, some async only."""
    if inspect.iscoroutine(value):
        from prefect.utilities.asyncutils import run_coro_as_sync

        return run_coro_as_sync(value)
    return value


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers see either the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class TextContentPolicy(CachePolicy):
    """Cache key from a task's text inputs and model identity, never its server block.

    ``texts_arg`` names the task argument holding the texts, ``model_arg`` the model block;
    only the block's family and ``version`` enter the key.
    """

    texts_arg: str = "texts"
    model_arg: str = "model"

    def compute_key(
        self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        texts = inputs.get(self.texts_arg)
        model = inputs.get(self.model_arg)
        if texts is None or model is None:
            return None
        content = hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()
        identity = {"family": type(model).__name__, "version": getattr(model, "version", None)}
        return content_key(f"texts:{task_ctx.task.name}", content, identity, {})
