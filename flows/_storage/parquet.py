"""A parquet table streamed to a local temp file or spool and published whole; a table read whole."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, TypeVar

from prefect_roboflow.blocks.exceptions import InvalidInputError

from .atomic import LocalReplace
from .locate import locate
from .stores import LocalStore, output_error

if TYPE_CHECKING:
    import pyarrow as pa

_W = TypeVar("_W", bound="AtomicParquetWriter")
#: Rows gathered before they go to the file as one row group: one conversion per 1,024 rows, not
#: per batch (a batch of 64 rows made a row group of its own), and row groups readers skip well.
ROW_GROUP_ROWS = 1024
#: Rows per row group of a table written whole (`AtomicParquetWriter.write_table`).
TABLE_ROW_GROUP_ROWS = 65_536


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """The parquet columns (leaf paths, ``"embedding.list.element"``) of ``schema`` worth a
    dictionary: all but floating-point ones (and booleans, which parquet never gives one). Parquet
    tries a dictionary on every column by default and falls back to plain values once it outgrows
    its page; for embeddings, which never repeat, that try cost 6x the write's time and left a
    1.7 MB table for 600 × 512 floats that is 1.1 MB without it (zstd compresses plain floats better)."""
    import pyarrow as pa

    def leaves(path: str, kind: pa.DataType) -> list[tuple[str, pa.DataType]]:
        if pa.types.is_struct(kind):
            return [leaf for f in kind for leaf in leaves(f"{path}.{f.name}", f.type)]
        if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
            return leaves(f"{path}.list.element", kind.value_type)
        if pa.types.is_map(kind):
            return leaves(f"{path}.key_value.key", kind.key_type) + leaves(f"{path}.key_value.value", kind.item_type)
        return [(path, kind)]

    paths = [leaf for field in schema for leaf in leaves(field.name, field.type)]
    return [path for path, kind in paths if not (pa.types.is_floating(kind) or pa.types.is_boolean(kind))]


def write_whole(table: pa.Table, where: str | os.PathLike[str] | IO[bytes]) -> None:
    """``table`` written as one parquet file to a local path or a binary file object, encoded as
    every table of the product is (zstd; dictionaries as `dictionary_columns` says)."""
    import pyarrow.parquet as pq

    pq.write_table(table, where, compression="zstd", use_dictionary=dictionary_columns(table.schema))


class AtomicParquetWriter:
    """Stream rows into a parquet table that appears whole at ``url`` on `commit`.

    Rows are written in row groups of `ROW_GROUP_ROWS`. Local tables are written beside their
    final name and renamed into place; remote ones are spooled to a local temp file and uploaded
    as one object. On an exception nothing changes at ``url``. The result is a plain parquet object:
    pandas, pyarrow and duckdb read it from the bucket.

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
        self._writer: Any = pq.ParquetWriter(
            self._file, schema, compression="zstd", use_dictionary=dictionary_columns(schema)
        )
        self._pending: list[dict[str, Any]] = []

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Append rows (dicts keyed by column name)."""
        if rows:
            assert self._writer is not None, "writer already closed"
            self._pending.extend(rows)
            self.rows += len(rows)
            if len(self._pending) >= ROW_GROUP_ROWS:
                self._flush()

    def write_table(self, table: pa.Table) -> None:
        """Append the rows of an Arrow table of this schema (after the rows `write` holds), as row
        groups of `TABLE_ROW_GROUP_ROWS`: a table of millions of rows never goes through dicts."""
        assert self._writer is not None, "writer already closed"
        self._flush()
        self._writer.write_table(table.select(self.schema.names).cast(self.schema), row_group_size=TABLE_ROW_GROUP_ROWS)
        self.rows += table.num_rows

    def _flush(self) -> None:
        import pyarrow as pa

        if self._pending:
            self._writer.write_table(pa.Table.from_pylist(self._pending, schema=self.schema))
            self._pending = []

    def commit(self) -> str:
        """Finish the table and publish it at ``url``; returns ``url``."""
        assert self._writer is not None, "writer already closed"
        self._flush()
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
        self._pending = []
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


def read_table(ref: str | os.PathLike[str], *, columns: list[str] | None = None, field: str) -> pa.Table:
    """The parquet table at ``ref`` (a local path or any storage reference), read whole.

    Raises:
        InvalidInputError: naming ``field``: missing, unreadable, or not a parquet table.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .access import local_copy

    with local_copy(ref, field=field) as local:  # a bucket's table streamed to a temp file
        try:
            return pq.read_table(local, columns=columns)
        except FileNotFoundError:
            raise InvalidInputError(field, f"not found: {os.fspath(ref)}") from None
        except (OSError, pa.ArrowInvalid) as error:
            raise InvalidInputError(field, f"{os.fspath(ref)} is not a readable parquet table: {error}") from None
