"""Scale-out end to end: a Prefect server on PostgreSQL, a process work pool with two workers, images
in an S3-compatible bucket (moto's server) and the results and content cache in it too.

Everything is started and stopped here, on 127.0.0.1: the PostgreSQL cluster, `prefect server start`
on it, `moto_server`, two `prefect worker start` processes, and a fault proxy in front of the real
inference server (it counts requests and injects the failures that make a shard fail once).
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pyarrow.dataset as ds
import pyarrow.fs
import pyarrow.parquet as pq
import pytest
from _e2e import PrefectServer, Process, wait_for
from support.fault_proxy import Fault, FaultProxy
from support.images import make_image, make_scene
from support.postgres import PostgresCluster, postgres_cluster
from support.s3 import REGION, MotoServer, aws_env, saved_bucket_block

from prefect_roboflow.flows._steps.cache import unframe

pytestmark = pytest.mark.slow

IMAGES = 240
SHARD_SIZE = 50
POOL = "scale-out"
DEPLOYMENT = "fan-out"
FLOW = "embed-images"
ENTRYPOINT = "prefect_roboflow.flows.embed_images:embed_images"
#: The other batch flows, each deployed on the pool too: flow name → entrypoint.
BATCH_FLOWS = {
    "classify-images": "prefect_roboflow.flows.classify_images:classify_images",
    "detect-crop-classify": "prefect_roboflow.flows.detect_crop_classify:detect_crop_classify",
    "auto-label": "prefect_roboflow.flows.auto_label:auto_label",
}
SCENES = 40
SCENE_SHARD = 20
LABELS = ["a photo of an apple", "a photo of a box", "a photo of a bottle"]


@dataclass
class Cluster:
    """The running pieces of one scale-out setup."""

    prefect: PrefectServer
    s3: Any  # boto3 client on the moto server
    env: dict[str, str]
    deployment_id: str
    deployments: dict[str, str]  # the other batch flows' deployments: flow name → id
    workers: dict[str, Process]
    proxy: FaultProxy
    root: Path

    def run(self, parameters: dict[str, Any], queue: str | None = None, flow: str = FLOW) -> str:
        """Create a run of the flow's deployment (on a work queue of the pool, when given); its id."""
        body: dict[str, Any] = {"parameters": parameters}
        if queue:
            body["work_queue_name"] = queue
        deployment = self.deployment_id if flow == FLOW else self.deployments[flow]
        return str(self.prefect.api.post(f"/deployments/{deployment}/create_flow_run", body)["id"])

    def wait(self, run_id: str, timeout: float = 600) -> dict[str, Any]:
        """The run once it is final."""

        def final() -> dict[str, Any] | None:
            run = self.prefect.api.flow_run(run_id)
            return run if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

        return wait_for(final, timeout, f"flow run {run_id}", *self.workers.values(), self.prefect.process)

    def ran_on(self, run_id: str) -> list[str]:
        """The workers whose logs say they submitted this run."""
        return [name for name, worker in self.workers.items() if run_id in worker.log.read_text(errors="replace")]

    def subruns(self, parent_id: str) -> list[dict[str, Any]]:
        """The flow runs started from ``parent_id`` (as sub-runs), oldest first."""
        runs = self.prefect.api.post(
            "/flow_runs/filter",
            {"flow_runs": {"parent_flow_run_id": {"any_": [parent_id]}}, "sort": "START_TIME_ASC", "limit": 200},
        )
        return [r for r in runs if r["id"] != parent_id]

    def table(self, prefix: str) -> list[dict[str, Any]]:
        """The rows of the dataset folder ``s3://results/<prefix>``, read by pyarrow straight from the bucket."""
        fs = pyarrow.fs.S3FileSystem(
            endpoint_override=self.env["AWS_ENDPOINT_URL"],
            access_key=self.env["AWS_ACCESS_KEY_ID"],
            secret_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region=REGION,
            scheme="http",
        )
        return ds.dataset(f"results/{prefix}", filesystem=fs, format="parquet").to_table().to_pylist()


def _bucket_client(endpoint: str) -> Any:
    from support.s3 import ACCESS_KEY, SECRET_KEY

    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY
    )


def _save_blocks(prefect: PrefectServer, endpoint: str) -> None:
    """S3Bucket blocks for the shared content caches, saved on the PostgreSQL-backed server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect.api.url}):
        for name, folder in (("roboflow-cache", "cache"), ("overlap-cache", "overlap-cache")):
            saved_bucket_block(endpoint, "results", folder=folder, name=name)


def _deploy(prefect: PrefectServer, root: Path, flow: str = FLOW, entrypoint: str = ENTRYPOINT) -> str:
    """A process work pool (queues default, a, b), made once, and a deployment of the flow on it; its id."""
    api = prefect.api
    if flow == FLOW:
        api.post("/work_pools/", {"name": POOL, "type": "process"})
        for queue in ("a", "b"):
            api.post(f"/work_pools/{POOL}/queues", {"name": queue})
    flow_id = api.post("/flows/", {"name": flow})["id"]
    deployment = {
        "name": DEPLOYMENT,
        "flow_id": flow_id,
        "work_pool_name": POOL,
        "entrypoint": entrypoint,
        "pull_steps": [{"prefect.deployments.steps.set_working_directory": {"directory": str(root)}}],
        "parameters": {},
    }
    return str(api.post("/deployments/", deployment)["id"])


def _start_worker(name: str, queue: str, env: dict[str, str], root: Path) -> Process:
    cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--name", name, "--limit", "2"]
    cmd += ["--work-queue", "default", "--work-queue", queue]
    return Process.start(f"worker {name}", cmd, env, root / f"worker-{name}.log")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, inference_url: str) -> Iterator[Cluster]:
    """PostgreSQL, Prefect on it, moto with 240 images, a pool with two workers, a counting proxy."""
    root = tmp_path_factory.mktemp("scale-out")
    with postgres_cluster() as database, FaultProxy(inference_url) as proxy:
        yield from _cluster(root, database, proxy)


def _cluster(root: Path, database: PostgresCluster, proxy: FaultProxy) -> Iterator[Cluster]:
    moto = MotoServer.start(root)
    prefect: PrefectServer | None = None
    workers: dict[str, Process] = {}
    try:
        prefect = PrefectServer.start(
            root, PREFECT_API_DATABASE_CONNECTION_URL=database.url, PREFECT_LOGGING_LEVEL="WARNING"
        )
        s3 = _bucket_client(moto.endpoint)
        for bucket in ("photos", "results"):
            s3.create_bucket(Bucket=bucket)
        for i in range(IMAGES):
            s3.put_object(Bucket="photos", Key=f"job/photo_{i:04d}.png", Body=make_image(20_000 + i, (96, 72)))
        for i in range(SCENES):
            s3.put_object(Bucket="photos", Key=f"scenes/scene_{i:03d}.png", Body=make_scene(30_000 + i))
        env = prefect.env(**aws_env(moto.endpoint, root))
        _save_blocks(prefect, moto.endpoint)
        deployment_id = _deploy(prefect, root)
        deployments = {flow: _deploy(prefect, root, flow, entrypoint) for flow, entrypoint in BATCH_FLOWS.items()}
        worker_env = {**env, "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "5"}
        worker_env["PREFECT_LOGGING_LEVEL"] = "INFO"  # the workers log each run they submit
        # the API on a loaded 2-core machine answers an occasional 500: a run's client retries it, as
        # it retries 502/503 (seen once killing a parent mid-poll, with the load average at 18)
        worker_env["PREFECT_CLIENT_RETRY_EXTRA_CODES"] = "500"
        for name, queue in (("w1", "a"), ("w2", "b")):
            workers[name] = _start_worker(name, queue, worker_env, root)
        yield Cluster(prefect, s3, env, deployment_id, deployments, workers, proxy, root)
    finally:
        for worker in workers.values():
            worker.stop(grace=15)
        if prefect is not None:
            prefect.process.stop()
        moto.stop()


def _params(proxy: FaultProxy, **extra: Any) -> dict[str, Any]:
    return {
        "images": "s3://photos/job/",
        "out_dir": "s3://results/fan-out/",
        "server": proxy.url,
        "cache_storage": "s3-bucket/roboflow-cache",
        "batch_size": 25,
        **extra,
    }


def test_a_fan_out_job_runs_its_shards_on_both_workers_each_image_exactly_once(cluster: Cluster) -> None:
    # given two injected failures: whichever shards meet them fail their first attempt (max_failure_rate 0)
    cluster.proxy.clear()
    cluster.proxy.inject(Fault.status(500), Fault.status(500), path_prefix="/clip/embed_image")
    fan_out = {"shard_size": SHARD_SIZE, "retries": 2}
    # when the job runs from the deployment, split into shards of 50
    parent = cluster.wait(cluster.run(_params(cluster.proxy, fan_out=fan_out, max_failure_rate=0.0)))
    # then it completed, with every image exactly once, all ok, in a dataset folder of 5 parts
    assert parent["state_type"] == "COMPLETED", parent["state"]
    rows = cluster.table("fan-out/embeddings")
    refs = [r["image_ref"] for r in rows]
    assert sorted(refs) == [f"s3://photos/job/photo_{i:04d}.png" for i in range(IMAGES)]
    assert {r["status"] for r in rows} == {"ok"}
    parts = [k for k in _keys(cluster, "fan-out/embeddings/")]
    assert parts == [f"fan-out/embeddings/part-{i:05d}.parquet" for i in range(5)]
    # the shards were sub-runs of the same deployment, on both workers; only the failed ones ran twice
    subruns = cluster.subruns(parent["id"])
    assert {r["deployment_id"] for r in subruns} == {cluster.deployment_id}
    attempts = _attempts(subruns)
    failed_once = {shard for shard, states in attempts.items() if states[0] == "FAILED"}
    assert sorted(attempts) == [f"part-{i:05d}" for i in range(5)]
    assert 1 <= len(failed_once) <= 2
    assert all(
        states == (["FAILED", "COMPLETED"] if s in failed_once else ["COMPLETED"]) for s, states in attempts.items()
    )
    ran_on = {worker for run in subruns for worker in cluster.ran_on(run["id"])}
    assert ran_on == {"w1", "w2"}
    # the parent's summary holds the whole job's counts
    result = _summary(cluster, parent["id"])
    assert f"Embedded {IMAGES} of {IMAGES} images" in result
    # the server saw each image once, plus the two failed requests' images again
    embedded = sum(_items(r) for r in cluster.proxy.requests if r.path.startswith("/clip/embed_image"))
    assert embedded >= IMAGES

    # when the whole job runs again: nothing is sent (the cache in the bucket), the table is the same
    cluster.proxy.clear()
    again = cluster.wait(cluster.run(_params(cluster.proxy, fan_out=fan_out)))
    assert again["state_type"] == "COMPLETED", again["state"]
    assert cluster.proxy.count("/clip/embed_image") == 0
    rerun = {r["image_ref"]: r["embedding"] for r in cluster.table("fan-out/embeddings")}
    assert len(rerun) == IMAGES
    np.testing.assert_array_equal(
        np.array([rerun[r["image_ref"]] for r in rows]), np.array([r["embedding"] for r in rows])
    )

    # when it runs with bigger shards: the folder holds the new parts only, each image still once
    bigger = cluster.wait(cluster.run(_params(cluster.proxy, fan_out={"shard_size": 120})))
    assert bigger["state_type"] == "COMPLETED", bigger["state"]
    assert _keys(cluster, "fan-out/embeddings/") == [f"fan-out/embeddings/part-{i:05d}.parquet" for i in range(2)]
    assert sorted(r["image_ref"] for r in cluster.table("fan-out/embeddings")) == sorted(refs)


def test_two_workers_overlapping_jobs_share_one_cache_in_the_bucket(cluster: Cluster) -> None:
    # given two jobs over overlapping images (0-159 and 80-239), one per worker (queues a and b)
    first = [f"s3://photos/job/photo_{i:04d}.png" for i in range(0, 160)]
    second = [f"s3://photos/job/photo_{i:04d}.png" for i in range(80, 240)]
    cluster.proxy.clear()
    runs = {}
    for queue, images in (("a", first), ("b", second)):
        params = _params(cluster.proxy, images=images, out_dir=f"s3://results/overlap-{queue}/")
        params["cache_storage"] = "s3-bucket/overlap-cache"
        runs[queue] = cluster.run(params, queue=queue)
    # when both run at once
    finished = {queue: cluster.wait(run_id) for queue, run_id in runs.items()}
    # then both completed, each on its own worker
    assert {q: r["state_type"] for q, r in finished.items()} == {"a": "COMPLETED", "b": "COMPLETED"}
    assert cluster.ran_on(runs["a"]) == ["w1"] and cluster.ran_on(runs["b"]) == ["w2"]
    # the images both embedded have the same vector in both tables (float32 batched math: 6th digit)
    tables = {}
    for queue in ("a", "b"):
        rows = pq.read_table(_download(cluster, f"overlap-{queue}/embeddings.parquet")).to_pylist()
        assert {r["status"] for r in rows} == {"ok"}
        tables[queue] = {r["image_ref"]: np.array(r["embedding"]) for r in rows}
    shared = sorted(set(first) & set(second))
    assert len(shared) == 80
    for ref in shared:
        np.testing.assert_allclose(tables["a"][ref], tables["b"][ref], rtol=1e-5, atol=1e-6)
    # and every cache entry in the bucket is whole (its frame checks): one finite float32 vector of the table's size
    entries = _keys(cluster, "overlap-cache/")
    dim = len(next(iter(tables["a"].values())))
    assert len(entries) == IMAGES
    for key in entries:
        body = unframe(cluster.s3.get_object(Bucket="results", Key=key)["Body"].read())
        assert body is not None and len(body) == 4 * dim and np.isfinite(np.frombuffer(body, np.float32)).all(), key


def test_every_batch_flow_fans_out_s3_to_s3_and_its_parent_merges_the_shards(cluster: Cluster) -> None:
    from prefect_roboflow.flows.demo import example_spec

    examples, _ = example_spec()  # reference images on local disk: the workers share this machine
    scenes = [f"s3://photos/scenes/scene_{i:03d}.png" for i in range(SCENES)]
    common = {"images": "s3://photos/scenes/", "cache_storage": "s3-bucket/roboflow-cache", "batch_size": 10}
    common["server"] = cluster.proxy.url
    fan_out = {"shard_size": SCENE_SHARD}
    jobs: dict[str, dict[str, Any]] = {
        "classify-images": {"labels": LABELS},
        "detect-crop-classify": {"examples": examples, "labels": LABELS},
        "auto-label": {"examples": examples, "classes": {"box": ["a photo of a box"], "apple": "a photo of an apple"}},
    }

    def start(flow: str, out: str, **extra: Any) -> str:
        return cluster.run({**common, **jobs[flow], "out_dir": f"s3://results/{out}/", **extra}, flow=flow)

    # two jobs at a time: each waiting parent holds one of the pool's four slots, their shards share the rest
    started = {flow: start(flow, flow, fan_out=fan_out) for flow in ("classify-images", "detect-crop-classify")}
    parents = {flow: cluster.wait(run_id) for flow, run_id in started.items()}
    # then auto-label, fanned out and, beside it, plain (both find detect-crop-classify's detections cached)
    started = {"auto-label": start("auto-label", "auto-label", fan_out=fan_out), "plain": start("auto-label", "plain")}
    parents |= {flow: cluster.wait(run_id) for flow, run_id in started.items()}
    assert {f: r["state_type"] for f, r in parents.items()} == dict.fromkeys([*jobs, "plain"], "COMPLETED"), parents
    for flow in jobs:
        subruns = cluster.subruns(parents[flow]["id"])
        assert {r["deployment_id"] for r in subruns} == {cluster.deployments[flow]}
        assert sorted(r["name"].rsplit(" ", 3)[1] for r in subruns) == ["part-00000", "part-00001"], flow
    assert cluster.subruns(parents["plain"]["id"]) == []

    # classify: one part per shard, each scene once, and the summary's label counts are the table's
    rows = cluster.table("classify-images/classifications")
    assert sorted(r["image_ref"] for r in rows) == scenes and {r["status"] for r in rows} == {"ok"}
    summary = _summary(cluster, parents["classify-images"]["id"])
    for label in LABELS:
        count = sum(r["label"] == label for r in rows)
        assert (f"| {label} | {count} |" in summary) == (count > 0), label
    assert f"Classified {SCENES} of {SCENES} images" in summary

    # detect-crop-classify: every scene has rows in the folder; each shard drew its scenes with detections
    rows = cluster.table("detect-crop-classify/detections")
    assert sorted({r["image_ref"] for r in rows}) == scenes
    drawn = {r["image_ref"].rsplit("/", 1)[1][:-4] for r in rows if r["detection_index"] is not None}
    annotated = {k.rsplit("/", 1)[1].rsplit("-", 1)[0] for k in _keys(cluster, "detect-crop-classify/annotated/")}
    assert drawn and annotated == drawn
    assert f"{sum(r['status'] == 'ok' for r in rows)} objects found in {SCENES} images" in _summary(
        cluster, parents["detect-crop-classify"]["id"]
    )

    # auto-label: one dataset and one gallery, built by the parent from both shards' parts, are
    # exactly what a plain run of the same job writes
    labels = cluster.table("auto-label/labels")
    assert sorted({r["image_ref"] for r in labels}) == scenes
    kept = sum(r["status"] == "labelled" for r in labels)
    fanned, whole = (_coco(cluster, p) for p in ("auto-label", "plain"))
    assert fanned == whole
    assert len(fanned["images"]) == SCENES and len(fanned["annotations"]) == kept > 0
    assert _object(cluster, "auto-label/gallery/index.html") == _object(cluster, "plain/gallery/index.html")
    for prefix in ("yolo/labels/", "yolo/images/", "coco/images/"):
        assert [k.split("/", 1)[1] for k in _keys(cluster, f"auto-label/{prefix}")] == [
            k.split("/", 1)[1] for k in _keys(cluster, f"plain/{prefix}")
        ], prefix
    page = _object(cluster, "auto-label/gallery/index.html").decode()
    thumbs = set(re.findall(r'src="(thumbs/[^"]+)"', page))
    assert thumbs and thumbs <= {k.split("/", 2)[2] for k in _keys(cluster, "auto-label/gallery/thumbs/")}


def _coco(cluster: Cluster, prefix: str) -> dict[str, Any]:
    """``<prefix>/coco/annotations.json``, without the time each image was written (supervision's ``date_captured``)."""
    coco = json.loads(_object(cluster, f"{prefix}/coco/annotations.json"))
    for image in coco["images"]:
        image.pop("date_captured")
    return dict(coco)


def _object(cluster: Cluster, key: str) -> bytes:
    return bytes(cluster.s3.get_object(Bucket="results", Key=key)["Body"].read())


def _keys(cluster: Cluster, prefix: str) -> list[str]:
    pages = cluster.s3.get_paginator("list_objects_v2").paginate(Bucket="results", Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", ()))


def _download(cluster: Cluster, key: str) -> Path:
    path = cluster.root / f"download-{time.monotonic_ns()}.parquet"
    path.write_bytes(cluster.s3.get_object(Bucket="results", Key=key)["Body"].read())
    return path


def _attempts(subruns: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Each shard's run states, in attempt order, from the sub-runs' names."""
    attempts: dict[str, list[tuple[int, str]]] = {}
    for run in subruns:
        match = re.fullmatch(r"embed-images\[clip\] (part-\d{5}) attempt (\d+)", run["name"])
        assert match, run["name"]
        attempts.setdefault(match.group(1), []).append((int(match.group(2)), run["state_type"]))
    return {shard: [state for _, state in sorted(runs)] for shard, runs in attempts.items()}


def _summary(cluster: Cluster, run_id: str) -> str:
    artifacts = cluster.prefect.api.artifacts(run_id)
    return "\n".join(a.get("data") or "" for a in artifacts if a["type"] == "markdown")


def _items(request: Any) -> int:
    try:
        body = json.loads(request.body)
    except (ValueError, AttributeError):
        return 0
    image = body.get("image")
    return len(image) if isinstance(image, list) else 1
