"""Reading a drift window from embeddings tables row group by row group: the rows, their order and
the refusals must be what reading the whole table gives (pyarrow's `read_table`, rows filtered in
Python, is the oracle), across row groups and parts, with failed rows between them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefect_roboflow.blocks import InvalidInputError
from prefect_roboflow.flows._drift.windows import read_window
from prefect_roboflow.flows.embed_images import EMBEDDINGS_SCHEMA


def _records(rows: int, seed: int, dim: int = 16, **columns: Any) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    records = []
    for i in range(rows):
        failed = rng.random() < 0.2
        records.append({
            "image_ref": f"{seed}-{i}.jpg", "image_sha256": None, "model": columns.get("model", "clip"),
            "version": "ViT-B-16", "embedding": None if failed else (rng.standard_normal(dim) * 3).tolist(),
            "status": "failed" if failed else "ok", "error": "broken" if failed else None,
        })  # fmt: skip
    return records


def _write(path: Path, records: list[dict[str, Any]], row_group_size: int = 7) -> str:
    pq.write_table(pa.Table.from_pylist(records, schema=EMBEDDINGS_SCHEMA), path, row_group_size=row_group_size)
    return str(path)


def _expected(*paths: str) -> np.ndarray:
    rows = [r for p in paths for r in pq.read_table(p).to_pylist() if r["status"] == "ok"]
    vectors = np.array([r["embedding"] for r in rows], dtype=np.float64)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_row_groups_and_parts_give_the_whole_tables_rows(tmp_path: Path) -> None:
    single = _write(tmp_path / "one.parquet", _records(50, seed=1))
    assert pq.ParquetFile(single).num_row_groups == 8
    window = read_window(single, "current")
    assert window is not None and (window.family, window.version, window.dim) == ("clip", "ViT-B-16", 16)
    np.testing.assert_allclose(window.vectors, _expected(single), rtol=1e-6)
    assert window.vectors.dtype == np.float32
    (tmp_path / "parts").mkdir()
    parts = [_write(tmp_path / "parts" / f"part-{k}.parquet", _records(20, seed=10 + k), 6) for k in range(3)]
    folder = read_window(str(tmp_path / "parts"), "reference")
    assert folder is not None
    np.testing.assert_allclose(folder.vectors, _expected(*parts), rtol=1e-6)


def test_refusals_found_in_any_row_group(tmp_path: Path) -> None:
    mixed = _write(tmp_path / "mixed.parquet", _records(20, seed=2) + _records(20, seed=3, model="perception_encoder"))
    lengths = _write(tmp_path / "lengths.parquet", _records(20, seed=4) + _records(20, seed=5, dim=8))
    failed = [dict(r, status="failed", embedding=None) for r in _records(30, seed=6)]
    empty = _write(tmp_path / "empty.parquet", failed)
    for path, words in ((mixed, "mixes models"), (lengths, "several lengths: [8, 16]"), (empty, "empty window")):
        with pytest.raises(InvalidInputError) as refused:
            read_window(path, "current")
        assert refused.value.field == "current" and words in refused.value.reason, path
