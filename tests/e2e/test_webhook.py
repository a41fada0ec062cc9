"""The webhook receiver (deployments/webhook.py) as a real process, against a real Prefect server.

Proves: a correctly signed request is answered 202 and its event is in Prefect, typed as sent;
unsigned, badly signed, oversized and malformed requests get 401/413/422 and put nothing in
Prefect; the secret can come from a Prefect Secret block and is never logged; and the trigger
templates (serve.py, prefect.yaml) render, through Prefect's own code, to the flow parameters
the webhook promises, with the flows' own defaults.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from uuid import uuid4

import httpx
import pytest
import webhook
import yaml
from _e2e import API_TIMEOUT, DEPLOYMENTS, SECRET, PrefectServer, WebhookReceiver, free_port, wait_for
from support.images import make_scene


def _events_with(api: Any, marker: str) -> list[dict[str, Any]]:
    """The images-arrived events whose payload mentions ``marker``."""
    return [e for e in api.events(webhook.EVENT) if marker in json.dumps(e.get("payload", {}))]


def test_signature_helpers() -> None:
    body = b'{"images": ["a.png"]}'
    header = webhook.sign(body, "s" * 32)
    assert header.startswith("sha256=") and len(header) == 7 + 64
    assert webhook.signature_ok(body, header, "s" * 32)
    assert webhook.signature_ok(body, f" {header} ", "s" * 32)
    assert not webhook.signature_ok(body + b" ", header, "s" * 32)  # any change to the body
    assert not webhook.signature_ok(body, header, "t" * 32)  # another secret
    assert not webhook.signature_ok(body, header.removeprefix("sha256="), "s" * 32)
    assert not webhook.signature_ok(body, None, "s" * 32)
    assert not webhook.signature_ok(body, "", "s" * 32)


@pytest.mark.slow
def test_signed_request_emits_the_event(
    webhook_receiver: WebhookReceiver, prefect_server: PrefectServer, tmp_path: Path
) -> None:
    # real images: when serve.py's deployments exist, this event runs detect_crop_classify for real
    for i in range(2):
        (tmp_path / f"scene_{uuid4().hex}.png").write_bytes(make_scene(40 + i))
    images = sorted(str(p) for p in tmp_path.glob("scene_*.png"))
    marker = images[0]
    payload = {"images": images, "flow": "detect_crop_classify", "parameters": {"confidence": "0.99", "min_score": 0.2}}
    response = webhook_receiver.post_signed(payload)

    assert response.status_code == 202, response.text
    answer = response.json()
    assert answer == {**answer, "event": webhook.EVENT, "flow": "detect_crop_classify", "images": 2}
    events = wait_for(lambda: _events_with(prefect_server.api, marker), 60, "the event", webhook_receiver.process)
    assert len(events) == 1
    event = events[0]
    assert event["id"] == answer["event_id"]
    assert event["resource"]["prefect.resource.id"] == webhook.RESOURCE_ID
    assert event["resource"][webhook.FLOW_LABEL] == "detect_crop_classify"
    assert event["payload"] == {
        "images": payload["images"],
        "flow": "detect_crop_classify",
        "parameters": {"confidence": 0.99, "min_score": 0.2},  # "0.99" arrived as a string, sent on as JSON numbers
    }


def _bad_requests(marker: str) -> list[tuple[str, dict[str, Any]]]:
    """(what is wrong, request) pairs; every body mentions the marker."""
    good = {"images": [marker], "flow": "embed_images"}
    body = json.dumps(good).encode()
    other_secret = webhook.sign(body, "another-secret-of-32-characters!")

    def signed(raw: bytes) -> dict[str, Any]:
        return {"body": raw, "signature": webhook.sign(raw, SECRET)}

    def schema(payload: dict[str, Any]) -> dict[str, Any]:
        return signed(json.dumps(payload).encode())

    return [
        ("unsigned", {"body": body, "expect": 401}),
        ("empty signature", {"body": body, "signature": "", "expect": 401}),
        ("signed with another secret", {"body": body, "signature": other_secret, "expect": 401}),
        ("signature of another body", {"body": body + b" ", "signature": webhook.sign(body, SECRET), "expect": 401}),
        ("hex without the sha256= prefix", {"body": body, "signature": webhook.sign(body, SECRET)[7:], "expect": 401}),
        ("oversized, signed", {**signed(body + b" " * (64 * 1024)), "expect": 413}),
        ("oversized, unsigned", {"body": body + b" " * (200 * 1024), "expect": 413}),
        ("not JSON", {**signed(b"images=" + marker.encode()), "expect": 422}),
        ("no images", {**schema({"images": [], "flow": "embed_images", "note": marker}), "expect": 422}),
        ("images not a list", {**schema({"images": marker}), "expect": 422}),
        ("http:// URL", {**schema({"images": [f"http://example.invalid{marker}"]}), "expect": 422}),
        ("unknown flow", {**schema({"images": [marker], "flow": "search_images"}), "expect": 422}),
        ("unknown top-level key", {**schema({**good, "labels": ["x"]}), "expect": 422}),
        ("parameter of another flow", {**schema({**good, "parameters": {"confidence": 0.5}}), "expect": 422}),
        ("parameter of the wrong type", {**schema({**good, "parameters": {"batch_size": "many"}}), "expect": 422}),
        ("parameter out of range", {**schema({**good, "parameters": {"batch_size": 0}}), "expect": 422}),
        ("the output folder", {**schema({**good, "parameters": {"out_dir": "/etc"}}), "expect": 422}),
    ]


@pytest.mark.slow
def test_rejected_requests_emit_nothing(webhook_receiver: WebhookReceiver, prefect_server: PrefectServer) -> None:
    marker = f"/nonexistent/{uuid4().hex}.png"
    answers = {}
    for what, request in _bad_requests(marker):
        response = webhook_receiver.post(request["body"], request.get("signature"))
        answers[what] = (response.status_code, request["expect"])
        assert "detail" in response.json()
    assert {what: got for what, (got, _) in answers.items()} == {what: want for what, (_, want) in answers.items()}

    # a body over the limit without a Content-Length (chunked) is cut off too
    def chunks() -> Iterator[bytes]:
        yield json.dumps({"images": [marker]}).encode()
        for _ in range(80):
            yield b" " * 1024

    chunked = httpx.post(f"{webhook_receiver.url}/webhooks/images", content=chunks(), timeout=API_TIMEOUT)
    assert chunked.status_code == 413

    # events reach the store in order: once a later marker event is readable, none of ours is there
    prefect_server.api.mark_events()
    assert _events_with(prefect_server.api, marker) == []


@pytest.mark.slow
def test_malformed_but_signed_422_lists_the_fields(webhook_receiver: WebhookReceiver) -> None:
    response = webhook_receiver.post_signed({"images": ["ok.png", "ftp://x/y.png"], "parameters": {"batch_size": -1}})
    assert response.status_code == 422
    locations = [tuple(e["loc"]) for e in response.json()["detail"]]
    assert locations == [("images",)]  # the body schema is checked before the flow's parameters
    response = webhook_receiver.post_signed({"images": ["ok.png"], "parameters": {"batch_size": -1}})
    assert [tuple(e["loc"]) for e in response.json()["detail"]] == [("parameters", "batch_size")]


@pytest.mark.slow
def test_the_secret_never_appears_in_logs_or_answers(webhook_receiver: WebhookReceiver) -> None:
    response = webhook_receiver.post(b'{"images": ["a.png"]}', "sha256=" + "0" * 64)
    assert response.status_code == 401 and SECRET not in response.text
    log = webhook_receiver.process.log.read_text()
    assert "rejected a request" in log and SECRET not in log


@pytest.mark.slow
def test_secret_from_a_prefect_secret_block(prefect_server: PrefectServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.blocks.system import Secret
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv(webhook.SECRET_ENV, raising=False)
    monkeypatch.delenv(webhook.SECRET_BLOCK_ENV, raising=False)
    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api.url}):
        Secret(value="from-a-block-0123456789").save("e2e-webhook-secret", overwrite=True)  # type: ignore[arg-type]
        Secret(value="short").save("e2e-short-secret", overwrite=True)  # type: ignore[arg-type]
        assert asyncio.run(webhook.load_secret(secret_block="e2e-webhook-secret")) == "from-a-block-0123456789"
        monkeypatch.setenv(webhook.SECRET_BLOCK_ENV, "e2e-webhook-secret")
        assert asyncio.run(webhook.load_secret()) == "from-a-block-0123456789"
        with pytest.raises(RuntimeError, match="no webhook secret"):
            asyncio.run(webhook.load_secret(secret_block="e2e-short-secret"))
    monkeypatch.delenv(webhook.SECRET_BLOCK_ENV)
    with pytest.raises(RuntimeError, match="no webhook secret"):
        asyncio.run(webhook.load_secret())


def test_the_app_refuses_to_start_without_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(webhook.SECRET_ENV, raising=False)
    monkeypatch.delenv(webhook.SECRET_BLOCK_ENV, raising=False)
    app = webhook.create_app()

    async def start() -> None:
        async with app.router.lifespan_context(app):
            pass

    with pytest.raises(RuntimeError, match="no webhook secret"):
        asyncio.run(start())


def test_prefect_unreachable_is_503_and_the_sender_can_retry() -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    app = webhook.create_app(secret=SECRET)
    body = json.dumps({"images": ["a.png"]}).encode()
    headers = {"content-type": "application/json", webhook.SIGNATURE_HEADER: webhook.sign(body, SECRET)}

    async def post() -> httpx.Response:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://webhook") as client:
                return await client.post("/webhooks/images", content=body, headers=headers)

    with temporary_settings(updates={PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api"}):  # nobody there
        response = asyncio.run(post())
    assert response.status_code == 503 and "try again" in response.json()["detail"]


def _render(parameters: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
    """What Prefect's run-deployment action passes to the flow for an event with ``payload``."""
    from prefect.server.events.actions import RunDeployment
    from prefect.server.events.schemas.events import ReceivedEvent
    from prefect.utilities.schema_tools.hydration import HydrationContext, hydrate

    event = ReceivedEvent.model_validate(
        {
            "id": uuid4(),
            "occurred": datetime.now(timezone.utc),
            "event": webhook.EVENT,
            "resource": {"prefect.resource.id": webhook.RESOURCE_ID},
            "payload": payload,
        }
    )
    # validates the templates as Prefect does when the trigger is created
    action = RunDeployment.model_validate({"source": "selected", "deployment_id": uuid4(), "parameters": parameters})
    templates = json.loads(json.dumps(action.parameters))
    RunDeployment._upgrade_v1_templates(templates)
    context = HydrationContext(raise_on_error=True, render_jinja=True, jinja_context={"event": event})
    rendered = hydrate(templates, context)
    rendered["out_dir"] = rendered["out_dir"].replace(str(event.id), "<event id>")
    return rendered


@pytest.mark.parametrize("flow", ["embed_images", "detect_crop_classify"])
def test_trigger_parameters_render_to_typed_flow_parameters(flow: str) -> None:
    from prefect_roboflow import flows

    templates = webhook.trigger_parameters(flow, "/data/out/x")
    images = ["/data/in/a b.png", "https://example.com/c.jpg"]
    defaults = {
        name: p.default
        for name, p in inspect.signature(getattr(flows, flow).fn).parameters.items()
        if name in webhook.OVERRIDES[flow]
    }
    # nothing sent: the list stays a list, the rest are the flow's own defaults
    rendered = _render(templates, {"images": images, "flow": flow, "parameters": {}})
    assert rendered == {"images": images, "out_dir": "/data/out/x/events/<event id>", **defaults}
    # a payload without "parameters" (e.g. from a hand-written Prefect Cloud template) works too
    assert _render(templates, {"images": images}) == rendered
    # what the webhook accepts comes through with its type
    sent = webhook.parse_body(json.dumps({"images": images, "flow": flow, "parameters": {"version": "v9"}}).encode())
    assert _render(templates, sent.model_dump())["version"] == "v9"
    override = {"batch_size": 3} if flow == "embed_images" else {"confidence": 0.5, "min_score": -0.1}
    assert _render(templates, {"images": images, "parameters": override}) == {**rendered, **override}


def test_prefect_yaml_triggers_match_the_webhook() -> None:
    spec = yaml.safe_load((DEPLOYMENTS / "prefect.yaml").read_text())
    by_entrypoint = {d["entrypoint"].rsplit(":", 1)[1]: d for d in spec["deployments"]}
    assert sorted(by_entrypoint) == ["classify_images", "detect_crop_classify", "embed_images", "search_images"]
    for flow, deployment in by_entrypoint.items():
        assert deployment["work_pool"]["name"] == "roboflow"
        triggers = deployment.get("triggers", [])
        if flow not in webhook.OVERRIDES:
            assert triggers == []
            continue
        (trigger,) = triggers
        assert trigger["expect"] == [webhook.EVENT] and trigger["match"] == webhook.trigger_match(flow)
        key = flow.replace("_", "-")
        assert trigger["parameters"] == webhook.trigger_parameters(flow, "{{ $OUT_DIR }}/" + key)
        assert deployment["parameters"]["out_dir"] == "{{ $OUT_DIR }}/" + key
    assert any(s.get("cron") for d in spec["deployments"] for s in d.get("schedules", []))
    for example in by_entrypoint["detect_crop_classify"]["parameters"]["examples"]:
        assert (DEPLOYMENTS / example["image"]).is_file()  # relative to the workers' folder, deployments/


def test_webhook_module_is_light() -> None:
    # the receiver starts in a second: importing it loads neither the flows nor the image stack
    code = "import sys, webhook; print(sorted(m for m in ('prefect_roboflow', 'numpy', 'PIL') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], cwd=DEPLOYMENTS, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
