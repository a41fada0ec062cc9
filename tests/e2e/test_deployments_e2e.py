"""The deployments end to end on a real `prefect server start`, against the real inference server.

Proves: serve.py's interval schedule produces a run that completes and writes its table; a signed
webhook POST runs embed_images (and detect_crop_classify) over exactly the posted images, and an
unsigned one runs nothing; `prefect deploy --all` turns prefect.yaml into four deployments on a
process work pool with their schedules and triggers, and a process worker runs one from an event.
"""

from __future__ import annotations

import json
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jinja2
import pyarrow.parquet as pq
import pytest
import webhook
from _e2e import (
    DEPLOYMENTS,
    PrefectServer,
    Process,
    Served,
    TriggeredRun,
    WebhookReceiver,
    wait_for_triggered_run,
)
from support.images import make_image, make_scene

pytestmark = [pytest.mark.slow, pytest.mark.server]


def _rows(path: Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()


def test_a_schedule_produces_a_run(served: Served, first_scheduled_run: dict[str, Any], e2e_images: Path) -> None:
    run = first_scheduled_run
    assert run["state_type"] == "COMPLETED", run["state"]
    assert "auto-scheduled" in run["tags"] and run["created_by"]["display_value"] == "IntervalSchedule"
    assert run["parameters"]["images"] == str(e2e_images)
    rows = _rows(served.out / "embed-images" / "embeddings.parquet")
    assert sorted(Path(r["image_ref"]).name for r in rows) == sorted(p.name for p in e2e_images.iterdir())
    assert all(r["status"] == "ok" and len(r["embedding"]) == 512 for r in rows)


def test_a_signed_webhook_post_runs_embed_images(
    embed_webhook_run: TriggeredRun, served: Served, prefect_server: PrefectServer
) -> None:
    run, event_id = embed_webhook_run.flow_run, embed_webhook_run.event_id
    assert run["state_type"] == "COMPLETED", run["state"]
    assert run["created_by"]["type"] == "AUTOMATION"
    assert run["created_by"]["display_value"] == "embed_images when images arrive"
    # the event's images, as a list (templated from {{ event.payload.images }}), and its parameters
    out = served.out / "embed-images" / "events" / event_id
    assert run["parameters"]["images"] == embed_webhook_run.images
    assert run["parameters"]["out_dir"] == str(out)
    assert run["parameters"]["batch_size"] == 2 and run["parameters"]["model"] == "clip"
    # its table: one row per posted image, in order, embedded by the real server
    rows = _rows(out / "embeddings.parquet")
    assert [r["image_ref"] for r in rows] == embed_webhook_run.images
    assert all(r["status"] == "ok" and len(r["embedding"]) == 512 for r in rows)
    names = prefect_server.api.task_run_names(run["id"], 4)
    # the batch tasks, and the task that materialises the run's outputs as assets
    assert names == ["embed-images-assets", *(f"embed[clip ViT-B-16] batch {i}/3" for i in (1, 2, 3))]


def test_a_signed_webhook_post_runs_detect_crop_classify(
    embed_webhook_run: TriggeredRun,  # after the schedule is paused, and one run at a time
    served: Served,
    webhook_receiver: WebhookReceiver,
    prefect_server: PrefectServer,
    tmp_path: Path,
) -> None:
    images = []
    for i in range(3):
        (tmp_path / f"shelf_{i}.png").write_bytes(make_scene(70 + i))
        images.append(str(tmp_path / f"shelf_{i}.png"))
    response = webhook_receiver.post_signed(
        {"images": images, "flow": "detect_crop_classify", "parameters": {"confidence": 0.99, "min_score": -1}}
    )
    assert response.status_code == 202, response.text
    event_id = response.json()["event_id"]
    deployment = served.deployments["detect-crop-classify"]
    logs = (served.process, webhook_receiver.process, prefect_server.process)
    run = wait_for_triggered_run(prefect_server.api, deployment["id"], event_id, 180, *logs)
    assert run["state_type"] == "COMPLETED", run["state"]
    assert run["parameters"]["images"] == images
    assert run["parameters"]["examples"] == deployment["parameters"]["examples"]  # the deployment's own
    assert (run["parameters"]["confidence"], run["parameters"]["min_score"]) == (0.99, -1)
    rows = _rows(served.out / "detect-crop-classify" / "events" / event_id / "detections.parquet")
    assert {r["image_ref"] for r in rows} == set(images)  # a row per detection, or one saying there is none
    detections = [r for r in rows if r["detection_index"] is not None]
    labels = deployment["parameters"]["labels"]
    assert detections and all(r["status"] == "ok" and r["label"] in labels for r in detections)


def test_an_unsigned_webhook_post_runs_nothing(
    served: Served, webhook_receiver: WebhookReceiver, prefect_server: PrefectServer, tmp_path: Path
) -> None:
    api = prefect_server.api
    unsigned = tmp_path / f"unsigned_{uuid.uuid4().hex}.png"
    unsigned.write_bytes(make_image(6000))
    body = json.dumps({"images": [str(unsigned)], "flow": "embed_images"}).encode()
    assert webhook_receiver.post(body).status_code == 401
    assert webhook_receiver.post(body, "sha256=" + "ab" * 32).status_code == 401

    # then a signed one: once its run is done, a run for the unsigned request would exist already
    signed = tmp_path / "signed.png"
    signed.write_bytes(make_image(6001))
    response = webhook_receiver.post_signed({"images": [str(signed)], "flow": "embed_images"})
    assert response.status_code == 202
    deployment_id = served.deployments["embed-images"]["id"]
    wait_for_triggered_run(api, deployment_id, response.json()["event_id"], 180, served.process)
    every_run = api.flow_runs()
    assert not [r for r in every_run if str(unsigned) in json.dumps(r["parameters"])]
    assert [r for r in every_run if str(signed) in json.dumps(r["parameters"])]


def test_prefect_yaml_deploys_to_a_process_work_pool(
    served: Served,  # its embed deployment answers the same event; both are checked apart by deployment
    embed_webhook_run: TriggeredRun,
    prefect_server: PrefectServer,
    inference_url: str,
    e2e_root: Path,
    e2e_images: Path,
) -> None:
    api, out = prefect_server.api, e2e_root / "out-pool"
    env = prefect_server.env(IMAGES_DIR=str(e2e_images), OUT_DIR=str(out), INFERENCE_SERVER_URL=inference_url)
    prefect = [sys.executable, "-m", "prefect", "--no-prompt"]
    pool = Process.start("work-pool create", [*prefect, "work-pool", "create", "roboflow", "--type", "process"], env,
                         e2e_root / "pool.log")  # fmt: skip
    assert pool.popen.wait(timeout=120) == 0, pool.tail()
    deploy = Process.start("prefect deploy", [*prefect, "deploy", "--all"], env, e2e_root / "deploy.log", DEPLOYMENTS)
    assert deploy.popen.wait(timeout=300) == 0, deploy.tail()

    flows = ["embed-images", "detect-crop-classify", "classify-images", "search-images"]
    found = {flow: api.deployment(flow, "process-pool") for flow in flows}
    deployed = {flow: d for flow, d in found.items() if d}
    assert list(deployed) == flows, found
    try:
        for flow, deployment in deployed.items():
            function = flow.replace("-", "_")
            assert deployment["work_pool_name"] == "roboflow"
            assert deployment["entrypoint"] == f"prefect_roboflow.flows.{function}:{function}"
            assert deployment["job_variables"] == {"env": {"INFERENCE_SERVER_URL": inference_url}}
            assert deployment["pull_steps"] == [
                {"prefect.deployments.steps.set_working_directory": {"directory": str(DEPLOYMENTS)}}
            ]
            assert "{{" not in json.dumps(deployment["parameters"])  # $IMAGES_DIR, $OUT_DIR filled in
        embed, detect = deployed["embed-images"], deployed["detect-crop-classify"]
        assert embed["parameters"] == {"images": str(e2e_images), "out_dir": f"{out}/embed-images"}
        assert [(s["schedule"]["cron"], s["active"]) for s in embed["schedules"]] == [("0 2 * * *", True)]
        assert [(s["schedule"]["cron"], s["active"]) for s in detect["schedules"]] == [("0 3 * * 1-5", False)]
        automations = api.post("/automations/filter", {})
        for flow in ("embed_images", "detect_crop_classify"):
            key = flow.replace("_", "-")
            (automation,) = [a for a in automations if a["actions"][0]["deployment_id"] == deployed[key]["id"]]
            assert automation["trigger"]["match"] == webhook.trigger_match(flow)
            assert automation["trigger"]["expect"] == [webhook.EVENT]
            assert automation["actions"][0]["parameters"] == webhook.trigger_parameters(flow, f"{out}/{key}")

        # a process worker runs the deployment when the event arrives (sent as a relay would: POST /api/events)
        worker_env = {**env, "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "5"}
        worker = Process.start("process worker", [*prefect, "worker", "start", "--pool", "roboflow"], worker_env,
                               e2e_root / "worker.log")  # fmt: skip
        try:
            folder = e2e_root / "pool-images"
            folder.mkdir()
            images = []
            for i in range(2):
                (folder / f"pool_{i}.png").write_bytes(make_image(7000 + i))
                images.append(str(folder / f"pool_{i}.png"))
            event_id = str(uuid.uuid4())
            api.emit(
                {
                    "id": event_id,
                    "occurred": datetime.now(timezone.utc).isoformat(),
                    "event": webhook.EVENT,
                    "resource": {"prefect.resource.id": webhook.RESOURCE_ID, webhook.FLOW_LABEL: "embed_images"},
                    "payload": {"images": images, "flow": "embed_images", "parameters": {}},
                }
            )
            run = wait_for_triggered_run(api, embed["id"], event_id, 240, worker, prefect_server.process)
            assert run["state_type"] == "COMPLETED", run["state"]
            # the worker ran the async flow under the same names as every other way of calling it
            names = api.task_run_names(run["id"], 2)
            assert run["name"] == "embed-images[clip]"
            assert names == ["embed-images-assets", "embed[clip ViT-B-16] batch 1/1"]
            rows = _rows(out / "embed-images" / "events" / event_id / "embeddings.parquet")
            assert [r["image_ref"] for r in rows] == images and all(r["status"] == "ok" for r in rows)
        finally:
            worker.stop(grace=15)
    finally:
        # leave serve.py's deployments alone for the other tests
        for deployment in deployed.values():
            api.delete(f"/deployments/{deployment['id']}")


def test_the_prefect_cloud_template_in_the_readme_starts_the_same_deployment(
    served: Served, embed_webhook_run: TriggeredRun, prefect_server: PrefectServer, tmp_path: Path
) -> None:
    # Prefect Cloud renders its webhook template with Jinja over the request body; render the
    # documented template the same way and send the event it makes to the self-hosted server
    readme = (DEPLOYMENTS / "README.md").read_text()
    template = readme.split("```jinja\n", 1)[1].split("```", 1)[0]
    images = []
    for i in range(2):
        (tmp_path / f"cloud_{i}.png").write_bytes(make_image(8000 + i))
        images.append(str(tmp_path / f"cloud_{i}.png"))
    body = {"images": images, "parameters": {"batch_size": 1}}  # "flow" left out: embed_images
    event = json.loads(jinja2.Environment().from_string(template).render(body=body))
    assert event["resource"][webhook.FLOW_LABEL] == "embed_images"
    event_id = str(uuid.uuid4())
    prefect_server.api.emit({**event, "id": event_id, "occurred": datetime.now(timezone.utc).isoformat()})
    deployment_id = served.deployments["embed-images"]["id"]
    run = wait_for_triggered_run(prefect_server.api, deployment_id, event_id, 180, served.process)
    assert run["state_type"] == "COMPLETED", run["state"]
    assert run["parameters"]["images"] == images and run["parameters"]["batch_size"] == 1


def test_run_deployment_runs_a_served_flow(served: Served, prefect_server: PrefectServer, tmp_path: Path) -> None:
    """`run_deployment` (what a parent flow uses to fan work out) runs the served async flow to its end."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"run_{i}.png").write_bytes(make_image(6100 + i))
    out = tmp_path / "out"
    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api.url}):
        run = run_deployment(
            "embed-images/" + served.deployments["embed-images"]["name"],
            parameters={"images": str(images), "out_dir": str(out), "batch_size": 2},
            timeout=240,
        )
    assert run.state is not None and run.state.is_completed(), run.state
    assert run.name == "embed-images[clip]"
    names = prefect_server.api.task_run_names(str(run.id), 3)
    assert names == ["embed-images-assets", "embed[clip ViT-B-16] batch 1/2", "embed[clip ViT-B-16] batch 2/2"]
    assert [Path(r["image_ref"]).name for r in _rows(out / "embeddings.parquet")] == [f"run_{i}.png" for i in range(3)]
