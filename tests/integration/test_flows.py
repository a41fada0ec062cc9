"""The flows on the Prefect test harness, against the real server behind a counting proxy.

Checks each flow's table against what the server returns for the same images, that a rerun
sends zero requests and writes the same table, that a superset run sends only the new images,
that unreadable files become failed rows, and that the run shows its task runs, artifacts and
event through the Prefect API.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np
import pyarrow.parquet as pq
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.events.filters import EventFilter, EventNameFilter
from prefect.events.worker import EventsWorker
from support.fault_proxy import FaultProxy
from support.images import make_image, make_scene
from support.runs import task_runs_of

from prefect_roboflow.blocks import Clip, InferenceServer, InvalidInputError, OwlV2, PerceptionEncoder
from prefect_roboflow.flows import classify_images, detect_crop_classify, embed_images, search_images
from prefect_roboflow.flows.demo import example_spec
from prefect_roboflow.flows.detect_crop_classify import DETECTIONS_SCHEMA
from prefect_roboflow.flows.embed_images import EMBEDDINGS_SCHEMA
from prefect_roboflow.flows.steps import reference_examples

pytestmark = pytest.mark.server

LABELS = ["a photo of a cat", "a photo of a dog", "a photo of a box"]
N_IMAGES = 32


def _folder(root: Path, name: str, images: dict[str, bytes]) -> Path:
    folder = root / name
    folder.mkdir()
    for file_name, data in images.items():
        (folder / file_name).write_bytes(data)
    return folder


@pytest.fixture()
def plain_images(tmp_path: Path) -> Path:
    """32 good images, a 0-byte file and a truncated JPEG."""
    images = {
        f"img_{i:02d}.{'png' if i % 2 else 'jpg'}": make_image(200 + i, fmt="PNG" if i % 2 else "JPEG")
        for i in range(N_IMAGES)
    }
    images["zz_empty.png"] = b""
    images["zz_corrupt.jpg"] = make_image(999, fmt="JPEG")[:500]
    return _folder(tmp_path, "plain", images)


@pytest.fixture()
def scenes(tmp_path: Path) -> Path:
    """32 scenes with objects to detect, a 0-byte file and a truncated PNG."""
    images = {f"scene_{i:02d}.png": make_scene(i) for i in range(N_IMAGES)}
    images["zz_empty.png"] = b""
    images["zz_corrupt.png"] = make_scene(99)[:700]
    return _folder(tmp_path, "scenes", images)


def _table(path: str) -> list[dict]:
    return pq.read_table(path).to_pylist()


def _run_details(flow_run_id: UUID, task_runs: int) -> tuple[list[str], dict[str, Any]]:
    """Task run names (once ``task_runs`` are recorded: `task_runs_of`) and artifacts (by key, or type
    for unkeyed ones) of a flow run, from the API."""

    async def read() -> tuple[list[Any], list[Any]]:
        runs = await task_runs_of(flow_run_id, task_runs)
        async with get_client() as client:
            artifacts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
            )
        return runs, artifacts

    runs, artifacts = asyncio.run(read())
    return sorted(r.name for r in runs), {(a.key or a.type): a for a in artifacts}


def _completed_events(name: str, flow_run_id: UUID) -> list[Any]:
    """The flow's completion event as the Prefect API stored it (events arrive asynchronously)."""
    EventsWorker.drain_all()

    async def read() -> list[Any]:
        async with get_client() as client:
            page = await client.read_events(filter=EventFilter(event=EventNameFilter(name=[name])), limit=50)
        return [e for e in page.events if e.resource.id.endswith(str(flow_run_id))]

    for _ in range(40):
        found = asyncio.run(read())
        if found:
            return found
        time.sleep(0.5)
    return []


def test_embed_images_flow(proxy: FaultProxy, inference_url: str, plain_images: Path, tmp_path: Path) -> None:
    cache, out = str(tmp_path / "cache"), tmp_path / "out"
    state = embed_images(
        str(plain_images), str(out), server=proxy.url, batch_size=10, cache_storage=cache, return_state=True
    )
    result = state.result()
    rows = _table(result.embeddings_path)

    # the table: one row per file, in order, failures with reasons
    assert pq.read_schema(result.embeddings_path).equals(EMBEDDINGS_SCHEMA)
    assert len(rows) == N_IMAGES + 2 and (result.images, result.succeeded, result.failed) == (N_IMAGES + 2, N_IMAGES, 2)
    failed = {Path(r["image_ref"]).name: r["error"] for r in rows if r["status"] == "failed"}
    assert failed == {
        "zz_corrupt.jpg": "truncated JPEG (no end-of-image marker)",
        "zz_empty.png": "image is empty (0 bytes)",
    }
    # one request per image, and the embeddings are what the server gives for those images
    assert proxy.count("/clip/embed_image") == N_IMAGES == result.requests
    ok = [r for r in rows if r["status"] == "ok"]
    direct = Clip(server=InferenceServer(api_url=inference_url)).embed_images([r["image_ref"] for r in ok[:5]])
    np.testing.assert_allclose(np.array([r["embedding"] for r in ok[:5]]), direct, rtol=1e-5, atol=1e-5)

    # the run in Prefect: named batch tasks, progress, step table, summary, event
    run_id = state.state_details.flow_run_id
    names, artifacts = _run_details(run_id, 5)
    # the batch tasks, and the one that materialises the outputs as assets
    assert names == ["embed-images-assets", *(f"embed[clip ViT-B-16] batch {i}/4" for i in range(1, 5))]
    assert artifacts["progress"].data == 100.0
    steps = json.loads(artifacts["embed-images-steps"].data)
    assert steps[0]["step"] == "embed" and steps[0]["sent"] == N_IMAGES and steps[0]["failed"] == 2
    assert 1 <= steps[0]["concurrency_limit"] <= steps[0]["concurrency_peak"] <= 64  # the adaptive limit, shown
    assert "Embedded 32 of 34 images" in artifacts["embed-images-summary"].data
    events = _completed_events("prefect_roboflow.embed_images.completed", run_id)
    assert events and events[0].payload["succeeded"] == N_IMAGES

    # a rerun sends nothing and writes the same table, in fewer task runs: after a batch that sent
    # nothing the next ones grow (the second was cut before the first finished)
    proxy.clear()
    rerun = embed_images(
        str(plain_images), str(out), server=proxy.url, batch_size=10, cache_storage=cache, return_state=True
    )
    again = rerun.result()
    assert proxy.count() == 0 and again.requests == 0 and again.from_cache == N_IMAGES
    assert _table(again.embeddings_path) == rows
    names, artifacts = _run_details(rerun.state_details.flow_run_id, 4)
    batches = ["embed[clip ViT-B-16] batch 1/4", "embed[clip ViT-B-16] batch 2/4", "embed[clip ViT-B-16] batch 3/3"]
    assert names == ["embed-images-assets", *batches] and artifacts["progress"].data == 100.0
    assert json.loads(artifacts["embed-images-steps"].data)[0]["batches"] == 3

    # a superset sends only the new images
    for i in range(5):
        (plain_images / f"new_{i}.png").write_bytes(make_image(500 + i))
    superset = embed_images(str(plain_images), str(out), server=proxy.url, batch_size=10, cache_storage=cache)
    assert proxy.count("/clip/embed_image") == 5 and superset.succeeded == N_IMAGES + 5


def test_detect_crop_classify_flow(proxy: FaultProxy, inference_url: str, scenes: Path, tmp_path: Path) -> None:
    examples, _ = example_spec()
    cache, out = str(tmp_path / "cache"), tmp_path / "out"
    kwargs = {"server": proxy.url, "confidence": 0.99, "batch_size": 12, "cache_storage": cache, "padding": 4}
    state = detect_crop_classify(str(scenes), examples, LABELS, str(out), return_state=True, **kwargs)
    result = state.result()
    rows = _table(result.detections_path)
    assert pq.read_schema(result.detections_path).equals(DETECTIONS_SCHEMA)

    # detections per image are exactly what the server finds for it
    direct = OwlV2(server=InferenceServer(api_url=inference_url)).detect_batch(
        sorted(str(p) for p in scenes.glob("scene_*.png")), reference_examples(examples), confidence=0.99
    )
    per_image: dict[str, list[dict]] = {}
    for row in rows:
        per_image.setdefault(Path(row["image_ref"]).name, []).append(row)
    for path, detections in zip(sorted(scenes.glob("scene_*.png")), direct, strict=True):
        got = [r for r in per_image.get(path.name, []) if r["detection_index"] is not None]
        assert len(got) == len(detections), path.name
        np.testing.assert_allclose(np.array([r["box_xyxy"] for r in got]).reshape(-1, 4), detections.xyxy, atol=1e-3)
    assert sum(len(d) for d in direct) == result.detections + result.detections_failed > 0

    # every detection row is labelled with one of the prompts, scored against all of them
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == result.detections and all(r["label"] in LABELS and len(r["label_scores"]) == 3 for r in ok)
    assert all(len(r["embedding"]) == 512 for r in ok)
    assert sum(result.label_counts.values()) == result.detections
    failed_images = {
        Path(r["image_ref"]).name: r["error"] for r in rows if r["status"] == "failed" and r["detection_index"] is None
    }
    assert failed_images == {
        "zz_corrupt.png": "truncated PNG (no IEND chunk)",
        "zz_empty.png": "image is empty (0 bytes)",
    }
    assert result.images == N_IMAGES + 2 and result.images_failed == 2
    # every image has a row: an image the server finds nothing in has one saying so
    assert set(per_image) == {p.name for p in scenes.iterdir()}
    empty = sorted(r["image_ref"] for r in rows if r["status"] == "no_detections")
    expected_empty = [str(p) for p, found in zip(sorted(scenes.glob("scene_*.png")), direct, strict=True) if not found]
    assert expected_empty, "the seeded placeholder detector finds nothing in some scenes: this checks their rows"
    assert empty == expected_empty and result.images_without_detections == len(expected_empty)
    annotated = sorted(p.name.split("-")[0] for p in Path(result.annotated_dir).iterdir())
    assert annotated == sorted(
        name[:-4] for name, found in per_image.items() if any(r["detection_index"] is not None for r in found)
    )

    # requests: one per image to OWLv2, one per non-empty crop to CLIP, one for the labels
    assert proxy.count("/owlv2/infer") == N_IMAGES + 1  # and the example-box check on the reference image
    assert proxy.count("/clip/embed_image") == result.detections
    assert proxy.count("/clip/embed_text") == 1

    run_id = state.state_details.flow_run_id
    names, artifacts = _run_details(run_id, 14)
    for step in ("detect[owlv2 owlv2-large-patch14-ensemble]", "embed[clip ViT-B-16]", "classify[clip ViT-B-16]"):
        assert [n for n in names if n.startswith(step)] == [f"{step} batch {i}/3" for i in range(1, 4)]
    assert "embed_labels[clip ViT-B-16] batch 1/1" in names
    assert {"progress", "detect-crop-classify-steps", "detect-crop-classify-summary"} <= set(artifacts)
    steps = {s["step"]: s for s in json.loads(artifacts["detect-crop-classify-steps"].data)}
    assert steps["detect"]["sent"] == N_IMAGES and steps["detect"]["requests"] == N_IMAGES
    assert "## Labels" in artifacts["detect-crop-classify-summary"].data
    assert _completed_events("prefect_roboflow.detect_crop_classify.completed", run_id)

    # a rerun sends nothing (labels included) and writes the same table
    proxy.clear()
    again = detect_crop_classify(str(scenes), examples, LABELS, str(out), **kwargs)
    assert proxy.count() == 0 and again.requests == 0
    assert _table(again.detections_path) == rows

    # a superset sends only the new scenes and their crops
    for i in range(3):
        (scenes / f"scene_new_{i}.png").write_bytes(make_scene(300 + i))
    superset = detect_crop_classify(str(scenes), examples, LABELS, str(out), **kwargs)
    assert proxy.count("/owlv2/infer") == 3
    assert proxy.count("/clip/embed_image") == superset.detections - result.detections
    assert proxy.count("/clip/embed_text") == 0


def test_classify_and_search_flows(proxy: FaultProxy, inference_url: str, plain_images: Path, tmp_path: Path) -> None:
    kwargs = {"server": proxy.url, "model": "perception_encoder", "cache_storage": str(tmp_path / "cache")}
    result = classify_images(str(plain_images), LABELS, str(tmp_path / "out"), **kwargs)
    rows = _table(result.classifications_path)
    assert (result.images, result.succeeded, result.failed) == (N_IMAGES + 2, N_IMAGES, 2)
    assert proxy.count("/perception_encoder/embed_image") == 4  # 32 images, 8 per request
    assert proxy.count("/perception_encoder/embed_text") == 1
    ok = [r for r in rows if r["status"] == "ok"]
    scores = np.array([r["label_scores"] for r in ok])
    assert [r["label"] for r in ok] == [LABELS[i] for i in scores.argmax(axis=1)]
    np.testing.assert_allclose([r["label_score"] for r in ok], scores.max(axis=1), atol=1e-6)

    proxy.clear()
    again = classify_images(str(plain_images), LABELS, str(tmp_path / "out"), **kwargs)
    assert proxy.count() == 0 and _table(again.classifications_path) == rows

    # search: the text query embedded by the table's model; hits ranked by cosine similarity
    found = search_images("a photo of a box", result.classifications_path, top_k=5, server=inference_url)
    assert (
        found.model == "perception_encoder PE-Core-L14-336" and found.searched_rows == N_IMAGES and len(found.hits) == 5
    )
    query = PerceptionEncoder(server=InferenceServer(api_url=inference_url)).embed_texts(["a photo of a box"])[0]
    matrix = np.array([r["embedding"] for r in ok])
    expected = (matrix / np.linalg.norm(matrix, axis=1, keepdims=True)) @ (query / np.linalg.norm(query))
    assert [h.image_ref for h in found.hits] == [ok[i]["image_ref"] for i in np.argsort(-expected, kind="stable")[:5]]
    np.testing.assert_allclose([h.score for h in found.hits], np.sort(expected)[::-1][:5], atol=1e-5)
    # an example image as the query finds itself first
    image_hit = search_images(ok[3]["image_ref"], result.classifications_path, top_k=1, server=inference_url)
    assert image_hit.hits[0].image_ref == ok[3]["image_ref"] and image_hit.hits[0].score > 0.999


def test_examples_must_be_readable(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"examples\[0\].image"):
        reference_examples(
            [{"image": str(tmp_path / "missing.png"), "boxes": [{"x": 1, "y": 1, "w": 2, "h": 2, "cls": "a"}]}]
        )


def test_record_responses_sees_the_requests_of_a_flow(proxy: FaultProxy, plain_images: Path, tmp_path: Path) -> None:
    from prefect_roboflow.blocks import record_responses

    with record_responses() as infos:
        result = embed_images(
            str(plain_images), str(tmp_path / "out"), server=proxy.url, cache_storage=str(tmp_path / "c")
        )
    assert len(infos) == result.requests == proxy.count() == N_IMAGES
    assert sum(i.server_time or 0 for i in infos) == pytest.approx(result.server_seconds, abs=1e-3)


def test_tables_name_the_model_family_and_bad_outputs_fail_before_any_request(
    proxy: FaultProxy, plain_images: Path, tmp_path: Path
) -> None:
    cache = str(tmp_path / "cache")
    result = embed_images(str(plain_images), str(tmp_path / "out"), server=proxy.url, cache_storage=cache)
    assert {(r["model"], r["version"]) for r in _table(result.embeddings_path)} == {("clip", "ViT-B-16")}

    proxy.clear()
    (tmp_path / "taken").write_text("a file where the output folder should be")
    examples, _ = example_spec()
    with pytest.raises(InvalidInputError, match="out_dir"):
        detect_crop_classify(str(plain_images), examples, LABELS, str(tmp_path / "taken"), server=proxy.url)
    with pytest.raises(InvalidInputError, match="out_dir"):
        classify_images(str(plain_images), LABELS, str(tmp_path / "taken"), server=proxy.url, cache_storage=cache)
    assert proxy.count() == 0
