"""Pinned baselines: a window's embeddings saved as a parquet table, versioned by model, version
and time, under ``<baseline_dir>/<family>/<version>/<UTC time>.parquet``.

A baseline is a table like any other (``model, version, embedding`` columns), so it is read and
checked as one; the latest for a model and version is the one whose name (its time) sorts last.
Each is written whole (`_storage.write_bytes`): a reader sees it complete or not at all.
"""

from __future__ import annotations

import io
import re
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from prefect_roboflow.blocks.exceptions import InvalidInputError

from .._outputs.files import embedding_type
from .._storage.access import join, list_files, write_bytes
from .._storage.parquet import write_whole
from .windows import Window

__all__ = ["baseline_folder", "latest_baseline", "save_baseline"]


def _safe(part: str) -> str:
    """A model version as one path segment (no ``/``, no characters asset keys refuse)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", part) or "_"


def baseline_folder(root: str, family: str, version: str) -> str:
    """Where the baselines of one model and version live."""
    return join(join(root, _safe(family)), _safe(version))


def latest_baseline(root: str, family: str, version: str) -> str | None:
    """The newest pinned baseline of this model and version under ``root``, if any."""
    try:
        names = [
            n
            for n in list_files(baseline_folder(root, family, version), field="baseline_dir")
            if n.endswith(".parquet")
        ]
    except FileNotFoundError:
        return None
    return max(names, default=None)


def save_baseline(window: Window, root: str, now: datetime | None = None) -> str:
    """Pin ``window`` as the newest baseline of its model and version; its location."""
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%S%fZ")
    url = join(baseline_folder(root, window.family, window.version), f"{stamp}.parquet")
    n, dim = window.vectors.shape
    values = pa.array(np.ascontiguousarray(window.vectors, dtype=np.float32).reshape(-1), type=pa.float32())
    table = pa.table(
        {
            "model": pa.array([window.family] * n, pa.string()),
            "version": pa.array([window.version] * n, pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(values, dim).cast(embedding_type(dim)),
        }
    )
    buffer = io.BytesIO()
    write_whole(table, buffer)
    try:
        write_bytes(url, buffer.getvalue(), field="baseline_dir")
    except OSError as error:
        raise InvalidInputError("baseline_dir", f"cannot write {url}: {error}") from None
    return url
