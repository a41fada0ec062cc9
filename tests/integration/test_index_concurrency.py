"""A vector index under concurrent writers: 4 processes × 10 adds at once, in a local folder and in
a bucket (moto's S3 server on loopback, its conditional writes atomic as S3's are), one writer
SIGKILLed mid-add, a reader opening the index all the while.

Planted ground truth: each writer adds its own rows and rows every writer adds too (the same
reference, sha256 and vector), so the index must end with every row of every completed add exactly
once — the killed writer's last add absent — and each committed version a reader opens must hold
whole adds only, with no row twice. What the killed writer left is still there afterwards (young:
it might be a running writer's) and goes once it is old.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from support.s3 import MotoBucket, s3, s3_server  # noqa: F401

from prefect_roboflow.flows.vector_index import VectorIndex

from prefect_roboflow.flows._index.add import GRACE_SECONDS, _remove_leftovers  # isort: skip
from prefect_roboflow.flows._index.store import _Store  # isort: skip

WRITERS = 4
ADDS = 10
OWN = 20  # rows only this writer adds, per add
SHARED = 5  # rows every writer adds, per add
KILLED, KILLED_AT = 3, 4  # writer 3 is killed at the commit of its add 4 (its adds 0–3 are committed)

WRITER = """
import sys, hashlib, numpy as np
from prefect_roboflow.flows._index import store as _index_store
from prefect_roboflow.flows.vector_index import RowBatch, VectorIndex

url, writer, adds, own, shared, killed_at = sys.argv[1], *map(int, sys.argv[2:])
current = -1
commit = _index_store._Store.commit

def held(self, *args):
    if current == killed_at:
        print("reached", flush=True)
        sys.stdin.readline()  # held here until the test kills this process
    return commit(self, *args)

_index_store._Store.commit = held

def vector(key):
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(32).astype(np.float32)
    return v / np.linalg.norm(v)

print("ready", flush=True)
sys.stdin.readline()  # every writer starts at once
for add in range(adds):
    current = add
    refs = [f"w{writer}/a{add}/{i}.jpg" for i in range(own)] + [f"shared/a{add}/{i}.jpg" for i in range(shared)]
    shas = [hashlib.sha256(r.encode()).hexdigest() for r in refs]
    VectorIndex.open(url).add(RowBatch(refs, shas, np.stack([vector(r) for r in refs])), family="clip", version="v")
print("done", flush=True)
"""


def expected_refs() -> set[str]:
    refs = {f"shared/a{a}/{i}.jpg" for a in range(ADDS) for i in range(SHARED)}
    for w in range(WRITERS):
        adds = range(KILLED_AT) if w == KILLED else range(ADDS)
        refs |= {f"w{w}/a{a}/{i}.jpg" for a in adds for i in range(OWN)}
    return refs


class Reader(threading.Thread):
    """Opens the index again and again while the writers run; each version must be whole adds, no row twice."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.stop, self.versions, self.problems = url, threading.Event(), 0, []  # type: ignore[var-annotated]

    def run(self) -> None:
        last = 0
        while not self.stop.is_set():
            with VectorIndex.open(self.url) as index:
                refs = index.metadata(np.arange(index.rows)).column("image_ref").to_pylist()
            if len(refs) < last:
                self.problems.append(f"rows went back from {last} to {len(refs)}")
            if any(n > 1 for n in Counter(refs).values()):
                self.problems.append("a row twice")
            own = Counter(r.rsplit("/", 1)[0] for r in refs if r.startswith("w"))
            if any(n != OWN for n in own.values()):
                self.problems.append(f"a partial add: {own}")
            last, self.versions = len(refs), self.versions + 1


def run_writers(url: str, tmp_path: Path, env: dict[str, str]) -> None:
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(WRITER))
    counts = [str(ADDS), str(OWN), str(SHARED)]
    writers = [
        subprocess.Popen(
            [sys.executable, str(script), url, str(w), *counts, str(KILLED_AT if w == KILLED else -1)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **env},
        )
        for w in range(WRITERS)
    ]
    reader = Reader(url)
    try:
        for writer in writers:
            assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        reader.start()
        for writer in writers:
            assert writer.stdin is not None
            writer.stdin.write("go\n")
            writer.stdin.flush()
        killed = writers[KILLED]
        assert killed.stdout is not None and killed.stdout.readline().strip() == "reached"
        os.kill(killed.pid, signal.SIGKILL)  # the others go on meanwhile
        assert killed.wait(timeout=60) == -signal.SIGKILL
        for w, writer in enumerate(writers):
            if w != KILLED:
                out, _ = writer.communicate(timeout=600)
                assert (writer.returncode, out.strip()) == (0, "done")
    finally:
        reader.stop.set()
        for writer in writers:
            if writer.poll() is None:
                writer.kill()
                writer.wait()
    reader.join(timeout=120)
    assert reader.versions > 0 and reader.problems == []


@pytest.fixture(params=["local", "s3"])
def index_url(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, str]]:
    """``(index location, environment of the writers)``, the index created empty."""
    if request.param == "local":
        url, env = str(tmp_path / "index"), {}
    else:
        bucket: MotoBucket = request.getfixturevalue("s3")
        url, env = f"s3://{bucket.bucket}/idx", bucket.env
    VectorIndex.open(url, create=True).close()
    return url, env


def test_four_processes_adding_at_once_lose_nothing_and_add_nothing_twice(
    index_url: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    url, env = index_url
    run_writers(url, tmp_path, env)
    index = VectorIndex.open(url)
    refs = index.metadata(np.arange(index.rows)).column("image_ref").to_pylist()
    assert Counter(refs).most_common(1)[0][1] == 1  # no row twice
    assert set(refs) == expected_refs()  # every committed row; none of the killed add's own rows
    # a row's own vector finds it: the committed files are whole
    picks = np.arange(0, index.rows, 97)
    hits = index.knn(index.vectors(picks), 1)[1][:, 0]
    np.testing.assert_array_equal(hits, picks)

    # What the killed writer left (its add's segment) stays while young, and goes once old.
    store = _Store(url)
    manifest, _ = store.read_manifest()  # type: ignore[misc]
    assert _remove_leftovers(store, manifest) == []
    left = _remove_leftovers(store, manifest, now=time.time() + GRACE_SECONDS + 60)
    assert sorted(Path(name).suffix for name in left) == [".npy", ".parquet"]
    assert VectorIndex.open(url).rows == len(expected_refs())
