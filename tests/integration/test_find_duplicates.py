"""`find_duplicates` on planted groups (exact and through the IVF-PQ index), its bad inputs, and end
to end on the real server: byte-identical copies embedded by `embed_images` come back as exact
groups, the output loads with pyarrow, pandas and duckdb, and the index answers text and image
queries through the library API."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from prefect_roboflow.blocks.exceptions import InvalidInputError
from prefect_roboflow.flows import embed_images
from prefect_roboflow.flows.find_duplicates import DUPLICATES_SCHEMA, find_duplicates
from prefect_roboflow.flows.vector_index import RowBatch, VectorIndex, update_index_from_table

DIM = 512


def clustered(n: int, seed: int = 0) -> np.ndarray:
    """Unit vectors in clusters of ~300 (neighbours at cosine ~0.6, far from any duplicate threshold)."""
    rng = np.random.default_rng(seed)
    clusters = max(1, n // 300)
    centres = rng.standard_normal((clusters, DIM), dtype=np.float32)
    labels = rng.integers(0, clusters, n)
    bases = rng.standard_normal((clusters, 32, DIM), dtype=np.float32) * 0.25
    out = centres[labels] + np.einsum("nk,nkd->nd", rng.standard_normal((n, 32), dtype=np.float32), bases[labels])
    out += 0.05 * rng.standard_normal((n, DIM), dtype=np.float32)
    return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def near(vector: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A near copy: cosine ≈ 0.975 to ``vector``."""
    moved = vector + 0.01 * rng.standard_normal(DIM, dtype=np.float32)
    return (moved / np.linalg.norm(moved)).astype(np.float32)


def planted(n: int, seed: int = 0) -> tuple[np.ndarray, list[str], set[frozenset[int]], dict[int, str]]:
    """``n`` rows with planted groups: 10 exact pairs, 10 near pairs, a near chain of 3, and a
    group of an original, its exact copy and a near copy. Returns vectors, sha256s, the groups
    (row numbers) and the expected group kind by group's first row."""
    vectors, rng = clustered(n, seed), np.random.default_rng(seed + 1)
    shas = [hashlib.sha256(f"{seed}-{i}".encode()).hexdigest() for i in range(n)]
    rows = iter(rng.permutation(n).tolist())
    groups: set[frozenset[int]] = set()
    kinds: dict[int, str] = {}
    for i in range(20):
        a, b = next(rows), next(rows)
        if i < 10:
            vectors[b], shas[b] = vectors[a], shas[a]
        else:
            vectors[b] = near(vectors[a], rng)
        groups.add(frozenset((a, b)))
        kinds[min(a, b)] = "exact" if i < 10 else "near"
    a, b, c = next(rows), next(rows), next(rows)
    vectors[b] = near(vectors[a], rng)
    vectors[c] = near(vectors[b], rng)  # a–c below the threshold: joined through b
    groups.add(frozenset((a, b, c)))
    kinds[min(a, b, c)] = "near"
    x, y, z = next(rows), next(rows), next(rows)
    vectors[y], shas[y] = vectors[x], shas[x]
    vectors[z] = near(vectors[x], rng)
    groups.add(frozenset((x, y, z)))
    kinds[min(x, y, z)] = "near"
    return vectors, shas, groups, kinds


def write_table(path: Path, vectors: np.ndarray, shas: list[str]) -> None:
    n = len(vectors)
    pq.write_table(
        pa.table(
            {
                "image_ref": [f"img/{i:05d}.jpg" for i in range(n)],
                "image_sha256": shas,
                "model": ["Clip"] * n,
                "version": ["ViT-B-16"] * n,
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), DIM).cast(
                    pa.list_(pa.float32())
                ),
                "status": ["ok"] * n,
                "error": pa.nulls(n, pa.string()),
            }
        ),
        path,
    )


def found_groups(path: str) -> tuple[set[frozenset[int]], dict[int, str]]:
    table = pq.read_table(path).to_pandas()
    table["row"] = table["member"].str.slice(4, 9).astype(int)
    groups = {frozenset(g["row"].tolist()) for _, g in table.groupby("group")}
    kinds = {int(g["row"].min()): str(g["group_kind"].iloc[0]) for _, g in table.groupby("group")}
    return groups, kinds


def test_planted_groups_from_a_table(tmp_path: Path) -> None:
    vectors, shas, groups, kinds = planted(3_000)
    write_table(tmp_path / "embeddings.parquet", vectors, shas)
    result = find_duplicates(str(tmp_path / "embeddings.parquet"), str(tmp_path / "out"), threshold=0.96)
    assert (result.rows, result.exact_groups, result.near_groups) == (3_000, 10, 12)
    assert found_groups(result.duplicates_path) == (groups, kinds)
    table = pd.read_parquet(result.duplicates_path)
    assert pq.read_schema(result.duplicates_path).equals(DUPLICATES_SCHEMA)
    exact = table[table["kind"] == "exact"]
    np.testing.assert_allclose(exact["similarity"], 1.0, atol=1e-5)  # float32 dot of identical unit vectors
    assert (table.groupby("group")["kind"].apply(lambda k: (k == "representative").sum()) == 1).all()
    assert (table["similarity"][table["kind"] == "near"] < 0.999).all()
    # each member's representative is the group's representative row
    assert (table.groupby("group")["representative"].nunique() == 1).all()


def test_planted_groups_through_the_ivf_pq_index(tmp_path: Path) -> None:
    vectors, shas, groups, kinds = planted(12_000, seed=5)
    index = VectorIndex.open(tmp_path / "index", create=True, exact_below=10_000)
    refs = [f"img/{i:05d}.jpg" for i in range(len(vectors))]
    index.add(RowBatch(refs, shas, vectors), family="clip", version="ViT-B-16")
    assert index.ann_rows == 12_000  # the kNN goes through IVF-PQ, not an exact scan
    result = find_duplicates(str(tmp_path / "index"), str(tmp_path / "out"), threshold=0.96)
    assert found_groups(result.duplicates_path) == (groups, kinds)


def test_a_table_without_duplicates_gives_an_empty_table(tmp_path: Path) -> None:
    vectors = clustered(500, seed=3)
    write_table(tmp_path / "t.parquet", vectors, [str(i) for i in range(500)])
    result = find_duplicates(str(tmp_path / "t.parquet"), str(tmp_path / "out"))
    assert (result.exact_groups, result.near_groups, result.rows_in_groups) == (0, 0, 0)
    assert pq.read_table(result.duplicates_path).num_rows == 0
    assert pq.read_schema(result.duplicates_path).equals(DUPLICATES_SCHEMA)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": 1.5}, "threshold"),
        ({"k": 0}, "k"),
        ({"source": "/nonexistent/embeddings.parquet"}, "source"),
        ({"source": "FOLDER"}, "source"),
        ({"source": "NOT_PARQUET"}, "source"),
    ],
)
def test_bad_inputs_are_typed_errors(tmp_path: Path, kwargs: dict, field: str) -> None:
    write_table(tmp_path / "t.parquet", clustered(50), [str(i) for i in range(50)])
    (tmp_path / "folder").mkdir()
    (tmp_path / "notes.parquet").write_text("not parquet")
    arguments = {"source": str(tmp_path / "t.parquet"), "out_dir": str(tmp_path / "out"), **kwargs}
    arguments["source"] = {"FOLDER": str(tmp_path / "folder"), "NOT_PARQUET": str(tmp_path / "notes.parquet")}.get(
        arguments["source"], arguments["source"]
    )
    with pytest.raises(InvalidInputError) as caught:
        find_duplicates(**arguments)
    assert caught.value.field == field
    assert not (tmp_path / "out" / "duplicates.parquet").exists()


def _artifact_keys(flow_run_id) -> set[str]:
    async def read() -> set[str]:
        async with get_client() as client:
            artifacts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
            )
        return {a.key for a in artifacts if a.key}

    return asyncio.run(read())


@pytest.mark.server
def test_real_server_exact_duplicates_and_index_queries(
    inference_url: str, image_paths: list[Path], tmp_path: Path
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in image_paths[:8]:
        shutil.copy(path, folder / path.name)
    copies = {image_paths[i].name: f"copy_{i}{image_paths[i].suffix}" for i in (0, 3, 5)}
    for original, copy in copies.items():
        shutil.copy(folder / original, folder / copy)  # byte-identical under another name
    embedded = embed_images(str(folder), str(tmp_path / "emb"), server=inference_url, cache_storage=str(tmp_path / "c"))
    assert embedded.succeeded == 11

    # Placeholder weights put different photos at cosine 0.975-0.999: only identical ones pass 0.99999.
    state = find_duplicates(embedded.embeddings_path, str(tmp_path / "out"), threshold=0.99999, return_state=True)
    result = state.result()
    assert (result.rows, result.exact_groups) == (11, 3)
    path = result.duplicates_path
    by_arrow = pq.read_table(path)
    by_pandas = pd.read_parquet(path)
    by_duckdb = duckdb.sql(
        f"select list_sort(list(member)) as members from read_parquet('{path}') "
        "where group_kind = 'exact' group by \"group\" order by 1"
    ).fetchall()
    names = sorted(sorted([str(folder / a), str(folder / b)]) for a, b in copies.items())
    assert [row[0] for row in by_duckdb] == names
    exact = by_pandas[by_pandas["group_kind"] == "exact"]
    assert len(exact) == 6 and by_arrow.schema.equals(DUPLICATES_SCHEMA)
    assert set(exact["kind"]) == {"representative", "exact"}
    np.testing.assert_allclose(exact["similarity"], 1.0, atol=1e-5)
    assert "find-duplicates-summary" in _artifact_keys(state.state_details.flow_run_id)

    added = update_index_from_table(embedded.embeddings_path, tmp_path / "index")
    assert added.added == 11
    index = VectorIndex.open(tmp_path / "index")
    assert (index.family, index.dim) == ("clip", 512)
    text_hits = index.search("a photo of a shelf", top_k=5, server=inference_url)
    assert [h.rank for h in text_hits] == [1, 2, 3, 4, 5]
    assert [h.score for h in text_hits] == sorted((h.score for h in text_hits), reverse=True)
    query = folder / image_paths[2].name
    image_hit = index.search(query, top_k=1, server=inference_url)[0]
    assert image_hit.image_sha256 == hashlib.sha256(query.read_bytes()).hexdigest()
    assert image_hit.score == pytest.approx(1.0, abs=1e-4)
    # Bad input is refused before any request: this server URL has nothing listening.
    with pytest.raises(InvalidInputError) as caught:
        index.search("a photo of a shelf", top_k=0, server="http://127.0.0.1:9")
    assert caught.value.field == "top_k"
