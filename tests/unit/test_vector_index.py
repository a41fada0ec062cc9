"""The vector index: exact below its threshold, IVF-PQ above (recall against exact search),
incremental adds, refusal of other models and dimensions, typed errors, crash safety."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefect_roboflow.blocks.exceptions import InvalidInputError
from prefect_roboflow.flows._index.add import GRACE_SECONDS, _remove_leftovers
from prefect_roboflow.flows._index.store import _Store
from prefect_roboflow.flows.vector_index import (
    MANIFEST,
    AddResult,
    RowBatch,
    VectorIndex,
    family_name,
    update_index_from_table,
)

DIM = 512
ROWS = 20_000


def clustered(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    """Unit vectors in clusters of ~500, each spanning a random 32-d subspace (structured neighbours)."""
    rng = np.random.default_rng(seed)
    clusters = max(1, n // 500)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    labels = rng.integers(0, clusters, n)
    bases = rng.standard_normal((clusters, 32, dim), dtype=np.float32) * 0.25
    z = rng.standard_normal((n, 32), dtype=np.float32)
    out = centres[labels] + np.einsum("nk,nkd->nd", z, bases[labels])
    out += 0.05 * rng.standard_normal((n, dim), dtype=np.float32)
    return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def batch(vectors: np.ndarray, first: int = 0) -> RowBatch:
    ids = range(first, first + len(vectors))
    return RowBatch([f"img/{i}.jpg" for i in ids], [hashlib.sha256(str(i).encode()).hexdigest() for i in ids], vectors)


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :k]


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return clustered(ROWS)


@pytest.fixture(scope="module")
def queries(vectors: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(1)
    q = vectors[rng.choice(ROWS, 100, replace=False)] + 0.05 * rng.standard_normal((100, DIM), dtype=np.float32)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def ann_index(tmp_path_factory: pytest.TempPathFactory, vectors: np.ndarray) -> VectorIndex:
    """18,000 rows, then the 20,000-row superset: IVF-PQ (exact_below 10,000), extended once."""
    path = tmp_path_factory.mktemp("ann") / "index"
    index = VectorIndex.open(path, create=True, exact_below=10_000)
    first = index.add(batch(vectors[:18_000]), family="clip", version="ViT-B-16")
    assert (first.added, first.retrained, first.ann_rows) == (18_000, True, 18_000)
    return index


def test_ann_recall_at_10_against_exact_search(ann_index: VectorIndex, vectors: np.ndarray, queries: np.ndarray):
    scores, rows = ann_index.knn(queries, 10)
    truth = exact_top(vectors[:18_000], queries, 10)
    recall = np.mean([len(set(r) & set(t)) / 10 for r, t in zip(rows.tolist(), truth.tolist(), strict=True)])
    assert ann_index.ann_rows == 18_000
    assert recall >= 0.95
    # Scores are the exact cosines of the rows returned (re-ranked on the stored float32 vectors).
    expected = np.einsum("qkd,qd->qk", vectors[rows], queries)
    np.testing.assert_allclose(scores, expected, atol=1e-5)


def test_rerun_over_a_superset_adds_only_new_rows_without_retraining(ann_index: VectorIndex, vectors: np.ndarray):
    result = ann_index.add(batch(vectors), family="Clip", version="ViT-B-16")  # old class name: same family
    assert (result.added, result.skipped, result.rows, result.retrained) == (2_000, 18_000, ROWS, False)
    assert ann_index.ann_rows == ROWS
    reopened = VectorIndex.open(ann_index.path)
    hits = reopened.search(vectors[19_500], top_k=3)
    assert hits[0].row == 19_500 and hits[0].image_ref == "img/19500.jpg"
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert [h.rank for h in hits] == [1, 2, 3]
    again = reopened.add(batch(vectors), family="clip", version="ViT-B-16")
    assert (again.added, again.skipped) == (0, ROWS)


def test_the_async_twin_answers_as_search_does(ann_index: VectorIndex, queries: np.ndarray):
    async def in_async_code() -> tuple[list, list]:
        awaited = await ann_index.asearch(queries[3], top_k=5)
        dispatched = await ann_index.search(queries[3], top_k=5)  # in async code: the twin's coroutine
        return awaited, dispatched

    awaited, dispatched = asyncio.run(in_async_code())
    assert awaited == dispatched == ann_index.search(queries[3], top_k=5)


def test_below_the_threshold_search_is_exact(tmp_path: Path, vectors: np.ndarray, queries: np.ndarray):
    index = VectorIndex.open(tmp_path / "small", create=True)
    index.add(batch(vectors[:5_000]), family="clip", version="ViT-B-16")
    assert index.ann_rows == 0 and not any(p.suffix == ".faiss" for p in (tmp_path / "small").iterdir())
    _, rows = index.knn(queries, 10)
    np.testing.assert_array_equal(rows, exact_top(vectors[:5_000], queries, 10))
    hits = index.search(queries[0].tolist(), top_k=10_000)  # more than there are rows
    assert len(hits) == 5_000


def test_rows_carry_reference_sha256_family_and_version(ann_index: VectorIndex):
    segment = sorted(Path(ann_index.path).glob("seg-*.parquet"))[0]
    table = pq.read_table(segment)
    assert table.column_names == ["image_ref", "image_sha256", "detection_index", "family", "version"]
    assert set(table.column("family").to_pylist()) == {"clip"}
    assert set(table.column("version").to_pylist()) == {"ViT-B-16"}
    manifest = json.loads((Path(ann_index.path) / MANIFEST).read_text())
    assert (manifest["dim"], manifest["family"], manifest["version"]) == (DIM, "clip", "ViT-B-16")


@pytest.mark.parametrize(
    ("family", "version", "dim", "field"),
    [
        ("perception_encoder", "ViT-B-16", DIM, "family"),
        ("clip", "ViT-L-14", DIM, "version"),
        ("clip", "ViT-B-16", 256, "vectors"),
        ("owlv2", "ViT-B-16", DIM, "family"),
    ],
)
def test_refuses_rows_of_another_model_or_dimension(tmp_path: Path, family: str, version: str, dim: int, field: str):
    index = VectorIndex.open(tmp_path / "i", create=True)
    index.add(batch(clustered(100, seed=3)), family="clip", version="ViT-B-16")
    with pytest.raises(InvalidInputError) as caught:
        index.add(batch(clustered(10, seed=4, dim=dim), first=1000), family=family, version=version)
    assert caught.value.field == field
    assert VectorIndex.open(tmp_path / "i").rows == 100


def test_refuses_a_table_of_another_model(tmp_path: Path):
    index_path = tmp_path / "i"
    write_table(tmp_path / "a.parquet", clustered(50), model="Clip")
    write_table(tmp_path / "b.parquet", clustered(50, seed=2), model="PerceptionEncoder", first=50)
    update_index_from_table(tmp_path / "a.parquet", index_path)
    with pytest.raises(InvalidInputError) as caught:
        update_index_from_table(tmp_path / "b.parquet", index_path)
    assert caught.value.field == "family"


@pytest.mark.parametrize(
    ("query", "kwargs", "field"),
    [
        (np.ones(256, dtype=np.float32), {}, "query"),
        (np.ones(DIM, dtype=np.float32), {"top_k": 0}, "top_k"),
        (np.ones(DIM, dtype=np.float32), {"top_k": True}, "top_k"),
        (np.zeros(DIM, dtype=np.float32), {}, "query"),
        (np.full(DIM, np.nan, dtype=np.float32), {}, "query"),
        (np.ones(DIM, dtype=np.float32), {"nprobe": 100_000}, "nprobe"),
        (12, {}, "query"),
    ],
)
def test_bad_queries_are_typed_errors_naming_the_parameter(ann_index: VectorIndex, query, kwargs, field):
    with pytest.raises(InvalidInputError) as caught:
        ann_index.search(query, **kwargs)
    assert caught.value.field == field


def test_bad_index_paths_are_typed_errors(tmp_path: Path, vectors: np.ndarray):
    (tmp_path / "file.bin").write_bytes(b"x")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not an index")
    cases = [
        lambda: VectorIndex.open(tmp_path / "missing"),
        lambda: VectorIndex.open(tmp_path / "file.bin", create=True),
        lambda: VectorIndex.open(tmp_path / "other", create=True),
        lambda: VectorIndex.open(tmp_path / "x", create=True, exact_below=10),
    ]
    fields = ["path", "path", "path", "exact_below"]
    for case, field in zip(cases, fields, strict=True):
        with pytest.raises(InvalidInputError) as caught:
            case()
        assert caught.value.field == field
    built = tmp_path / "built"
    VectorIndex.open(built, create=True).add(batch(vectors[:200]), family="clip", version="v")
    (built / MANIFEST).write_text("{not json")
    with pytest.raises(InvalidInputError, match="corrupt") as caught:
        VectorIndex.open(built)
    assert caught.value.field == "path"
    (built / MANIFEST).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(InvalidInputError):
        VectorIndex.open(built)


def test_a_missing_or_truncated_segment_is_a_typed_error(tmp_path: Path, vectors: np.ndarray):
    path = tmp_path / "i"
    VectorIndex.open(path, create=True).add(batch(vectors[:300]), family="clip", version="v")
    segment = next(path.glob("seg-*.npy"))
    segment.write_bytes(segment.read_bytes()[:1000])
    with pytest.raises(InvalidInputError) as caught:
        VectorIndex.open(path)
    assert caught.value.field == "path"
    segment.unlink()
    with pytest.raises(InvalidInputError):
        VectorIndex.open(path)


def write_table(path: Path, vectors: np.ndarray, model: str = "clip", first: int = 0, **extra) -> None:
    n = len(vectors)
    ids = range(first, first + n)
    columns = {
        "image_ref": [f"img/{i}.jpg" for i in ids],
        "image_sha256": [hashlib.sha256(str(i).encode()).hexdigest() for i in ids],
        "model": [model] * n,
        "version": ["ViT-B-16"] * n,
        "embedding": pa.array([v.tolist() for v in vectors], pa.list_(pa.float32())),
        "status": ["ok"] * n,
        "error": [None] * n,
        **extra,
    }
    pq.write_table(pa.table(columns), path)


def test_update_from_a_table_adds_ok_rows_and_detections(tmp_path: Path):
    vectors = clustered(40, seed=9)
    status = ["ok"] * 30 + ["failed"] * 10
    detections = pa.array([i % 3 for i in range(40)], pa.int32())
    write_table(tmp_path / "t.parquet", vectors, model="PerceptionEncoder", status=status, detection_index=detections)
    result = update_index_from_table(tmp_path / "t.parquet", tmp_path / "i")
    assert (result.added, result.rows) == (30, 30)
    index = VectorIndex.open(tmp_path / "i")
    assert (index.family, index.version, index.dim) == ("perception_encoder", "ViT-B-16", DIM)
    hit = index.search(vectors[7], top_k=1)[0]
    assert (hit.row, hit.image_ref, hit.detection_index) == (7, "img/7.jpg", 1)
    assert update_index_from_table(tmp_path / "t.parquet", tmp_path / "i").added == 0
    with pytest.raises(InvalidInputError) as caught:
        update_index_from_table(tmp_path / "missing.parquet", tmp_path / "i")
    assert caught.value.field == "table_path"


def test_family_names_accept_old_class_names():
    assert family_name("Clip") == family_name("clip") == "clip"
    assert family_name("PerceptionEncoder") == "perception_encoder"
    with pytest.raises(InvalidInputError):
        family_name("OwlV2")


def test_an_object_storage_url_works_like_a_folder(vectors: np.ndarray):
    url = "memory://prefect-roboflow-tests/index"
    index = VectorIndex.open(url, create=True, exact_below=10_000)
    index.add(batch(vectors[:12_000]), family="clip", version="v")
    index.add(batch(vectors[:13_000]), family="clip", version="v")
    reopened = VectorIndex.open(url)
    assert (reopened.rows, reopened.ann_rows) == (13_000, 13_000)
    assert reopened.search(vectors[12_345], top_k=1)[0].row == 12_345


CRASHING_ADD = """
import sys, numpy as np
from prefect_roboflow.flows._index import store as _index_store
from prefect_roboflow.flows import vector_index as vi
point = sys.argv[2]
original = getattr(_index_store._Store, point)

def blocked(self, *args):
    print("reached", point, flush=True)
    sys.stdin.readline()  # held here until the test kills this process
    return original(self, *args)

setattr(_index_store._Store, point, blocked)
index = vi.VectorIndex.open(sys.argv[1])
vectors = np.load(sys.argv[3])
refs = [f"new/{i}.jpg" for i in range(len(vectors))]
index.add(vi.RowBatch(refs, [f"sha-{i}" for i in range(len(vectors))], vectors), family="clip", version="ViT-B-16")
"""


@pytest.mark.parametrize("point", ["put_file", "commit"])  # mid-segment-write; just before the commit
def test_a_crash_while_adding_leaves_the_previous_state_searchable(
    tmp_path: Path, vectors: np.ndarray, queries: np.ndarray, point: str
):
    path = tmp_path / "index"
    index = VectorIndex.open(path, create=True, exact_below=10_000)
    index.add(batch(vectors[:12_000]), family="clip", version="ViT-B-16")
    before = index.knn(queries, 10)
    np.save(tmp_path / "new.npy", vectors[12_000:14_000])
    script = tmp_path / "crash.py"
    script.write_text(textwrap.dedent(CRASHING_ADD))
    child = subprocess.Popen(
        [sys.executable, str(script), str(path), point, str(tmp_path / "new.npy")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().startswith("reached")
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    reopened = VectorIndex.open(path)
    assert (reopened.rows, reopened.ann_rows) == (12_000, 12_000)
    after = reopened.knn(queries, 10)
    np.testing.assert_array_equal(after[1], before[1])
    # The next add completes; what the killed one left stays while it is young (it might be a
    # running writer's), and goes once it is old.
    result = reopened.add(batch(vectors[:14_000]), family="clip", version="ViT-B-16")
    assert (result.added, result.rows) == (2_000, 14_000)
    referenced = json.loads((path / MANIFEST).read_text())
    names = {f"{s['name']}{ext}" for s in referenced["segments"] for ext in (".npy", ".parquet")}
    named = names | {MANIFEST, referenced["ann"]["file"], *referenced["retired"], f".{MANIFEST}.lock"}
    left = {p.name for p in path.iterdir()} - named
    killed = {".tmp"} if point == "put_file" else {".npy", ".parquet", ".faiss"}  # a temp file, or a whole add
    assert {Path(name).suffix for name in left} == killed
    store = _Store(path)
    assert _remove_leftovers(store, store.read_manifest()[0]) == []  # type: ignore[index]
    later = time.time() + GRACE_SECONDS + 60
    assert set(_remove_leftovers(store, store.read_manifest()[0], now=later)) == left  # type: ignore[index]
    assert {p.name for p in path.iterdir()} == named
    assert VectorIndex.open(path).search(vectors[13_000], top_k=1)[0].row == 13_000


@pytest.mark.parametrize("where", ["local", "memory"])
def test_threads_adding_at_once_add_every_row_once(tmp_path: Path, vectors: np.ndarray, where: str):
    # each thread its own VectorIndex; rows 0-99 of every add are added by every thread
    url = str(tmp_path / "index") if where == "local" else f"memory://prefect-roboflow-tests/threads-{tmp_path.name}"
    VectorIndex.open(url, create=True)
    start = threading.Barrier(4)

    def write(thread: int) -> None:
        start.wait()
        for add in range(5):
            own = 100 + 100 * (5 * thread + add)
            rows = np.r_[np.arange(100 * add, 100 * add + 20), np.arange(own, own + 100)]
            vectors_of = vectors[rows]
            VectorIndex.open(url).add(batch(vectors_of[:20], 100 * add), family="clip", version="v")
            VectorIndex.open(url).add(batch(vectors_of[20:], own), family="clip", version="v")

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(write, range(4)))
    index = VectorIndex.open(url)
    refs = index.metadata(np.arange(index.rows)).column("image_ref").to_pylist()
    expected = {f"img/{i}.jpg" for a in range(5) for i in range(100 * a, 100 * a + 20)}
    expected |= {f"img/{i}.jpg" for i in range(100, 100 + 100 * 20)}
    assert len(refs) == len(set(refs)) and set(refs) == expected


def test_a_writer_that_loses_the_race_commits_after_the_winner_without_its_rows(tmp_path: Path, vectors: np.ndarray):
    """Writer A reads the index, writes 1,000 rows and an IVF-PQ; writer B commits 1,000 rows, 500 of
    them A's, first. A's commit is refused; A rewrites its segment without B's rows and commits
    after B, keeping B's IVF-PQ (A's rows are scanned exactly)."""
    path = tmp_path / "index"
    VectorIndex.open(path, create=True, exact_below=10_000).add(batch(vectors[:12_000]), family="clip", version="v")
    a, b = VectorIndex.open(path), VectorIndex.open(path)
    ready, go = threading.Event(), threading.Event()
    commit = _Store.commit

    def held(self: _Store, *args: object) -> bool:
        if threading.current_thread().name == "writer-a" and not go.is_set():
            ready.set()
            go.wait()
        return commit(self, *args)  # type: ignore[arg-type]

    result: list[AddResult] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_Store, "commit", held)
        writer_a = threading.Thread(
            target=lambda: result.append(a.add(batch(vectors[13_000:14_000], 13_000), family="clip", version="v")),
            name="writer-a",
        )
        writer_a.start()
        assert ready.wait(timeout=600)
        won = b.add(batch(vectors[12_500:13_500], 12_500), family="clip", version="v")
        go.set()
        writer_a.join(timeout=600)
    assert (won.added, won.rows, won.ann_rows) == (1_000, 13_000, 13_000)  # B's IVF-PQ covers its rows
    assert (result[0].added, result[0].skipped, result[0].rows, result[0].ann_rows) == (500, 500, 13_500, 13_000)
    final = VectorIndex.open(path)
    refs = final.metadata(np.arange(final.rows)).column("image_ref").to_pylist()
    assert refs == [f"img/{i}.jpg" for i in [*range(12_000), *range(12_500, 13_500), *range(13_500, 14_000)]]
    # A's rows, past the IVF-PQ, found exactly; the IVF-PQ's own rows still found through it
    for row, vector_row in [(13_000, 13_500), (13_499, 13_999), (12_200, 12_700)]:
        assert final.search(vectors[vector_row], top_k=1)[0].row == row
    # A's uncommitted files (its IVF-PQ, its segment before the rewrite) went at once
    manifest = json.loads((path / MANIFEST).read_text())
    named = {f"{s['name']}{ext}" for s in manifest["segments"] for ext in (".npy", ".parquet")}
    named |= {MANIFEST, manifest["ann"]["file"], *manifest["retired"], f".{MANIFEST}.lock"}
    assert {p.name for p in path.iterdir()} == named
