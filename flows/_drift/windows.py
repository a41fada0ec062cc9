"""A drift window: the embeddings of one side (reference or current), read from a table or a vector
index and checked, or said to be images (which `monitor_drift` embeds through the cache).

A *table* is a parquet file (``….parquet``: a flow's embeddings table or a pinned baseline) or a
folder of parquet parts (a fanned-out run's ``embeddings/``) with ``model``, ``version`` and
``embedding`` columns (only ``status == "ok"`` rows count when there is a ``status``); an *index*
is a `VectorIndex` folder; anything else is an image source. A window of a few rows is read as it
is (`monitor_drift` gives it "insufficient data", not an error). Every check raises
`InvalidInputError` naming the parameter: no rows, non-finite values, several models or lengths,
and (`check_same`) another model, version or dimension than the other side.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from prefect_roboflow.blocks.exceptions import InvalidInputError

from .._index.store import is_index
from .._steps.sources import ImageSource
from .._steps.vectors import normalise
from .._storage.access import is_remote, list_files, read_bytes
from ..vector_index import VectorIndex, family_name

__all__ = ["Window", "check_same", "checked_vectors", "is_table", "read_window"]

TABLE_COLUMNS = ("model", "version", "embedding")


@dataclass
class Window:
    """One side's embeddings (rows L2-normalised, float32) and the model that made them."""

    vectors: np.ndarray
    family: str
    version: str
    source: str
    frames: int = 0  # rows that are frames of a video (near-copies of their neighbours: not independent)

    @property
    def dim(self) -> int:
        """The embedding dimension."""
        return int(self.vectors.shape[1])

    @property
    def label(self) -> str:
        """``family version (dim-d)``, for messages."""
        return f"{self.family} {self.version} ({self.dim}-d)"


def is_table(spec: ImageSource) -> bool:
    """Whether ``spec`` names a parquet table (a file, or a folder of parts), not images."""
    if not isinstance(spec, str) or any(c in spec for c in "*?["):
        return False
    if spec.rstrip("/").endswith(".parquet"):
        return True
    try:
        names = list(list_files(spec, field="reference"))
    except (InvalidInputError, OSError, NotImplementedError):
        return False
    return bool(names) and all(n.endswith(".parquet") for n in names)


def _parts(spec: str) -> list[str]:
    if spec.rstrip("/").endswith(".parquet"):
        return [spec]
    return sorted(n for n in list_files(spec, field="reference") if n.endswith(".parquet"))


def _row_groups(part: str, field: str) -> Iterator[pa.Table]:
    """``part``'s row groups one at a time (the table columns, and ``status`` when it has one): a
    whole 100,000 × 512 table read at once took ~650 MB of decoding buffers beside its 205 MB."""
    try:
        if is_remote(part):
            source: object = pa.BufferReader(read_bytes(part, field=field))
        else:
            source = part
        file = pq.ParquetFile(source)
        names = file.schema_arrow.names
        missing = [c for c in TABLE_COLUMNS if c not in names]
        if missing:
            raise InvalidInputError(field, f"{part} lacks column(s) {missing}")
        columns = [*TABLE_COLUMNS, *(c for c in ("status", "frame_index") if c in names)]
        for group in range(file.num_row_groups):
            yield file.read_row_group(group, columns=columns)
    except (OSError, pa.ArrowInvalid) as error:
        raise InvalidInputError(field, f"{part} is not a readable parquet table: {error}") from None


def checked_vectors(vectors: np.ndarray, field: str, source: str) -> np.ndarray:
    """``vectors`` as L2-normalised float32 rows, refused when there are none, or any is not finite or zero."""
    if vectors.ndim != 2 or len(vectors) == 0:
        raise InvalidInputError(field, f"{source} holds no embeddings (an empty window)")
    return normalise(vectors, field)  # refuses NaN, inf and zero rows


def _read_table(spec: str, field: str) -> Window:
    """The successful rows' embeddings, row group by row group into one float32 array. Peak memory
    for 100,000 × 512 (205 MB of floats): ~500 MB over the process's own, where reading the whole
    table at once and keeping Arrow's freed pages took ~950 MB."""
    pairs: set[tuple[str, str]] = set()
    lengths: set[int] = set()
    blocks: list[np.ndarray] = []
    frames = 0
    for part in _parts(spec):
        for table in _row_groups(part, field):
            if "status" in table.schema.names:
                table = table.filter(pc.equal(table.column("status"), "ok"))
            if not table.num_rows:
                continue
            if "frame_index" in table.schema.names:
                frames += table.num_rows - table.column("frame_index").null_count
            names = table.select(["model", "version"]).group_by(["model", "version"]).aggregate([])
            pairs |= {(str(p["model"]), str(p["version"])) for p in names.to_pylist()}
            embedding = table.column("embedding")
            found = pc.unique(pc.list_value_length(embedding)).to_pylist()
            lengths |= {int(n) if n is not None else 0 for n in found}
            if len(lengths) == 1 and 0 not in lengths:
                flat = np.concatenate([c.flatten().to_numpy(zero_copy_only=False) for c in embedding.chunks])
                blocks.append(np.asarray(flat, dtype=np.float32).reshape(table.num_rows, -1))
            del table, embedding
            pa.default_memory_pool().release_unused()  # Arrow's allocator keeps freed pages otherwise
    if not pairs:
        raise InvalidInputError(field, f"{spec} holds no successful rows (an empty window)")
    families = {(family_name(model, field), version) for model, version in pairs}
    if len(families) > 1:
        raise InvalidInputError(field, f"{spec} mixes models: {sorted(families)}")
    if len(lengths) != 1 or 0 in lengths:
        raise InvalidInputError(field, f"{spec} holds embeddings of several lengths: {sorted(lengths)}")
    vectors = np.empty((sum(len(b) for b in blocks), blocks[0].shape[1]), dtype=np.float32)
    end = len(vectors)
    while blocks:  # from the last block, each freed once copied
        block = blocks.pop()
        vectors[end - len(block) : end] = block
        end -= len(block)
    del block
    family, version = families.pop()
    return Window(checked_vectors(vectors, field, spec), family, version, spec, frames)


def _read_index(spec: str, field: str) -> Window:
    try:
        index = VectorIndex.open(spec)
    except InvalidInputError as error:
        raise InvalidInputError(field, error.reason) from None
    with index:
        if not index.rows or index.family is None or index.version is None:
            raise InvalidInputError(field, f"{spec} is an empty index (an empty window)")
        vectors = np.vstack([chunk for _, chunk in index.iter_vectors()])
        return Window(checked_vectors(vectors, field, spec), index.family, index.version, spec)


def read_window(spec: ImageSource, field: str) -> Window | None:
    """The embeddings ``spec`` names when it is a table or an index; None when it names images.

    Raises:
        InvalidInputError: naming ``field`` (see the module docs).
    """
    if isinstance(spec, str) and not spec.strip():
        raise InvalidInputError(field, "is empty")
    if is_table(spec):
        return _read_table(str(spec), field)
    if isinstance(spec, str) and not any(c in spec for c in "*?[") and is_index(spec):
        return _read_index(spec, field)
    return None


def check_same(reference: tuple[str, str, int | None], current: tuple[str, str, int | None], source: str) -> None:
    """Refuse to compare embeddings of different models, versions or dimensions (``None``: not known yet).

    Raises:
        InvalidInputError: naming ``reference``.
    """
    (rf, rv, rd), (cf, cv, cd) = reference, current
    if (rf, rv) != (cf, cv) or (rd is not None and cd is not None and rd != cd):
        shown = [f"{f} {v}" + (f" ({d}-d)" if d else "") for f, v, d in (reference, current)]
        raise InvalidInputError(
            "reference", f"{source} holds {shown[0]} embeddings; the current window is {shown[1]}: not comparable"
        )
