"""The webhook receiver (deployments/webhook.py) as a real process, against a real Prefect server.

Proves: a correctly signed request is answered 202 and its event is in Prefect, typed as sent;
unsigned, badly signed, stale (timestamp outside the window), oversized and malformed requests
get 401/413/422 and put nothing in Prefect; a replayed request gets 401 and its event is in
Prefect once; the secret can come from a Prefect Secret block and is never logged; and the
trigger templates (serve.py, prefect.yaml) render, through Prefect's own code, to the flow
parameters the webhook promises, with the flows' own defaults. The replay guard's window and
memory are also tested in-process against a clock the test sets.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import inspect
import json
import logging
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar
from uuid import uuid4

import httpx
import pytest
import webhook
import yaml
from _e2e import API_TIMEOUT, DEPLOYMENTS, SECRET, PrefectServer, WebhookReceiver, free_port, wait_for
from fastapi import FastAPI
from support.images import make_scene


def _events_with(api: Any, marker: str) -> list[dict[str, Any]]:
    """The images-arrived events whose payload mentions ``marker``."""
    return [e for e in api.events(webhook.EVENT) if marker in json.dumps(e.get("payload", {}))]


def test_signature_helpers() -> None:
    body, secret, delivery, ts = b'{"images": ["a.png"]}', "s" * 32, "d-1", 1_700_000_000
    header = webhook.sign(body, secret, delivery, ts)
    assert header.startswith("sha256=") and len(header) == 7 + 64
    content = f"{delivery}.{ts}.".encode() + body  # what is signed, as documented
    assert header == "sha256=" + hmac.new(secret.encode(), content, hashlib.sha256).hexdigest()
    assert webhook.signature_ok(body, header, secret, delivery, ts)
    assert webhook.signature_ok(body, f" {header} ", secret, delivery, str(ts))
    assert not webhook.signature_ok(body + b" ", header, secret, delivery, ts)  # any change to the body
    assert not webhook.signature_ok(body, header, "t" * 32, delivery, ts)  # another secret
    assert not webhook.signature_ok(body, header, secret, "d-2", ts)  # another delivery id
    assert not webhook.signature_ok(body, header, secret, delivery, ts + 1)  # another timestamp
    assert not webhook.signature_ok(body, header.removeprefix("sha256="), secret, delivery, ts)
    assert not webhook.signature_ok(body, None, secret, delivery, ts)
    assert not webhook.signature_ok(body, "", secret, delivery, ts)

    headers = webhook.signature_headers(body, secret)
    assert sorted(headers) == sorted([webhook.ID_HEADER, webhook.TIMESTAMP_HEADER, webhook.SIGNATURE_HEADER])
    assert webhook.DELIVERY_ID.fullmatch(headers[webhook.ID_HEADER])
    assert abs(int(headers[webhook.TIMESTAMP_HEADER]) - time.time()) < 3600  # the time now, not a constant
    assert headers[webhook.SIGNATURE_HEADER] == webhook.sign(
        body, secret, headers[webhook.ID_HEADER], headers[webhook.TIMESTAMP_HEADER]
    )
    assert webhook.signature_headers(body, secret)[webhook.ID_HEADER] != headers[webhook.ID_HEADER]
    given = webhook.signature_headers(body, secret, delivery_id=delivery, timestamp=ts)
    assert given == {webhook.ID_HEADER: delivery, webhook.TIMESTAMP_HEADER: str(ts), webhook.SIGNATURE_HEADER: header}


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
    now = int(time.time())
    an_hour = 3600  # far outside the receiver's 300 s window, whatever the time a request takes
    ID, TS, SIG = webhook.ID_HEADER, webhook.TIMESTAMP_HEADER, webhook.SIGNATURE_HEADER

    def headers(raw: bytes = body, secret: str = SECRET, **fields: Any) -> dict[str, str]:
        return webhook.signature_headers(raw, secret, **fields)

    def signed(raw: bytes) -> dict[str, Any]:
        return {"body": raw, "headers": headers(raw)}

    def schema(payload: dict[str, Any]) -> dict[str, Any]:
        return signed(json.dumps(payload).encode())

    def without(name: str) -> dict[str, str]:
        return {k: v for k, v in headers().items() if k != name}

    return [
        ("unsigned", {"body": body, "expect": 401}),
        ("empty signature", {"body": body, "headers": {**headers(), SIG: ""}, "expect": 401}),
        (
            "signed with another secret",
            {"body": body, "headers": headers(secret="another-secret-of-32-characters!"), "expect": 401},
        ),
        ("signature of another body", {"body": body + b" ", "headers": headers(), "expect": 401}),
        (
            "hex without the sha256= prefix",
            {"body": body, "headers": {**(h := headers()), SIG: h[SIG][7:]}, "expect": 401},
        ),
        ("no delivery id", {"body": body, "headers": without(ID), "expect": 401}),
        ("no timestamp", {"body": body, "headers": without(TS), "expect": 401}),
        ("signature only", {"body": body, "headers": {SIG: headers()[SIG]}, "expect": 401}),
        (
            "signature over another delivery id",
            {"body": body, "headers": {**headers(), ID: uuid4().hex}, "expect": 401},
        ),
        (
            "signature over another timestamp",
            {"body": body, "headers": {**headers(timestamp=now), TS: str(now + 1)}, "expect": 401},
        ),
        ("delivery id with a dot", {"body": body, "headers": headers(delivery_id="a.b"), "expect": 401}),
        ("delivery id too long", {"body": body, "headers": headers(delivery_id="x" * 129), "expect": 401}),
        (
            "timestamp not an integer",
            {
                "body": body,
                "headers": {ID: "d", TS: f"{now}.5", SIG: webhook.sign(body, SECRET, "d", f"{now}.5")},
                "expect": 401,
            },
        ),
        ("timestamp an hour old, signed", {"body": body, "headers": headers(timestamp=now - an_hour), "expect": 401}),
        ("timestamp an hour ahead, signed", {"body": body, "headers": headers(timestamp=now + an_hour), "expect": 401}),
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
        response = webhook_receiver.post(request["body"], headers=request.get("headers"))
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
def test_a_replayed_request_is_401_and_emits_one_event(
    webhook_receiver: WebhookReceiver, prefect_server: PrefectServer
) -> None:
    marker = f"/nonexistent/{uuid4().hex}.png"
    body = json.dumps({"images": [marker], "flow": "embed_images"}).encode()
    headers = webhook.signature_headers(body, SECRET)
    first = webhook_receiver.post(body, headers=headers)
    assert first.status_code == 202, first.text

    replayed = webhook_receiver.post(body, headers=headers)  # the same bytes, captured and sent again
    assert replayed.status_code == 401
    assert replayed.json() == {"detail": f"delivery {headers[webhook.ID_HEADER]} was already received"}
    # the same delivery id signed again with a later timestamp is the same delivery too
    delivery, ts = headers[webhook.ID_HEADER], int(headers[webhook.TIMESTAMP_HEADER])
    again = webhook.signature_headers(body, SECRET, delivery_id=delivery, timestamp=ts + 1)
    assert webhook_receiver.post(body, headers=again).status_code == 401

    prefect_server.api.mark_events()  # events sent before the marker are readable now
    assert [e["id"] for e in _events_with(prefect_server.api, marker)] == [first.json()["event_id"]]
    log = webhook_receiver.process.log.read_text()
    assert f"delivery {delivery} replayed" in log
    assert headers[webhook.SIGNATURE_HEADER] not in log and again[webhook.SIGNATURE_HEADER] not in log


@pytest.mark.slow
def test_the_secret_never_appears_in_logs_or_answers(webhook_receiver: WebhookReceiver) -> None:
    body = b'{"images": ["a.png"]}'
    wrong = {**webhook.signature_headers(body, SECRET), webhook.SIGNATURE_HEADER: "sha256=" + "0" * 64}
    response = webhook_receiver.post(body, headers=wrong)
    assert response.status_code == 401 and SECRET not in response.text
    log = webhook_receiver.process.log.read_text()
    assert "rejected a request" in log and SECRET not in log and wrong[webhook.SIGNATURE_HEADER] not in log


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
    headers = {"content-type": "application/json", **webhook.signature_headers(body, SECRET)}

    async def post_twice() -> list[httpx.Response]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://webhook") as client:
                return [await client.post("/webhooks/images", content=body, headers=headers) for _ in range(2)]

    with temporary_settings(updates={PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api"}):  # nobody there
        responses = asyncio.run(post_twice())
    # the retry of the same delivery is not taken for a replay: it was never accepted
    for response in responses:
        assert response.status_code == 503 and "try again" in response.json()["detail"]
    assert len(app.state.deliveries) == 0


T0 = 1_700_000_000  # the in-process receivers' clock starts here
BODY = json.dumps({"images": ["a.png"]}).encode()
Poster = Callable[[bytes, dict[str, str]], Awaitable[httpx.Response]]
T = TypeVar("T")


@dataclass
class _Clocked:
    """The receiver in-process (through httpx.ASGITransport) with a clock the test sets; what it emitted."""

    now: float = T0
    emitted: list[Any] = field(default_factory=list)
    gate: asyncio.Event | None = None  # if given, the first emit waits for it

    def app(self, **options: Any) -> FastAPI:
        return webhook.create_app(secret=SECRET, emit=self._emit, clock=lambda: self.now, **options)

    async def _emit(self, event: Any) -> None:
        self.emitted.append(event)
        if self.gate is not None and len(self.emitted) == 1:
            await self.gate.wait()

    def run(self, app: FastAPI, steps: Callable[[Poster], Awaitable[T]]) -> T:
        async def main() -> T:
            async with app.router.lifespan_context(app):
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://webhook") as client:

                    async def post(body: bytes, headers: dict[str, str]) -> httpx.Response:
                        sent = {"content-type": "application/json", **headers}
                        return await client.post("/webhooks/images", content=body, headers=sent)

                    return await steps(post)

        return asyncio.run(main())


def _at(timestamp: float, delivery_id: str | None = None) -> dict[str, str]:
    return webhook.signature_headers(BODY, SECRET, delivery_id=delivery_id, timestamp=int(timestamp))


@pytest.mark.parametrize(
    ("option", "env", "tolerance"),
    [(None, None, webhook.DEFAULT_TOLERANCE), (60, None, 60), (None, "10", 10), (45, "10", 45)],
)
def test_the_timestamp_window_is_the_tolerance_either_side(
    option: int | None, env: str | None, tolerance: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    if env is None:
        monkeypatch.delenv(webhook.TOLERANCE_ENV, raising=False)
    else:
        monkeypatch.setenv(webhook.TOLERANCE_ENV, env)
    clocked = _Clocked()
    app = clocked.app(tolerance_seconds=option)
    offsets = [-tolerance - 1, -tolerance, 0, tolerance, tolerance + 1]

    async def steps(post: Poster) -> list[int]:
        return [(await post(BODY, _at(T0 + offset))).status_code for offset in offsets]

    assert clocked.run(app, steps) == [401, 202, 202, 202, 401]
    assert len(clocked.emitted) == 3


def test_a_replay_is_refused_while_its_id_is_held_then_by_its_timestamp(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="prefect_roboflow.webhook")
    clocked = _Clocked()
    app = clocked.app(tolerance_seconds=300)
    guard = app.state.deliveries
    first = _at(T0, "delivery-1")

    async def steps(post: Poster) -> dict[str, Any]:
        seen: dict[str, Any] = {"first": (await post(BODY, first)).status_code}
        seen["replay"] = (await post(BODY, first)).json()["detail"]
        clocked.now = T0 + 300  # the last second of the window: the id is still held
        seen["replay at the edge"] = (await post(BODY, first)).json()["detail"]
        seen["same id, signed later"] = (await post(BODY, _at(clocked.now, "delivery-1"))).status_code
        seen["held"] = len(guard)
        clocked.now = T0 + 301  # out of the window: the timestamp refuses it, the id can go
        seen["replay after the window"] = (await post(BODY, first)).json()["detail"]
        seen["another delivery"] = (await post(BODY, _at(clocked.now))).status_code
        seen["held after"] = len(guard)
        return seen

    assert clocked.run(app, steps) == {
        "first": 202,
        "replay": "delivery delivery-1 was already received",
        "replay at the edge": "delivery delivery-1 was already received",
        "same id, signed later": 401,
        "held": 1,
        "replay after the window": "timestamp outside the tolerance window",
        "held after": 1,  # delivery-1 was forgotten, the new one is held
        "another delivery": 202,
    }
    assert len(clocked.emitted) == 2
    reasons = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert reasons == [
        "rejected a request from 127.0.0.1: delivery delivery-1 replayed",
        "rejected a request from 127.0.0.1: delivery delivery-1 replayed",
        "rejected a request from 127.0.0.1: delivery delivery-1 replayed",
        "rejected a request from 127.0.0.1: timestamp 301 s old, over 300 s",
    ]
    assert first[webhook.SIGNATURE_HEADER].removeprefix("sha256=") not in caplog.text and SECRET not in caplog.text


def test_held_ids_are_bounded_by_the_window_and_by_a_cap() -> None:
    clocked = _Clocked()
    app = clocked.app(tolerance_seconds=10)
    guard = app.state.deliveries

    async def one_a_second(post: Poster) -> list[int]:
        held = []
        for second in range(60):
            clocked.now = T0 + second
            assert (await post(BODY, _at(clocked.now))).status_code == 202
            held.append(len(guard))
        return held

    # ids whose timestamp is within 10 s of now: at most 11 (now - 10 ... now), however long it runs
    assert clocked.run(app, one_a_second) == [*range(1, 12), *[11] * 49]

    clocked = _Clocked()
    app = clocked.app(tolerance_seconds=300, max_deliveries=3)

    async def burst(post: Poster) -> list[int]:
        answers = [(await post(BODY, _at(T0))).status_code for _ in range(4)]
        clocked.now = T0 + 301  # the first three leave the window: room again
        return [*answers, (await post(BODY, _at(clocked.now))).status_code]

    assert clocked.run(app, burst) == [202, 202, 202, 503, 202]
    assert len(clocked.emitted) == 4


def test_a_duplicate_arriving_while_the_first_is_emitted_is_refused() -> None:
    clocked = _Clocked(gate=asyncio.Event())
    app = clocked.app()
    headers = _at(T0)

    async def steps(post: Poster) -> list[int]:
        assert clocked.gate is not None
        first = asyncio.create_task(post(BODY, headers))
        for _ in range(10_000):  # until the first request is inside emit() (a few loop turns)
            if clocked.emitted:
                break
            await asyncio.sleep(0)
        assert clocked.emitted, "the first request never reached emit()"
        second = await post(BODY, headers)
        clocked.gate.set()
        return [(await first).status_code, second.status_code]

    assert clocked.run(app, steps) == [202, 401]
    assert len(clocked.emitted) == 1


def test_a_delivery_refused_for_its_body_can_be_sent_again_fixed() -> None:
    clocked = _Clocked()
    app = clocked.app()
    bad = json.dumps({"images": []}).encode()

    async def steps(post: Poster) -> list[int]:
        refused = await post(bad, webhook.signature_headers(bad, SECRET, "delivery-2", T0))
        return [refused.status_code, (await post(BODY, _at(T0, "delivery-2"))).status_code]

    assert clocked.run(app, steps) == [422, 202]


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
    assert sorted(by_entrypoint) == [
        "auto_label", "classify_images", "curate_images", "detect_crop_classify", "embed_images", "monitor_drift",
        "search_images",
    ]  # fmt: skip
    for flow, deployment in by_entrypoint.items():
        assert deployment["work_pool"]["name"] == "roboflow"
        triggers = deployment.get("triggers", [])
        if flow == "auto_label":  # started by monitor_drift's event, on the drifted window
            (trigger,) = triggers
            assert trigger["expect"] == ["prefect_roboflow.drift.detected"]
            assert trigger["parameters"]["images"] == "{{ event.payload.current }}"
            continue
        if flow == "curate_images":  # started by each completed embed_images run, over its table
            (trigger,) = triggers
            assert trigger["expect"] == ["prefect_roboflow.embed_images.completed"]
            assert trigger["parameters"]["source"] == "{{ event.payload.embeddings_path }}"
            continue
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
