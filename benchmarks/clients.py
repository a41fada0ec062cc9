"""The clients under comparison, each embedding the same images and returning a `Run`:
a bare async httpx loop, the blocks' client, the flows, and inference-sdk (in its own venv)."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx

from prefect_roboflow.blocks import Clip, InferenceServer, record_responses

from .common import REPO, Run

CLIP_VERSION = "ViT-B-16"


# --- (c) the practical ceiling: a hand-written async httpx loop ---------------------------


async def _bare_httpx(url: str, paths: Sequence[Path], concurrency: int) -> tuple[float, int]:
    pending = iter(paths)
    server_seconds = 0.0
    requests = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60.0) as client:

        async def worker() -> None:
            nonlocal server_seconds, requests
            for path in pending:  # one shared iterator: each path goes to one worker
                image = {"type": "base64", "value": base64.b64encode(path.read_bytes()).decode()}
                response = await client.post(
                    "/clip/embed_image", json={"image": image, "clip_version_id": CLIP_VERSION}
                )
                response.raise_for_status()
                body = response.json()
                if len(body["embeddings"]) != 1:
                    raise RuntimeError(f"{path}: expected one embedding")
                server_seconds += body.get("time") or 0.0
                requests += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return server_seconds, requests


def bare_httpx(url: str, paths: Sequence[Path], concurrency: int) -> Run:
    """One image per request (the server's CLIP takes one), ``concurrency`` requests in flight."""
    started = time.perf_counter()
    server_seconds, requests = asyncio.run(_bare_httpx(url, paths, concurrency))
    seconds = time.perf_counter() - started
    return Run("bare httpx", f"concurrency {concurrency}", len(paths), seconds, requests, server_seconds, concurrency)


# --- (b) the blocks' client -------------------------------------------------------------


def timed_embed(clip: Clip, paths: Sequence[Path], setting: str, concurrency: int | None = None) -> Run:
    """One ``clip.embed_images(paths)``, timed, with the server's own model time summed."""
    started = time.perf_counter()
    with record_responses() as infos:
        vectors = clip.embed_images([str(p) for p in paths])
    seconds = time.perf_counter() - started
    if vectors.shape[0] != len(paths):
        raise RuntimeError(f"expected {len(paths)} embeddings, got {vectors.shape[0]}")
    server_seconds = sum(i.server_time or 0.0 for i in infos)
    return Run("blocks client", setting, len(paths), seconds, len(infos), server_seconds, concurrency)


def blocks_client(url: str, paths: Sequence[Path], max_concurrency: int = 8) -> Run:
    """``Clip(...).embed_images(paths)``: the pooled engine, validation, chunking, retries."""
    clip = Clip(server=InferenceServer(api_url=url, max_concurrency=max_concurrency))
    return timed_embed(clip, paths, f"max_concurrency {max_concurrency}")


# --- (a) the flows ------------------------------------------------------------------------


def server_ref(url: str, max_concurrency: int | None) -> str:
    """What a flow's ``server`` parameter takes: the URL (block defaults), or a saved block."""
    if max_concurrency is None:
        return url
    name = f"bench-{url.rsplit(':', 1)[-1].strip('/')}-c{max_concurrency}"
    InferenceServer(api_url=url, max_concurrency=max_concurrency).save(name, overwrite=True)
    return name


def step_table(flow_run_id: UUID, key: str) -> list[dict[str, Any]]:
    """The flow run's per-step table artifact (the flows' own requests and server seconds).

    Read from the API because `record_responses()` around a flow call sees nothing: each batch
    task opens its own recorder, which hides the outer one (see RESULTS.md).
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), key=ArtifactFilterKey(any_=[key])
            )
        )
    if not artifacts:
        return []
    data = artifacts[0].data
    rows = json.loads(data) if isinstance(data, str) else data
    return list(rows) if isinstance(rows, list) else []


def embed_flow(
    url: str,
    images: str | Sequence[Path],
    cache_dir: Path,
    *,
    max_concurrency: int | None = None,
    batch_size: int = 64,
    setting: str = "",
) -> Run:
    """The ``embed_images`` flow, its cache in ``cache_dir`` (cold when the folder is new)."""
    from prefect_roboflow.flows import embed_images

    server = server_ref(url, max_concurrency)
    source = images if isinstance(images, str) else [str(p) for p in images]
    with tempfile.TemporaryDirectory(prefix="bench-out-") as out_dir:
        started = time.perf_counter()
        state = embed_images(
            images=source,
            out_dir=out_dir,
            server=server,
            batch_size=batch_size,
            cache_storage=str(cache_dir),
            return_state=True,
        )
        seconds = time.perf_counter() - started
    result = state.result()
    if result.succeeded != result.images:
        raise RuntimeError(f"embed_images: {result.failed} of {result.images} images failed")
    steps = step_table(state.state_details.flow_run_id, "embed-images-steps")
    server_seconds = sum(float(s.get("server_seconds", 0.0)) for s in steps)
    label = setting or f"batch_size {batch_size}, max_concurrency {max_concurrency or 8}"
    return Run("embed_images flow", label, result.images, seconds, result.requests, server_seconds)


def detect_flow(url: str, images: Sequence[Path], cache_dir: Path, max_concurrency: int | None = None) -> Run:
    """The ``detect_crop_classify`` flow over ``images`` with the bundled examples and labels."""
    from prefect_roboflow.flows import detect_crop_classify
    from prefect_roboflow.flows.demo import example_spec

    examples, labels = example_spec()
    with tempfile.TemporaryDirectory(prefix="bench-out-") as out_dir:
        started = time.perf_counter()
        state = detect_crop_classify(
            images=[str(p) for p in images],
            examples=examples,
            labels=labels,
            out_dir=out_dir,
            server=server_ref(url, max_concurrency),
            cache_storage=str(cache_dir),
            return_state=True,
        )
        seconds = time.perf_counter() - started
    result = state.result()
    steps = step_table(state.state_details.flow_run_id, "detect-crop-classify-steps")
    server_seconds = sum(float(s.get("server_seconds", 0.0)) for s in steps)
    setting = f"{result.detections} objects, max_concurrency {max_concurrency or 8}"
    return Run("detect_crop_classify flow", setting, result.images, seconds, result.requests, server_seconds)


# --- (d) inference-sdk, in the interpreter that has it -------------------------------------


def inference_sdk(sdk_python: str, url: str, paths: Sequence[Path], concurrencies: Sequence[int]) -> list[Run]:
    """``InferenceHTTPClient.get_clip_image_embeddings(paths)`` at each ``max_concurrent_requests``."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as listing:
        listing.write("\n".join(str(p) for p in paths))
        listing.flush()
        done = subprocess.run(
            [
                sdk_python,
                str(REPO / "benchmarks" / "sdk_worker.py"),
                url,
                listing.name,
                ",".join(map(str, concurrencies)),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
    if done.returncode != 0:
        raise RuntimeError(f"sdk_worker failed ({done.returncode}):\n{done.stderr[-3000:]}")
    runs = []
    for line in done.stdout.splitlines():
        figures = json.loads(line)
        c = figures["concurrency"]
        setting = "defaults (1 request at a time)" if c == 1 else f"max_concurrent_requests {c}"
        runs.append(
            Run("inference-sdk", setting, figures["images"], figures["seconds"], figures["images"], concurrency=c)
        )
    return runs
