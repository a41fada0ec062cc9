"""The batch tasks on a Dask cluster of 2 worker processes, through prefect-dask's `DaskTaskRunner`.

A `LocalCluster` on 127.0.0.1 (started and closed here) runs the steps of the flows; a counting
proxy in front of the real server shows what the workers sent. Checks that the tasks ran in the
worker processes (each with its own HTTP engine, none in the test process), that the tables equal
the default thread runner's, that the workers fill the content cache so a rerun sends nothing,
that a failing image is a failed row, and that a saved server block with an API key works on the
workers without the key reaching the Dask logs. Records travel as references (no image bytes).
"""

from __future__ import annotations

import copy
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import distributed
import numpy as np
import pyarrow.parquet as pq
import pytest
from prefect.filesystems import LocalFileSystem
from prefect_dask import DaskTaskRunner
from pydantic import SecretStr
from support.cache import cached_entries
from support.fault_proxy import Fault, FaultProxy
from support.images import make_image, make_scene

from prefect_roboflow.blocks import Clip, InferenceServer, _http
from prefect_roboflow.blocks._http import _engines, get_engine
from prefect_roboflow.flows import auto_label, classify_images, detect_crop_classify, embed_images
from prefect_roboflow.flows._steps.sources import load
from prefect_roboflow.flows.demo import example_spec
from prefect_roboflow.flows.records import Batch, Crop, ImageRecord

pytestmark = pytest.mark.server

N_IMAGES = 18
SENTINEL = "rf-DASK-SENTINEL-4b7e1c9a0d2f"
#: Embeddings of the same image from the same server: float32 math may differ in the 6th digit.
EMBEDDING_ATOL = 1e-5


@pytest.fixture(scope="module")
def dask_client() -> Iterator[distributed.Client]:
    """2 worker processes (1 thread each) on loopback, and a client to watch them."""
    with (
        distributed.LocalCluster(
            n_workers=2, processes=True, threads_per_worker=1, host="127.0.0.1", dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        client.wait_for_workers(2)
        yield client


def _on_dask(flow: Any, client: distributed.Client) -> Any:
    return flow.with_options(task_runner=DaskTaskRunner(address=client.scheduler.address))


def _worker_pids(client: distributed.Client) -> dict[str, int]:
    return client.run(os.getpid)


def _engine_urls(client: distributed.Client) -> dict[str, list[str]]:
    """The API URLs of the HTTP engines each worker process made for itself."""
    return client.run(
        lambda: sorted(s.api_url for s in __import__("prefect_roboflow.blocks._http").blocks._http._engines)
    )


def _pids_that_ran(stream: list[dict[str, Any]], client: distributed.Client, step: str) -> set[int]:
    pids = _worker_pids(client)
    return {pids[t["worker"]] for t in stream if t["key"].startswith(step)}


def _table(path: str) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()


def _same_rows(got: list[dict[str, Any]], want: list[dict[str, Any]], vector_columns: tuple[str, ...]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert {k: v for k, v in g.items() if k not in vector_columns} == {
            k: v for k, v in w.items() if k not in vector_columns
        }
        for column in vector_columns:
            if w[column] is None:
                assert g[column] is None
            else:
                np.testing.assert_allclose(g[column], w[column], atol=EMBEDDING_ATOL, rtol=0)


@pytest.fixture()
def photos(tmp_path: Path) -> Path:
    """18 good images and a truncated JPEG."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(N_IMAGES):
        fmt = "PNG" if i % 2 else "JPEG"
        (folder / f"img_{i:02d}.{fmt.lower().replace('jpeg', 'jpg')}").write_bytes(make_image(500 + i, fmt=fmt))
    (folder / "zz_corrupt.jpg").write_bytes(make_image(999, fmt="JPEG")[:500])
    return folder


def test_records_travel_as_references_and_blocks_keep_their_secret(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(make_image(1))
    record = load(ImageRecord(str(path)))
    assert record.data is not None and record.sha256 is not None

    # a whole image pickles without its bytes, and is read (and checked) again where it lands
    for dumps, loads in ((pickle.dumps, pickle.loads), (cloudpickle.dumps, pickle.loads)):
        travelled = loads(dumps(Batch([record])))[0]
        assert travelled.data is None and travelled.sha256 == record.sha256 and travelled.ref == record.ref
        assert load(travelled) == record and load(travelled).data == record.data
    path.write_bytes(make_image(2))
    changed = load(pickle.loads(pickle.dumps(record)))
    assert changed.failure is not None and changed.failure.error_type == "ImageChanged"

    # a crop keeps its bytes (there is nothing to read them again from); copies keep everything
    crop = ImageRecord(str(path), "c" * 64, b"jpeg bytes", crop=Crop(record.sha256, 0, (0, 0, 1, 1), "a", 0.9))
    assert pickle.loads(pickle.dumps(crop)).data == b"jpeg bytes"
    assert copy.copy(record).data == record.data and copy.deepcopy(record).data == record.data

    # a block pickles with its key still a SecretStr; an engine pickles as its settings
    clip = Clip(server=InferenceServer(api_url="http://127.0.0.1:9", api_key=SecretStr(SENTINEL)))
    for dumps in (pickle.dumps, cloudpickle.dumps):
        back = pickle.loads(dumps(clip))
        assert isinstance(back.server.api_key, SecretStr) and back.server.api_key.get_secret_value() == SENTINEL
        assert SENTINEL not in repr(back) and SENTINEL not in str(back)
    engine = get_engine(clip.server.http_settings())
    assert pickle.loads(pickle.dumps(engine)) is engine


def test_a_process_never_uses_engines_it_inherited(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = InferenceServer(api_url="http://127.0.0.1:9").http_settings()
    inherited = get_engine(settings)
    monkeypatch.setattr(_http, "_engines_pid", -1)  # as if the registry came from a parent process
    fresh = get_engine(settings)
    assert fresh is not inherited and fresh._thread.is_alive() and _http._engines_pid == os.getpid()
    assert get_engine(settings) is fresh
    inherited.close()


def test_embed_images_on_dask_matches_the_thread_runner(
    dask_client: distributed.Client, proxy: FaultProxy, inference_url: str, photos: Path, tmp_path: Path
) -> None:
    threads = embed_images(
        str(photos),
        str(tmp_path / "threads"),
        server=inference_url,
        batch_size=4,
        cache_storage=str(tmp_path / "threads-cache"),
    )
    cache = tmp_path / "dask-cache"
    flow = _on_dask(embed_images, dask_client)
    with distributed.get_task_stream(dask_client) as stream:
        result = flow(str(photos), str(tmp_path / "dask"), server=proxy.url, batch_size=4, cache_storage=str(cache))

    # the same table: refs, hashes, statuses and errors equal, embeddings within float32 tolerance
    rows = _table(result.embeddings_path)
    _same_rows(rows, _table(threads.embeddings_path), ("embedding",))
    assert (result.images, result.succeeded, result.failed) == (N_IMAGES + 1, N_IMAGES, 1)
    assert [r["error"] for r in rows if r["status"] == "failed"] == ["truncated JPEG (no end-of-image marker)"]

    # the steps ran in both worker processes, each with its own engine; the test process sent nothing
    ran = _pids_that_ran(stream.data, dask_client, "embed")
    assert len(ran) == 2 and os.getpid() not in ran
    assert all(proxy.url in urls for urls in _engine_urls(dask_client).values())
    assert not any(settings.api_url == proxy.url for settings in _engines)

    # each image was sent once, and its result is in the cache the workers filled
    assert proxy.count("/clip/embed_image") == N_IMAGES == result.requests
    assert cached_entries(cache) == N_IMAGES

    # a rerun on Dask sends nothing and writes the same table
    proxy.clear()
    again = flow(str(photos), str(tmp_path / "dask"), server=proxy.url, batch_size=4, cache_storage=str(cache))
    assert proxy.count() == 0 and again.requests == 0 and again.from_cache == N_IMAGES
    assert _table(again.embeddings_path) == rows


def test_a_saved_keyed_server_works_on_workers_and_its_key_stays_out_of_dask_logs(
    dask_client: distributed.Client, proxy: FaultProxy, photos: Path, tmp_path: Path
) -> None:
    InferenceServer(api_url=proxy.url, api_key=SecretStr(SENTINEL), retry_backoff_seconds=0.05).save(
        "my-server", overwrite=True
    )
    proxy.inject(Fault.status(500), path_prefix="/clip/embed_image")  # one image the server fails
    LocalFileSystem(basepath=str(tmp_path / "cache")).save("dask-cache", overwrite=True)  # a storage block cache
    labels = ["a photo of a cat", "a photo of a dog"]
    flow = _on_dask(classify_images, dask_client)
    result = flow(
        str(photos),
        labels,
        str(tmp_path / "out"),
        server="my-server",
        batch_size=6,
        cache_storage="local-file-system/dask-cache",
    )

    rows = _table(result.classifications_path)
    assert (result.images, result.succeeded, result.failed) == (N_IMAGES + 1, N_IMAGES - 1, 2)
    errors = sorted(r["error"].split(":")[0] for r in rows if r["status"] == "failed")
    assert errors == ["InferenceServerError", "truncated JPEG (no end-of-image marker)"]
    assert all(r["label"] in labels for r in rows if r["status"] == "ok")
    cached = [p for p in (tmp_path / "cache" / "items").rglob("*") if p.is_file()]  # a block: an object per entry
    assert len(cached) == N_IMAGES - 1 + len(labels)  # the workers' images, and the labels embedded here

    # the key reached the server from the workers, and nothing Dask logs or shows
    sent = [r for r in proxy.requests if r.path.startswith("/clip/")]
    assert len(sent) == N_IMAGES + 1 and all(r.headers.get("authorization") == f"Bearer {SENTINEL}" for r in sent)
    shown = repr(dask_client.get_worker_logs()) + repr(dask_client.get_scheduler_logs())
    shown += repr(dask_client.run(lambda dask_worker: [repr(t) for t in dask_worker.state.tasks.values()]))
    assert all(dask_client.get_worker_logs().values())  # there are logs to look at
    assert SENTINEL not in shown


def test_detection_flows_on_dask(
    dask_client: distributed.Client, proxy: FaultProxy, inference_url: str, tmp_path: Path
) -> None:
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    for i in range(6):
        (scenes / f"scene_{i:02d}.png").write_bytes(make_scene(i))
    (scenes / "zz_empty.png").write_bytes(b"")
    examples, labels = example_spec()
    cache = str(tmp_path / "cache")
    common = {"confidence": 0.99, "batch_size": 3, "cache_storage": cache}

    # detect → crop → embed → classify, chained on the workers; the annotated images drawn here
    with distributed.get_task_stream(dask_client) as stream:
        on_dask = _on_dask(detect_crop_classify, dask_client)(
            str(scenes), examples, labels, str(tmp_path / "dask"), server=proxy.url, **common
        )
    assert os.getpid() not in _pids_that_ran(stream.data, dask_client, "detect")
    # six scenes, and the example-box check on the one reference image
    assert proxy.count("/owlv2/infer") == 6 + 1 and on_dask.images == 7 and on_dask.images_failed == 1
    assert on_dask.detections > 0 and proxy.count("/clip/embed_image") == on_dask.detections

    # the thread runner over the same cache makes the same table and annotated images
    threads = detect_crop_classify(
        str(scenes), examples, labels, str(tmp_path / "threads"), server=inference_url, **common
    )
    _same_rows(_table(on_dask.detections_path), _table(threads.detections_path), ("embedding",))
    assert sorted(p.name for p in Path(on_dask.annotated_dir).iterdir()) == sorted(
        p.name for p in Path(threads.annotated_dir).iterdir()
    )

    # auto_label on Dask: its datasets from the same (cached) detections
    proxy.clear()
    labelled = _on_dask(auto_label, dask_client)(
        str(scenes), examples, labels, str(tmp_path / "labels"), min_probability=0.0, server=proxy.url, **common
    )
    assert proxy.count("/owlv2/infer") == 0 and labelled.images == 7
    assert (tmp_path / "labels" / "coco" / "annotations.json").is_file()
