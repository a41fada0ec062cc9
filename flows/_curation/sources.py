"""What a curation run reads: a vector index as it is, or embeddings tables added to a scratch index.

A source is a vector index (a folder or object-storage URL), an embeddings table (``.parquet``
written by ``embed_images``, ``classify_images``, ``detect_crop_classify`` or ``auto_label``: every
row with an embedding), or a mapping ``{split name: index or table}``. A table's rows without an
embedding (``status == "failed"``) become the run's failed rows, with their error. A table's split
column (``split_column``) or the mapping's keys give each row its split; then each row's reference
is stored in the scratch index as ``<split>`` + `SPLIT_MARK` + reference, so that the same image in
two splits stays two rows (an index keeps one row per reference, hash and detection).

`Source.metadata` reads a block of rows' ``image_ref, image_sha256, detection_index`` back (the
split mark removed); `Source.keys` is every row's exact-copy key (sha256 and detection index,
folded into 63 bits) and `Source.digest` a hash of every row's identity, model and version: the
run's cache key is made from it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from prefect_roboflow.blocks.exceptions import InvalidInputError

from .._index.store import is_index
from .._storage.access import local_copy
from ..vector_index import RowBatch, VectorIndex, family_name
from .sketch import blocks

__all__ = ["FAILED_SCHEMA", "SPLIT_MARK", "Source", "open_source"]

#: Between a split's name and a reference in a scratch index's rows.
SPLIT_MARK = "\x1f"
#: Rows read back at once (metadata).
META_BLOCK = 262_144
FAILED_SCHEMA = pa.schema(
    [
        ("image_ref", pa.string()),
        ("image_sha256", pa.string()),
        ("detection_index", pa.int32()),
        ("split", pa.string()),
        ("error", pa.string()),
    ]
)


@dataclass
class Source:
    """An opened source: its index (the source's own or a scratch one), each row's split, its failed rows."""

    index: VectorIndex
    splits: np.ndarray  # each row's split code into split_names, -1: none
    split_names: list[str]
    failed: pa.Table
    marked: bool  # references carry their split (a scratch index of several splits)
    digest: str = ""
    keys: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))

    def metadata(self, start: int, stop: int) -> pa.Table:
        """``image_ref, image_sha256, detection_index`` of rows ``start:stop`` (split marks removed)."""
        table = self.index.metadata(np.arange(start, stop))
        if not self.marked:
            return table
        refs = pc.replace_substring_regex(table.column("image_ref"), f"^[^{SPLIT_MARK}]*{SPLIT_MARK}", "")
        return table.set_column(0, "image_ref", refs)

    def read_identity(self) -> None:
        """Every row's exact-copy key and the digest of all rows (one pass over the metadata)."""
        digest = hashlib.sha256(f"{self.index.family}|{self.index.version}|{self.index.dim}|{self.index.rows}".encode())
        keys = np.full(self.index.rows, -1, dtype=np.int64)
        for start in range(0, self.index.rows, META_BLOCK):
            stop = min(self.index.rows, start + META_BLOCK)
            table = self.index.metadata(np.arange(start, stop))
            for name in ("image_ref", "image_sha256", "detection_index"):
                column = table.column(name).combine_chunks()  # fresh buffers: the same rows hash the same
                for buffer in column.buffers():
                    digest.update(b"-" if buffer is None else memoryview(buffer))
            keys[start:stop] = _copy_keys(table.column("image_sha256"), table.column("detection_index"))
        digest.update(np.ascontiguousarray(self.splits).tobytes())
        digest.update("\n".join(self.split_names).encode())
        self.keys, self.digest = keys, digest.hexdigest()


_HEX = np.full(256, 255, dtype=np.uint8)
_HEX[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10)
_HEX[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16)
_HEX[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)


def _copy_keys(shas: pa.ChunkedArray, detections: pa.ChunkedArray) -> np.ndarray:
    """63-bit keys of (sha256, detection index): the hash's first 16 hex digits mixed with the
    detection; -1 where the hash is missing or not hex."""
    sha = pa.concat_arrays([c.cast(pa.string()) for c in shas.chunks]) if shas.num_chunks else pa.array([], pa.string())
    n = len(sha)
    out = np.full(n, -1, dtype=np.int64)
    if n == 0:
        return out
    offsets = np.frombuffer(sha.buffers()[1], dtype=np.int32)[sha.offset : sha.offset + n + 1]
    data = np.frombuffer(sha.buffers()[2], dtype=np.uint8) if sha.buffers()[2] is not None else np.zeros(0, np.uint8)
    valid = (np.diff(offsets) >= 16) & ~np.asarray(sha.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    starts = offsets[:-1][valid].astype(np.int64)
    digits = _HEX[data[starts[:, None] + np.arange(16)[None, :]]] if len(starts) else np.zeros((0, 16), np.uint8)
    good = (digits != 255).all(axis=1)
    value = np.zeros(len(starts), dtype=np.uint64)
    for i in range(16):
        value = (value << np.uint64(4)) | digits[:, i].astype(np.uint64)
    det = pc.fill_null(
        pa.chunked_array(detections.chunks, pa.int32()) if detections.num_chunks else pa.chunked_array([], pa.int32()),
        -1,
    )
    det_values = np.asarray(det.to_numpy(), dtype=np.int64)[valid]
    mixed = value ^ ((det_values + 1).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    keys = (mixed & np.uint64(0x7FFF_FFFF_FFFF_FFFF)).astype(np.int64)
    where = np.flatnonzero(valid)
    out[where[good]] = keys[good]
    return out


def open_source(source: str | Mapping[str, str], scratch: Path, split_column: str) -> Source:
    """Open ``source`` (see the module docs), building a scratch index under ``scratch`` when needed.

    Raises:
        InvalidInputError: naming ``source``: missing, neither a table nor an index, a table
            without the needed columns, splits of different models.
    """
    if isinstance(source, Mapping):
        if not source:
            raise InvalidInputError("source", "no split given")
        return _scratch(dict(source), scratch, split_column)
    if _is_index(source, "source"):
        index = _open_index(source, "source")
        return Source(index, np.full(index.rows, -1, dtype=np.int32), [], FAILED_SCHEMA.empty_table(), False)
    return _scratch({"": source}, scratch, split_column)


def _is_index(path: str, field: str) -> bool:
    if "://" not in path and not os.path.exists(path):
        raise InvalidInputError(field, f"{path} does not exist")
    return is_index(path, field)


def _open_index(path: str, field: str) -> VectorIndex:
    try:
        return VectorIndex.open(path)
    except InvalidInputError as error:
        raise InvalidInputError(field, error.reason) from None


def _scratch(parts: dict[str, str], scratch: Path, split_column: str) -> Source:
    """Every part's rows in one scratch index, in order; a table's failed rows set aside."""
    index = VectorIndex.open(scratch / "index", create=True)
    names: list[str] = []
    splits: list[np.ndarray] = []
    failed: list[pa.Table] = []
    marked = len(parts) > 1 or any(_has_column(path, split_column) for path in parts.values() if _is_table(path))
    identity: tuple[str, str] | None = None
    for name, path in parts.items():
        field = f"source[{name!r}]" if name else "source"
        for batch, split_of, family, version in _rows_of(path, field, split_column, name):
            if isinstance(batch, pa.Table):
                failed.append(batch)
                continue
            if identity is None:
                identity = (family, version)
            elif identity != (family, version):
                raise InvalidInputError(field, f"holds {family} {version} rows; the others {identity[0]} {identity[1]}")
            codes = np.array([_code(names, s) for s in split_of], dtype=np.int32)
            if marked:
                batch.image_refs = [
                    f"{s or ''}{SPLIT_MARK}{r}" for s, r in zip(split_of, batch.image_refs, strict=True)
                ]
            before = index.rows
            result = index.add(batch, family=family, version=version)
            if result.skipped:  # a row listed twice in one split: its first listing stands
                codes = _added_codes(index, before, codes, batch)
            splits.append(codes[: index.rows - before])
    table = pa.concat_tables(failed) if failed else FAILED_SCHEMA.empty_table()
    codes = np.concatenate(splits) if splits else np.empty(0, np.int32)
    if not marked:
        codes = np.full(index.rows, -1, dtype=np.int32)
    return Source(index, codes, names, table, marked)


def _added_codes(index: VectorIndex, before: int, codes: np.ndarray, batch: RowBatch) -> np.ndarray:
    """The split codes of the rows an add kept (it skips rows the index already holds)."""
    kept = index.metadata(np.arange(before, index.rows)).column("image_ref").to_pylist()
    position = {ref: i for i, ref in enumerate(batch.image_refs)}
    return np.asarray([codes[position[ref]] for ref in kept], dtype=np.int32)


def _code(names: list[str], split: str | None) -> int:
    if split is None:
        return -1
    if split not in names:
        names.append(split)
    return names.index(split)


def _is_table(path: str) -> bool:
    return path.endswith(".parquet") or ("://" not in path and os.path.isfile(path))


def _has_column(path: str, column: str) -> bool:
    try:
        with local_copy(path, field="source") as local:
            return column in pq.ParquetFile(local).schema_arrow.names
    except (InvalidInputError, OSError, pa.ArrowInvalid):
        return False


def _rows_of(
    path: str, field: str, split_column: str, split: str
) -> Iterator[tuple[RowBatch | pa.Table, list[str | None], str, str]]:
    """``(rows, their splits, family, version)`` of an index or a table, a block at a time; a
    table's failed rows come as a `pa.Table` of `FAILED_SCHEMA`."""
    if _is_index(path, field):
        index = _open_index(path, field)
        for start, vectors in blocks(index):
            meta = index.metadata(np.arange(start, start + len(vectors)))
            yield (
                RowBatch(
                    meta.column("image_ref").to_pylist(),
                    meta.column("image_sha256").to_pylist(),
                    vectors,
                    meta.column("detection_index").to_pylist(),
                ),
                [split or None] * len(vectors),
                str(index.family),
                str(index.version),
            )
        return
    with local_copy(path, field=field) as local:
        yield from _table_rows(local, path, field, split_column, split)


def _table_rows(
    local: Path, path: str, field: str, split_column: str, split: str
) -> Iterator[tuple[RowBatch | pa.Table, list[str | None], str, str]]:
    try:
        table = pq.ParquetFile(local)
    except (OSError, pa.ArrowInvalid) as error:
        raise InvalidInputError(field, f"{path} is not a readable parquet table: {error}") from None
    names = table.schema_arrow.names
    missing = {"image_ref", "image_sha256", "model", "version", "embedding"} - set(names)
    if missing:
        raise InvalidInputError(field, f"{path} lacks column(s) {sorted(missing)}")
    columns = [
        c
        for c in (
            "image_ref",
            "image_sha256",
            "detection_index",
            "model",
            "version",
            "embedding",
            "status",
            "error",
            split_column,
        )
        if c in names
    ]
    for batch in table.iter_batches(columns=columns, batch_size=50_000):
        rows = pa.Table.from_batches([batch])
        n = rows.num_rows
        detections = rows.column("detection_index") if "detection_index" in names else pa.nulls(n, pa.int32())
        splits = (
            rows.column(split_column).cast(pa.string()).to_pylist() if split_column in names else [split or None] * n
        )
        splits = [s if s is not None else (split or None) for s in splits]
        has_vector = pc.invert(pc.is_null(rows.column("embedding")))
        if "status" in names:
            has_vector = pc.and_(has_vector, pc.not_equal(pc.fill_null(rows.column("status"), ""), "failed"))
        mask = np.asarray(has_vector.to_numpy(zero_copy_only=False), dtype=bool)
        if (~mask).any():
            bad = np.flatnonzero(~mask)
            errors = rows.column("error").take(bad) if "error" in names else pa.nulls(len(bad), pa.string())
            yield (
                pa.table(
                    [
                        rows.column("image_ref").take(bad),
                        rows.column("image_sha256").take(bad),
                        pc.cast(detections.take(bad), pa.int32()),
                        pa.array([splits[i] for i in bad], pa.string()),
                        pc.fill_null(pc.cast(errors, pa.string()), "no embedding"),
                    ],
                    schema=FAILED_SCHEMA,
                ),
                [],
                *_model(rows, path, field),
            )
        good = np.flatnonzero(mask)
        if len(good) == 0:
            continue
        ok = rows.take(good)
        embedding = ok.column("embedding").combine_chunks()
        lengths = pc.list_value_length(embedding).to_numpy(zero_copy_only=False)
        if len(set(lengths.tolist())) != 1:
            raise InvalidInputError(field, f"{path}: embeddings of several lengths {sorted(set(lengths.tolist()))}")
        vectors = np.asarray(pc.list_flatten(embedding).to_numpy(zero_copy_only=False), dtype=np.float32)
        yield (
            RowBatch(
                ok.column("image_ref").to_pylist(),
                ok.column("image_sha256").to_pylist(),
                vectors.reshape(len(good), int(lengths[0])),
                pc.cast(detections.take(good), pa.int32()).to_pylist(),
            ),
            [splits[i] for i in good],
            *_model(ok, path, field),
        )


def _model(rows: pa.Table, path: str, field: str) -> tuple[str, str]:
    pairs = {
        (str(m), str(v))
        for m, v in zip(rows.column("model").to_pylist(), rows.column("version").to_pylist(), strict=True)
        if m is not None
    }
    if len(pairs) > 1:
        raise InvalidInputError(field, f"{path} mixes models: {sorted(pairs)}")
    if not pairs:
        return "clip", ""
    model, version = pairs.pop()
    return family_name(model, field), version


def describe(source: str | Mapping[str, Any]) -> str:
    """The source for a summary: its path, or its splits."""
    if isinstance(source, Mapping):
        return ", ".join(f"{k}: {v}" for k, v in source.items())
    return str(source)
