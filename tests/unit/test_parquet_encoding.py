"""Tables are written with a dictionary on every column but the floating-point ones (embeddings,
scores) and booleans: checked against what parquet itself records for each of the product's table schemas."""

from __future__ import annotations

import ast
import datetime as dt
import io
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import prefect_roboflow
import prefect_roboflow.blocks
import prefect_roboflow.flows
from prefect_roboflow.flows._curation.box_issues import BOX_ISSUES_SCHEMA
from prefect_roboflow.flows._curation.sources import FAILED_SCHEMA
from prefect_roboflow.flows._curation.table import CURATION_SCHEMA
from prefect_roboflow.flows._drift.history import DRIFT_SCHEMA
from prefect_roboflow.flows._index.store import META_SCHEMA
from prefect_roboflow.flows._outputs.tables import (
    CLASSIFICATIONS_SCHEMA,
    DETECTIONS_SCHEMA,
    EMBEDDINGS_SCHEMA,
    REVIEW_SCHEMA,
    video_schema,
)
from prefect_roboflow.flows._storage.parquet import AtomicParquetWriter, dictionary_columns, write_whole
from prefect_roboflow.flows.find_duplicates import DUPLICATES_SCHEMA

SCHEMAS = {
    "embeddings": EMBEDDINGS_SCHEMA,
    "classifications": CLASSIFICATIONS_SCHEMA,
    "detections": DETECTIONS_SCHEMA,
    "tracked video detections": video_schema(DETECTIONS_SCHEMA, tracked=True),
    "review": REVIEW_SCHEMA,
    "duplicates": DUPLICATES_SCHEMA,
    "curation": CURATION_SCHEMA,
    "curation failures": FAILED_SCHEMA,
    "box issues": BOX_ISSUES_SCHEMA,
    "drift": DRIFT_SCHEMA,
    "index meta": META_SCHEMA,
}
DICTIONARY = {"RLE_DICTIONARY", "PLAIN_DICTIONARY"}


def _value(kind: pa.DataType, i: int) -> Any:
    """A value of ``kind`` (row ``i``: rows differ, so a dictionary has something to hold)."""
    if pa.types.is_struct(kind):
        return {f.name: _value(f.type, i) for f in kind}
    if pa.types.is_fixed_size_list(kind):
        return [_value(kind.value_type, i + j) for j in range(kind.list_size)]
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return [_value(kind.value_type, i + j) for j in range(3)]
    if pa.types.is_floating(kind):
        return 0.5 + i
    if pa.types.is_integer(kind):
        return i % 100
    if pa.types.is_boolean(kind):
        return bool(i % 2)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return f"value {i % 7}"
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return b"x" * (i % 5)
    if pa.types.is_timestamp(kind):
        return dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(seconds=i)
    raise AssertionError(f"no test value for {kind}")


@pytest.mark.parametrize("writer", ["streamed", "whole"])
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_every_column_but_floats_has_a_dictionary_as_parquet_records_it(name: str, writer: str, tmp_path: Path) -> None:
    schema = SCHEMAS[name]
    rows = [{f.name: _value(f.type, i) for f in schema} for i in range(20)]
    path = tmp_path / "t.parquet"
    if writer == "streamed":
        with AtomicParquetWriter(path, schema) as sink:
            sink.write(rows)
    else:
        write_whole(pa.Table.from_pylist(rows, schema=schema), path)
    metadata = pq.ParquetFile(path).metadata
    encodings = {
        metadata.schema.column(i).path: set(metadata.row_group(0).column(i).encodings)
        for i in range(metadata.num_columns)
    }
    floats = {
        metadata.schema.column(i).path
        for i in range(metadata.num_columns)
        if metadata.schema.column(i).physical_type in ("FLOAT", "DOUBLE")
    }
    booleans = {
        metadata.schema.column(i).path
        for i in range(metadata.num_columns)
        if metadata.schema.column(i).physical_type == "BOOLEAN"
    }
    named = dictionary_columns(schema)
    assert set(named) <= set(encodings), set(named) - set(encodings)  # every path named is a real column
    assert set(named) == set(encodings) - floats - booleans  # parquet has no dictionary for booleans
    for column, used in encodings.items():
        assert bool(used & DICTIONARY) == (column in named), (column, used)
    assert pq.ParquetFile(path).read().to_pylist() == pa.Table.from_pylist(rows, schema=schema).to_pylist()


def test_an_embeddings_table_is_smaller_than_with_a_dictionary_tried_on_its_floats(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((600, 512)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rows = [
        {"image_ref": f"/photos/{i}.jpg", "image_sha256": f"{i:064x}", "model": "clip", "version": "ViT-B-16"}
        | {"embedding": vectors[i], "status": "ok", "error": None}
        for i in range(600)
    ]
    path = tmp_path / "embeddings.parquet"
    with AtomicParquetWriter(path, EMBEDDINGS_SCHEMA) as sink:
        sink.write(rows)
    default = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=EMBEDDINGS_SCHEMA), default, compression="zstd")
    assert path.stat().st_size < 0.8 * len(default.getvalue())
    read = pq.ParquetFile(path).read()["embedding"].to_numpy(zero_copy_only=False)
    np.testing.assert_array_equal(np.stack(read), vectors)


def _writes_parquet(source: str) -> bool:
    """Whether a module calls a parquet writer of pyarrow (however imported) or pandas'/pyarrow.dataset's."""
    tree = ast.parse(source)
    writers = {"write_table", "ParquetWriter", "write_to_dataset"}
    modules = set()  # the names pyarrow.parquet is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.asname for a in node.names if a.name == "pyarrow.parquet" and a.asname}
        elif isinstance(node, ast.ImportFrom):
            if node.module == "pyarrow.parquet" and any(a.name in writers for a in node.names):
                return True
            if node.module == "pyarrow":
                modules |= {a.asname or a.name for a in node.names if a.name == "parquet"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            if node.attr in {"to_parquet", "write_dataset"}:
                return True
            owner = node.value
            if node.attr in writers and (
                (isinstance(owner, ast.Name) and owner.id in modules)
                or (isinstance(owner, ast.Attribute) and owner.attr == "parquet")  # pyarrow.parquet.write_table
            ):
                return True
    return False


def test_the_scan_below_finds_a_parquet_writer_however_it_is_imported() -> None:
    for source in (
        "import pyarrow.parquet as pq\npq.write_table(t, p)",
        "import pyarrow.parquet as io\nio.ParquetWriter(p, s)",
        "from pyarrow import parquet\nparquet.write_table(t, p)",
        "from pyarrow.parquet import (\n    ParquetWriter,\n)\nParquetWriter(p, s)",
        "import pyarrow.parquet\npyarrow.parquet.write_table(t, p)",
        "frame.to_parquet(p)",
        "import pyarrow.dataset as ds\nds.write_dataset(t, p)",
    ):
        assert _writes_parquet(source), source
    assert not _writes_parquet("import pyarrow.parquet as pq\npq.read_table(p)\nsink.write_table(t)")


def test_every_parquet_file_the_product_writes_goes_through_the_storage_layer() -> None:
    """Tables written elsewhere with pyarrow's defaults would try a dictionary on their floats (a
    drift baseline of 2,000 × 512 was 4.4 MB in 0.19 s that way, 3.8 MB in 0.02 s through it)."""
    roots = [Path(m.__file__).parent for m in (prefect_roboflow, prefect_roboflow.blocks, prefect_roboflow.flows)]
    sources = sorted({path for root in roots for path in root.rglob("*.py")})  # one tree when installed
    assert len(sources) > 80 and any(path.parent.name == "blocks" for path in sources)
    bypassing = [
        str(path)
        for path in sources
        if path.name != "parquet.py" or path.parent.name != "_storage"
        if _writes_parquet(path.read_text())
    ]
    assert not bypassing
    assert _writes_parquet(
        next(p for p in sources if p.name == "parquet.py" and p.parent.name == "_storage").read_text()
    )
