"""A vector index in a bucket (moto's S3 server on loopback), as ``s3://bucket/idx`` and as a saved
prefect-aws ``S3Bucket`` block's ``block://s3-bucket/<name>/idx``: added to, reopened with an empty
local read cache, searched (planted vectors: a row's own vector finds that row), crash-safe under
SIGKILL, filled from a table in the bucket; image queries by ``s3://`` URL; ``embed_images`` and
``search_images`` end to end with ``index_path="block://…"``."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.fault_proxy import FaultProxy
from support.images import make_image
from support.s3 import MotoBucket, s3, s3_server, saved_bucket_block  # noqa: F401

from prefect_roboflow.blocks import InvalidInputError
from prefect_roboflow.flows import VectorIndex, embed_images, search_images
from prefect_roboflow.flows._index.add import GRACE_SECONDS, _remove_leftovers
from prefect_roboflow.flows._index.store import _Store
from prefect_roboflow.flows.vector_index import MANIFEST, RowBatch, update_index_from_table

DIM = 32


def planted(n: int, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((n, DIM), dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def rows(vectors: np.ndarray, first: int = 0) -> RowBatch:
    ids = range(first, first + len(vectors))
    return RowBatch([f"img/{i}.jpg" for i in ids], [hashlib.sha256(str(i).encode()).hexdigest() for i in ids], vectors)


def assert_finds_itself(index: VectorIndex, vectors: np.ndarray, picks: list[int]) -> None:
    for row in picks:
        hit = index.search(vectors[row], top_k=1)[0]
        assert (hit.row, hit.image_ref) == (row, f"img/{row}.jpg")


@pytest.fixture(params=["s3", "block"])
def location(request: pytest.FixtureRequest, s3: MotoBucket) -> tuple[str, str]:  # noqa: F811
    """``(index location, key prefix of its objects in the bucket)``."""
    if request.param == "s3":
        return f"s3://{s3.bucket}/idx", "idx/"
    block = saved_bucket_block(s3.endpoint, s3.bucket, folder="blocks")
    return f"block://s3-bucket/{block._block_document_name}/idx", "blocks/idx/"


def test_a_bucket_index_adds_reopens_and_searches(
    location: tuple[str, str],
    s3: MotoBucket,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, prefix = location
    vectors = planted(13_000)
    index = VectorIndex.open(url, create=True, exact_below=10_000)
    first = index.add(rows(vectors[:12_000]), family="clip", version="ViT-B-16")
    assert (first.added, first.retrained, first.ann_rows) == (12_000, True, 12_000)  # an IVF-PQ is written
    first_ann = json.loads(s3.get(prefix + MANIFEST))["ann"]["file"]
    second = index.add(rows(vectors), family="clip", version="ViT-B-16")
    assert (second.added, second.skipped, second.rows) == (1_000, 12_000, 13_000)
    manifest = json.loads(s3.get(prefix + MANIFEST))
    names = {f"{s['name']}{ext}" for s in manifest["segments"] for ext in (".npy", ".parquet")}
    # the first IVF-PQ, replaced by the second add's, stays a while for readers of the first manifest
    assert list(manifest["retired"]) == [first_ann] != [manifest["ann"]["file"]]
    assert set(s3.keys(prefix)) == {prefix + n for n in names | {MANIFEST, manifest["ann"]["file"], first_ann}}

    cache = tmp_path / "fresh-tmp"  # reopened where nothing is cached: every file streamed from the bucket
    cache.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(cache))
    reopened = VectorIndex.open(url)
    assert (reopened.rows, reopened.ann_rows, reopened.family, reopened.dim) == (13_000, 13_000, "clip", DIM)
    assert_finds_itself(reopened, vectors, [0, 4_321, 11_999, 12_000, 12_999])
    downloaded = {p.name for p in cache.rglob("*") if p.is_file()}
    assert {f"{s['name']}.npy" for s in manifest["segments"]} | {manifest["ann"]["file"]} <= downloaded


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
def test_a_killed_add_leaves_a_bucket_index_searchable(
    location: tuple[str, str],
    s3: MotoBucket,  # noqa: F811
    tmp_path: Path,
    point: str,
) -> None:
    from prefect.settings import PREFECT_API_URL

    url, prefix = location
    vectors = planted(600, seed=1)
    index = VectorIndex.open(url, create=True)
    index.add(rows(vectors[:400]), family="clip", version="ViT-B-16")
    np.save(tmp_path / "new.npy", vectors[400:])
    script = tmp_path / "crash.py"
    script.write_text(textwrap.dedent(CRASHING_ADD))
    child = subprocess.Popen(
        [sys.executable, str(script), url, point, str(tmp_path / "new.npy")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())},  # the block loads by name
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().startswith("reached")
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    reopened = VectorIndex.open(url)
    assert reopened.rows == 400
    assert_finds_itself(reopened, vectors, [0, 199, 399])
    result = reopened.add(rows(vectors), family="clip", version="ViT-B-16")  # completes
    assert (result.added, result.rows) == (200, 600)
    assert_finds_itself(VectorIndex.open(url), vectors, [0, 450, 599])
    manifest = json.loads(s3.get(prefix + MANIFEST))
    named = {prefix + f"{s['name']}{ext}" for s in manifest["segments"] for ext in (".npy", ".parquet")}
    named.add(prefix + MANIFEST)
    # What the killed add left stays while it is young (it might be a running writer's): its
    # segment (killed before the commit), none (killed writing its first file); gone once old.
    left = set(s3.keys(prefix)) - named
    assert len(left) == (2 if point == "commit" else 0)
    store = _Store(url)
    assert _remove_leftovers(store, store.read_manifest()[0]) == []  # type: ignore[index]
    later = time.time() + GRACE_SECONDS + 60
    assert {prefix + n for n in _remove_leftovers(store, store.read_manifest()[0], now=later)} == left  # type: ignore[index]
    assert set(s3.keys(prefix)) == named


def write_table(vectors: np.ndarray) -> bytes:
    n = len(vectors)
    columns = {
        "image_ref": [f"img/{i}.jpg" for i in range(n)],
        "image_sha256": [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)],
        "model": ["clip"] * n,
        "version": ["ViT-B-16"] * n,
        "embedding": pa.array([v.tolist() for v in vectors], pa.list_(pa.float32())),
        "status": ["ok"] * (n - 5) + ["failed"] * 5,
        "error": [None] * n,
    }
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(columns), sink)
    return bytes(sink.getvalue().to_pybytes())


def test_update_index_from_a_table_into_a_bucket_index(
    location: tuple[str, str],
    s3: MotoBucket,  # noqa: F811
    tmp_path: Path,
) -> None:
    url, _ = location
    vectors = planted(300, seed=2)
    (tmp_path / "t.parquet").write_bytes(write_table(vectors[:200]))
    table_url = s3.put("tables/t.parquet", write_table(vectors))  # a table in the bucket, streamed to a temp file
    assert update_index_from_table(tmp_path / "t.parquet", url).added == 195
    again = update_index_from_table(table_url, url)
    assert (again.added, again.skipped, again.rows) == (100, 195, 295)
    assert_finds_itself(VectorIndex.open(url), vectors, [0, 194, 200, 294])
    with pytest.raises(InvalidInputError) as caught:
        update_index_from_table(f"s3://{s3.bucket}/tables/missing.parquet", url)
    assert caught.value.field == "table_path"


def test_bad_bucket_index_locations_are_typed_errors(s3: MotoBucket) -> None:  # noqa: F811
    cases = [
        (f"s3://no-such-bucket-{s3.bucket}/idx", "does not exist"),
        ("block://s3-bucket/no-such-block/idx", "no saved block"),
        ("block://S3 Bucket/x/idx", "block://<block-type-slug>"),
    ]
    for url, reason in cases:
        with pytest.raises(InvalidInputError, match=reason) as caught:
            VectorIndex.open(url, create=True)
        assert caught.value.field == "path"


@pytest.mark.server
def test_an_image_query_by_s3_url_finds_what_the_local_file_finds(
    s3: MotoBucket,  # noqa: F811
    image_paths: list[Path],
    inference_url: str,
    tmp_path: Path,
) -> None:
    index_url = f"s3://{s3.bucket}/idx"
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in image_paths[:6]:
        (photos / path.name).write_bytes(path.read_bytes())
    run = embed_images(str(photos), str(tmp_path / "out"), server=inference_url, index_path=index_url)
    assert run.indexed == 6
    index = VectorIndex.open(index_url)
    query = image_paths[3]
    query_url = s3.put(f"queries/{query.name.upper()}", query.read_bytes())  # suffixes are case-insensitive
    by_url = index.search(query_url, top_k=4, server=inference_url)
    by_path = index.search(str(query), top_k=4, server=inference_url)
    assert [h.image_ref for h in by_url] == [h.image_ref for h in by_path]
    np.testing.assert_allclose([h.score for h in by_url], [h.score for h in by_path], atol=1e-5)
    assert by_url[0].image_ref == str(photos / query.name)  # the query image finds itself
    assert by_url[0].image_sha256 == hashlib.sha256(query.read_bytes()).hexdigest()
    with pytest.raises(InvalidInputError, match="not found") as caught:
        index.search(f"s3://{s3.bucket}/queries/missing.jpg", server=inference_url)
    assert caught.value.field == "query"


@pytest.mark.server
def test_embed_images_keeps_a_block_index_that_search_images_reads(
    s3: MotoBucket,  # noqa: F811
    proxy: FaultProxy,
    inference_url: str,
    tmp_path: Path,
) -> None:
    block = saved_bucket_block(s3.endpoint, s3.bucket, folder="blocks")
    index_path = f"block://s3-bucket/{block._block_document_name}/idx"
    images = {f"photos/p{i}.png": make_image(2100 + i) for i in range(5)}
    s3.put_many(images.items())
    kwargs = {"server": proxy.url, "cache_storage": str(tmp_path / "cache"), "index_path": index_path}
    run = embed_images(f"{s3.url}photos/", f"{s3.url}run/", **kwargs)  # the table in the bucket too
    assert (run.succeeded, run.indexed) == (5, 5)
    assert any(k.startswith("blocks/idx/seg-") for k in s3.keys("blocks/idx/"))
    index = VectorIndex.open(index_path)
    assert (index.rows, index.family) == (5, "clip")
    hit = index.search(f"{s3.url}photos/p2.png", top_k=1, server=inference_url)[0]
    assert hit.image_ref == f"{s3.url}photos/p2.png"
    found = search_images(f"{s3.url}photos/p4.png", index_path, top_k=2, server=inference_url)
    assert found.searched_rows == 5 and found.hits[0].image_ref == f"{s3.url}photos/p4.png"
    assert embed_images(f"{s3.url}photos/", f"{s3.url}run/", **kwargs).indexed == 0  # nothing new

    proxy.clear()
    for bad in ("block://s3-bucket/no-such-block/idx", f"block://s3-bucket/{block._block_document_name}/run/x"):
        if bad.endswith("/x"):  # a folder that is not empty and holds no index
            s3.put("blocks/run/x/notes.txt", b"not an index")
        with pytest.raises(InvalidInputError) as caught:
            embed_images(f"{s3.url}photos/", str(tmp_path / "out"), **{**kwargs, "index_path": bad})
        assert caught.value.field == "index_path"
    assert proxy.count() == 0  # refused before any request
