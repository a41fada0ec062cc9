"""Searching a vector index: exact scans, IVF-PQ candidates re-ranked exactly, and query input.

`_knn` is `VectorIndex.knn`: below ``exact_below`` rows an exact float32 scan (`_exact_knn`,
block by block); above, IVF-PQ candidates re-ranked by their exact vectors and merged with an
exact scan of the rows added since the IVF-PQ was written. `_query` turns a search's query into
a checked vector, or into a text or image to embed with the index's model (CLIP or Perception
Encoder) — every check made before any request.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from prefect_roboflow.blocks import EmbeddingModel
from prefect_roboflow.blocks.exceptions import InvalidInputError

from .._steps.models import ServerSpec, embedding_model, resolve_server
from .._steps.sources import read_bytes
from .._steps.vectors import normalise
from .._storage.listing import looks_like_image
from .._storage.locate import split_url
from .rows import _OpenIndex

__all__ = [
    "_check_queries",
    "_check_top_k",
    "_checked_embedding",
    "_exact_knn",
    "_knn",
    "_query",
]


def _knn(
    index: _OpenIndex, queries: np.ndarray, k: int, nprobe: int | None, refine: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """`VectorIndex.knn`: ``(scores, rows)``, each ``(len(queries), k)``, best first."""
    _check_top_k(k, "k")
    queries = _check_queries(index, queries)
    if index._ann is None or index.rows < index.exact_below:
        return _exact_knn(index.iter_vectors(), queries, k)
    scores, rows = _ann_knn(index, queries, k, nprobe, refine)
    if index.ann_rows < index.rows:
        tail = ((start, v) for start, v in index.iter_vectors() if start + len(v) > index.ann_rows)
        tail_scores, tail_rows = _exact_knn(_from_row(tail, index.ann_rows), queries, k)
        scores, rows = _merge(scores, rows, tail_scores, tail_rows, k)
    return scores, rows


def _ann_knn(
    index: _OpenIndex, queries: np.ndarray, k: int, nprobe: int | None, refine: int | None
) -> tuple[np.ndarray, np.ndarray]:
    assert index._manifest.ann is not None
    nlist = int(index._manifest.ann["nlist"])
    if nprobe is not None and (not isinstance(nprobe, int) or not 1 <= nprobe <= nlist):
        raise InvalidInputError("nprobe", f"must be an int in 1..{nlist}, got {nprobe!r}")
    index._ann.nprobe = nprobe or max(8, nlist // 16)
    wanted = min(index.ann_rows, max(k * (refine or 10), 100 if refine is None else k))
    _, candidates = index._ann.search(queries, wanted)
    valid = candidates >= 0
    flat = np.where(valid, candidates, 0).ravel()
    exact = np.einsum("qcd,qd->qc", index.vectors(flat).reshape(*candidates.shape, -1), queries)
    exact[~valid] = -np.inf
    top = np.argsort(-exact, axis=1, kind="stable")[:, :k]
    rows = np.take_along_axis(np.where(valid, candidates, -1), top, axis=1)
    return np.take_along_axis(exact, top, axis=1), rows


def _check_queries(index: _OpenIndex, queries: Any) -> np.ndarray:
    array = np.asarray(queries, dtype=np.float32)
    if array.ndim != 2 or array.shape[1] != index.dim:
        raise InvalidInputError(
            "query", f"expected vectors of dimension {index.dim} (the index's), got shape {array.shape}"
        )
    return normalise(array, "query")


def _query(index: _OpenIndex, query: Any, server: ServerSpec) -> tuple[np.ndarray, EmbeddingModel | None, Any]:
    """``(vector, None, None)`` for a vector; ``(empty, model, text-or-image)`` to embed — checked first."""
    if index.rows == 0:
        raise InvalidInputError("query", f"the index at {index.path} is empty")
    if isinstance(query, (np.ndarray, list, tuple)):
        return _check_queries(index, np.asarray(query, dtype=np.float32).reshape(1, -1))[0], None, None
    if not isinstance(query, (str, bytes, Path)):
        raise InvalidInputError("query", f"expected a vector, a text or an image, got {type(query).__name__}")
    assert index.family is not None and index.version is not None
    subject = query if isinstance(query, str) and not looks_like_image(query) else _image_input(query)
    model = embedding_model(index.family, index.version, resolve_server(server))
    return np.empty(0, dtype=np.float32), model, subject


def _checked_embedding(index: _OpenIndex, embedded: np.ndarray) -> np.ndarray:
    if embedded.shape != (1, index.dim):  # the server's answer is input too
        raise InvalidInputError("query", f"the server's embedding has shape {embedded.shape}, index dim {index.dim}")
    return _check_queries(index, embedded)[0]


def _check_top_k(top_k: Any, name: str = "top_k") -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise InvalidInputError(name, f"must be an int of at least 1, got {top_k!r}")


def _from_row(chunks: Iterable[tuple[int, np.ndarray]], first: int) -> Iterator[tuple[int, np.ndarray]]:
    for start, vectors in chunks:
        skip = max(0, first - start)
        if skip < len(vectors):
            yield start + skip, vectors[skip:]


def _exact_knn(chunks: Iterable[tuple[int, np.ndarray]], queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over chunks of rows, never more than one chunk × queries scores in memory."""
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    rows = np.full((len(queries), k), -1, dtype=np.int64)
    for start, vectors in chunks:
        block = queries @ np.asarray(vectors, dtype=np.float32).T
        if block.shape[1] > k:
            part = np.argpartition(-block, k - 1, axis=1)[:, :k]
        else:
            part = np.broadcast_to(np.arange(block.shape[1]), block.shape)
        scores, rows = _merge(scores, rows, np.take_along_axis(block, part, axis=1), part + start, k)
    return scores, rows


def _merge(
    scores: np.ndarray, rows: np.ndarray, more_scores: np.ndarray, more_rows: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    all_scores = np.concatenate([scores, more_scores], axis=1)
    all_rows = np.concatenate([rows, more_rows], axis=1)
    order = np.argsort(-all_scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(all_scores, order, axis=1), np.take_along_axis(all_rows, order, axis=1)


def _image_input(query: str | bytes | Path) -> bytes:
    """An image query's bytes, read as `search_images` reads one: a local path, an ``s3://``,
    fsspec or ``block://`` reference through `_storage`, an https URL downloaded here."""
    if isinstance(query, bytes):
        return query
    text = str(query)
    if isinstance(query, Path) or not split_url(text)[0]:
        text = str(Path(text).expanduser())
    return read_bytes(text, "query")
