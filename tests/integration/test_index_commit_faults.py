"""A vector index add whose commit answer is lost or late: it must not undo its own commit.

The manifest's conditional write can take effect while its caller hears "refused": an S3 PUT
whose answer is lost is retried by the client and the retry is refused (412) by the first
attempt's own write; a PUT refused with 409 while the first attempt is still under way lands a
moment later. Planted faults, each on an index of known rows: a local store whose conditional
write lands and then reports False (alone, and with another writer committing on top before the
add looks again), one whose write reports False and lands only after the add has read the
manifest again, one whose refused write never lands; and moto's S3 server behind the fault proxy,
which forwards the manifest's PUT and drops its answer (the client retries it, as configured).
After each: every row is in the index exactly once, the index opens and finds each row by its own
vector, and every file the committed manifest names exists.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support.fault_proxy import Fault, FaultProxy
from support.s3 import MotoBucket, s3, s3_server  # noqa: F401

from prefect_roboflow.flows._storage.stores import LocalStore
from prefect_roboflow.flows.vector_index import MANIFEST, RowBatch, VectorIndex

from prefect_roboflow.flows._index.store import _Store  # isort: skip

DIM = 32
FIRST, SECOND, OTHER = range(0, 10_000), range(10_000, 10_300), range(10_200, 10_400)
PROXY_PORT = 19350  # this range


def rows(ids: range) -> RowBatch:
    refs = [f"img/{i}.jpg" for i in ids]
    rng = np.random.default_rng(ids.start)
    vectors = rng.standard_normal((len(refs), DIM), dtype=np.float32)
    return RowBatch(refs, [hashlib.sha256(r.encode()).hexdigest() for r in refs], vectors)


def with_ann(url: str) -> None:
    """An index of `FIRST` rows with an IVF-PQ (so the next add writes an IVF-PQ file of its own)."""
    VectorIndex.open(url, create=True, exact_below=10_000).add(rows(FIRST), family="clip", version="v")


def assert_whole(url: str, expected: set[int]) -> None:
    """Every expected row once, the index opens and finds rows by their vectors, no named file missing."""
    store = _Store(url)
    found = store.read_manifest()
    assert found is not None
    manifest = found[0]
    named = {f"{s.name}{x}" for s in manifest.segments for x in (".npy", ".parquet")}
    named |= {manifest.ann["file"]} if manifest.ann else set()
    named |= set(manifest.retired)
    assert {name for name in named if not store.exists(name)} == set()
    index = VectorIndex.open(url)
    refs = index.metadata(np.arange(index.rows)).column("image_ref").to_pylist()
    assert Counter(refs).most_common(1)[0][1] == 1
    assert set(refs) == {f"img/{i}.jpg" for i in expected}
    picks = np.arange(0, index.rows, 499)
    np.testing.assert_array_equal(index.knn(index.vectors(picks), 1)[1][:, 0], picks)


def manifest_writes(
    monkeypatch: pytest.MonkeyPatch, fault: Callable[[Callable[..., bool], Any, str, bytes, str | None], bool]
) -> dict[str, int]:
    """Route the first conditional manifest write of a local index through ``fault``."""
    write_if = LocalStore.write_if
    state = {"faults": 0}

    def faulty(self: LocalStore, rel: str, data: bytes, tag: str | None) -> bool:
        if rel.endswith(MANIFEST) and tag is not None and state["faults"] == 0:
            state["faults"] += 1
            return fault(write_if, self, rel, data, tag)
        return write_if(self, rel, data, tag)

    monkeypatch.setattr(LocalStore, "write_if", faulty)
    return state


def test_a_commit_that_landed_but_was_answered_refused_stays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = str(tmp_path / "index")
    with_ann(url)

    def lands_then_false(write_if: Callable[..., bool], store: Any, rel: str, data: bytes, tag: str | None) -> bool:
        assert write_if(store, rel, data, tag)
        return False  # the answer lost; the retry refused by this very write

    state = manifest_writes(monkeypatch, lands_then_false)
    result = VectorIndex.open(url).add(rows(SECOND), family="clip", version="v")
    assert state["faults"] == 1
    assert (result.added, result.skipped, result.rows) == (len(SECOND), 0, 10_300)
    assert_whole(url, {*FIRST, *SECOND})


def test_a_landed_commit_another_writer_built_on_stays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The add's write lands, another writer commits on top of it (half of its rows the add's), and
    only then is the add told "refused": the latest manifest holds the add's segments."""
    url = str(tmp_path / "index")
    with_ann(url)

    def lands_then_another_then_false(
        write_if: Callable[..., bool], store: Any, rel: str, data: bytes, tag: str | None
    ) -> bool:
        assert write_if(store, rel, data, tag)
        other = VectorIndex.open(url).add(rows(OTHER), family="clip", version="v")
        assert (other.added, other.skipped) == (100, 100)
        return False

    state = manifest_writes(monkeypatch, lands_then_another_then_false)
    result = VectorIndex.open(url).add(rows(SECOND), family="clip", version="v")
    assert state["faults"] == 1
    assert (result.added, result.rows) == (len(SECOND), 10_400)
    assert_whole(url, {*FIRST, *SECOND, *OTHER})


def test_a_refused_write_that_lands_after_the_add_looked_again_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """409 while the first attempt is under way: False, nothing written yet; that attempt lands
    right after the add has read the manifest again (still the one it started from)."""
    url = str(tmp_path / "index")
    with_ann(url)
    pending: list[tuple[str, bytes, str | None]] = []
    landed: list[bool] = []
    write_if, read_tagged = LocalStore.write_if, LocalStore.read_tagged

    def later(_: Callable[..., bool], store: Any, rel: str, data: bytes, tag: str | None) -> bool:
        pending.append((rel, data, tag))
        return False

    def read_then_land(self: LocalStore, rel: str) -> tuple[bytes, str]:
        answer = read_tagged(self, rel)
        if pending and rel.endswith(MANIFEST):
            landed.append(write_if(self, *pending.pop()))
        return answer

    state = manifest_writes(monkeypatch, later)
    monkeypatch.setattr(LocalStore, "read_tagged", read_then_land)
    result = VectorIndex.open(url).add(rows(SECOND), family="clip", version="v")
    assert (state["faults"], landed) == (1, [True])
    assert (result.added, result.rows) == (len(SECOND), 10_300)
    assert_whole(url, {*FIRST, *SECOND})


def test_a_refused_write_that_never_lands_is_tried_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = str(tmp_path / "index")
    with_ann(url)
    state = manifest_writes(monkeypatch, lambda *_: False)
    result = VectorIndex.open(url).add(rows(SECOND), family="clip", version="v")
    assert (state["faults"], result.added, result.rows) == (1, len(SECOND), 10_300)
    assert_whole(url, {*FIRST, *SECOND})


@pytest.fixture()
def proxied(s3: MotoBucket, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:  # noqa: F811
    """The fault proxy in front of moto, the test's S3 client pointed at it."""
    with FaultProxy(s3.endpoint, port=PROXY_PORT) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        yield proxy


def test_a_bucket_commit_whose_answer_is_lost_stays(
    s3: MotoBucket,  # noqa: F811
    proxied: FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The manifest's PUT reaches moto and takes effect; its answer is dropped; the S3 client
    retries the PUT (If-Match of the old ETag) and moto refuses it (412)."""
    url = f"s3://{s3.bucket}/idx"
    with_ann(url)
    commit = _Store.commit
    manifest_path = f"/{s3.bucket}/idx/{MANIFEST}"

    def answer_lost(self: _Store, *args: Any) -> bool:
        proxied.inject(Fault.lost(), path_prefix=manifest_path)  # the next request: this PUT
        return commit(self, *args)

    monkeypatch.setattr(_Store, "commit", answer_lost)
    proxied.clear()
    result = VectorIndex.open(url).add(rows(SECOND), family="clip", version="v")
    monkeypatch.setattr(_Store, "commit", commit)
    puts = [r for r in proxied.requests if r.method == "PUT" and r.path == manifest_path]
    assert [r.fault for r in puts] == ["lost", None]  # the lost one and the client's retry
    assert json.loads(puts[0].body) == json.loads(puts[1].body)
    assert (result.added, result.rows) == (len(SECOND), 10_300)
    assert_whole(url, {*FIRST, *SECOND})
