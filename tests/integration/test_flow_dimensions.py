"""The flows hold every embedding to the model's size: a server answering vectors of another size
gives failed rows and caches nothing; a cached vector of another size is sent again, never used;
an index of another size is refused before any request. The server is the GPU stub
(`benchmarks/gpu_stub.py`, its own process on 127.0.0.1), which answers vectors of any size asked."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from support.images import make_image

from prefect_roboflow.blocks import Clip, InvalidInputError
from prefect_roboflow.flows import embed_images
from prefect_roboflow.flows._steps.cache import ContentCache, content_key
from prefect_roboflow.flows.vector_index import RowBatch, VectorIndex

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.gpu_stub import StubServer  # noqa: E402


@pytest.fixture(scope="module")
def stub() -> Iterator[StubServer]:
    with StubServer() as server:
        yield server


@pytest.fixture()
def images(tmp_path: Path) -> list[str]:
    paths = []
    for seed in range(4):
        path = tmp_path / "images" / f"img-{seed}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(make_image(300 + seed))
        paths.append(str(path))
    return paths


def _sent(stub: StubServer) -> int:
    return stub.stats().get("/clip/embed_image", 0)


def test_answers_of_the_wrong_size_are_failed_rows_and_never_cached(
    stub: StubServer, images: list[str], tmp_path: Path
) -> None:
    cache = str(tmp_path / "cache")
    stub.force_dim(100)  # ViT-B-16 is 512
    try:
        result = embed_images(images, str(tmp_path / "a"), server=stub.url, cache_storage=cache, max_failure_rate=1.0)
    finally:
        stub.force_dim(None)
    assert (result.succeeded, result.failed) == (0, 4)
    table = pd.read_parquet(result.embeddings_path)
    assert set(table["status"]) == {"failed"}
    assert all("100 values, expected 512" in error for error in table["error"])
    stub.reset()
    again = embed_images(images, str(tmp_path / "b"), server=stub.url, cache_storage=cache)
    assert (again.succeeded, again.from_cache, _sent(stub)) == (4, 0, 4)  # nothing was cached


def test_a_cached_vector_of_the_wrong_size_is_sent_again(stub: StubServer, images: list[str], tmp_path: Path) -> None:
    cache = ContentCache(tmp_path / "cache")
    identity = Clip().identity()
    sha = hashlib.sha256(Path(images[0]).read_bytes()).hexdigest()
    cache.put(content_key("embed", sha, identity, {}), np.ones(100, dtype=np.float32).tobytes())  # a bad entry
    stub.reset()
    result = embed_images(images, str(tmp_path / "out"), server=stub.url, cache_storage=str(tmp_path / "cache"))
    assert (result.succeeded, result.from_cache, _sent(stub)) == (4, 0, 4)
    table = pd.read_parquet(result.embeddings_path)
    assert {len(v) for v in table["embedding"]} == {512}
    stub.reset()  # the bad entry was stored over: a rerun sends nothing
    rerun = embed_images(images, str(tmp_path / "out"), server=stub.url, cache_storage=str(tmp_path / "cache"))
    assert (rerun.from_cache, _sent(stub)) == (4, 0)


def test_an_index_of_another_size_is_refused_before_any_request(
    stub: StubServer, images: list[str], tmp_path: Path
) -> None:
    index = VectorIndex.open(tmp_path / "index", create=True)
    index.add(RowBatch(["x.jpg"], ["0" * 64], np.ones((1, 100), dtype=np.float32)), family="clip", version="ViT-B-16")
    index.close()
    stub.reset()
    with pytest.raises(InvalidInputError, match=r"index_path.*100-value rows.*512"):
        embed_images(images, str(tmp_path / "out"), server=stub.url, index_path=str(tmp_path / "index"))
    assert _sent(stub) == 0
