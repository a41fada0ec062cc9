"""A signed webhook for self-hosted Prefect: ``POST /webhooks/images`` → a flow's work on the images.

Prefect Cloud has incoming webhooks; a self-hosted Prefect server does not, but it has events and
deployment triggers. This small ASGI app is the missing piece: it checks a request and, on one of
two paths (``--via``):

- ``deployments`` (the default): emits ``prefect_roboflow.images.arrived``, which the triggers in
  ``serve.py`` and ``prefect.yaml`` turn into a run of ``embed_images`` or ``detect_crop_classify``
  over the request's images (a new flow run and process each: seconds);
- ``task-worker``: writes the delivery to its journal and submits it as a Prefect background task
  run, which a warm task worker (``serve.py --task-worker``, see ``task_worker.py``) runs through
  the same steps at once (under a second), its rows one part of a dataset folder per flow; a
  delivery acknowledged is run even if a worker dies (``journal.py``).

Request: ``POST /webhooks/images`` with a JSON body ::

    {"images": ["/data/in/a.jpg", "https://example.com/b.png"],
     "flow": "embed_images",                 # or "detect_crop_classify"; embed_images if omitted
     "parameters": {"model": "clip"}}        # optional; keys from OVERRIDES below

and three headers (the scheme of Stripe's and the Standard Webhooks signatures)::

    X-Webhook-Id: <the sender's unique id for this delivery: 1-128 of A-Z a-z 0-9 _ ->
    X-Webhook-Timestamp: <unix seconds when the sender signed it>
    X-Signature-256: sha256=<hex HMAC-SHA256, with the shared secret, of "<id>.<timestamp>." + the raw body>

(``signature_headers`` makes all three). A request whose timestamp is more than the tolerance
(300 s, ``PREFECT_ROBOFLOW_WEBHOOK_TOLERANCE``) away from the receiver's clock is refused, and so
is a delivery id already accepted within that window: a captured request cannot be replayed.
Accepted ids are kept in this process's memory until their timestamp leaves the window; several
receiver replicas each keep their own, so across replicas the timestamp window is what bounds a
replay.

Answers: 202 ``{"event_id": ...}`` once Prefect has the event (on the task path,
``{"delivery_id": ..., "task_run_id": ...}`` once the delivery is in the journal and its task run
in Prefect); 413 for a body over the size limit; 401 for missing or malformed headers, a wrong
signature, a timestamp outside the window or a replayed delivery id; 422 for a body that is not
the schema above; 503 when Prefect cannot be reached (retry: the same delivery id is accepted
again) or when too many deliveries are held in the window. Nothing is emitted or submitted
unless the answer is 202.

Run it (the secret from an env var, or from a Prefect ``Secret`` block)::

    PREFECT_ROBOFLOW_WEBHOOK_SECRET=$(openssl rand -hex 32) python deployments/webhook.py --port 8787
    python deployments/webhook.py --secret-block roboflow-webhook-secret
    python deployments/webhook.py --via task-worker --state /var/lib/roboflow-webhook
    uvicorn webhook:create_app --factory --app-dir deployments --host 127.0.0.1 --port 8787

It emits to the Prefect API of its environment (``PREFECT_API_URL``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import heapq
import hmac
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from typing import Any, Literal
from uuid import uuid4

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

EVENT = "prefect_roboflow.images.arrived"
RESOURCE_ID = "prefect_roboflow.webhook.images"
FLOW_LABEL = "prefect_roboflow.flow"  # resource label the deployment triggers match on
SIGNATURE_HEADER = "X-Signature-256"
ID_HEADER = "X-Webhook-Id"
TIMESTAMP_HEADER = "X-Webhook-Timestamp"
SECRET_ENV = "PREFECT_ROBOFLOW_WEBHOOK_SECRET"
SECRET_BLOCK_ENV = "PREFECT_ROBOFLOW_WEBHOOK_SECRET_BLOCK"
MAX_BYTES_ENV = "PREFECT_ROBOFLOW_WEBHOOK_MAX_BYTES"
TOLERANCE_ENV = "PREFECT_ROBOFLOW_WEBHOOK_TOLERANCE"
VIA_ENV = "PREFECT_ROBOFLOW_WEBHOOK_VIA"
STATE_ENV = "PREFECT_ROBOFLOW_WEBHOOK_STATE"  # task_worker.STATE_ENV (not imported: this module stays light)
#: Where a delivery goes: an event for the deployment triggers, or a task run for a task worker.
PATHS = ("deployments", "task-worker")
SWEEP_SECONDS = 5.0  # the task path's journal is swept this often (and at start)
DEFAULT_TOLERANCE = 300  # seconds a signed request stays valid, either side of the receiver's clock
MAX_DELIVERIES = 100_000  # accepted ids held at once (the window's worth); more → 503, try later
DEFAULT_MAX_BYTES = 256 * 1024  # flow-run parameters must stay under 512 KiB
MAX_IMAGES = 2000
MIN_SECRET_LENGTH = 16
DELIVERY_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")  # no "." so that "<id>.<timestamp>." is unambiguous
TIMESTAMP = re.compile(r"[0-9]{1,12}")

EmbeddingFamily = Literal["clip", "perception_encoder"]


class EmbedOverrides(BaseModel):
    """What a sender may set for ``embed_images``."""

    model_config = ConfigDict(extra="forbid")
    model: EmbeddingFamily = "clip"
    version: str | None = None
    batch_size: int = Field(128, ge=1, le=1024)


class DetectOverrides(BaseModel):
    """What a sender may set for ``detect_crop_classify`` (the examples and labels are the deployment's)."""

    model_config = ConfigDict(extra="forbid")
    model: EmbeddingFamily = "clip"
    version: str | None = None
    confidence: float = Field(0.99, ge=0.0, le=1.0)
    min_score: float | None = Field(None, ge=-1.0, le=1.0)


FlowName = Literal["embed_images", "detect_crop_classify"]
OVERRIDE_MODELS: dict[str, type[BaseModel]] = {"embed_images": EmbedOverrides, "detect_crop_classify": DetectOverrides}


def _template(name: str, default: Any) -> str:
    # Jinja that Prefect renders when the trigger fires: the sender's value, else the flow's default.
    # A single expression keeps its JSON type (Prefect 3.8 renders it through `tojson`).
    fallback = "none" if default is None else repr(default)
    return f"{{{{ event.payload.parameters.{name} | default({fallback}) }}}}"


# How each deployment trigger reads those parameters from the event.
OVERRIDES: dict[str, dict[str, str]] = {
    flow: {name: _template(name, field.default) for name, field in model.model_fields.items()}
    for flow, model in OVERRIDE_MODELS.items()
}

logger = logging.getLogger("prefect_roboflow.webhook")

#: The task path's hand-off: a checked delivery and its id → the id of the task run that will run it.
HandOff = Callable[["ImagesArrived", str], Awaitable[str]]


def trigger_parameters(flow: str, out_dir: str) -> dict[str, str]:
    """The parameters a deployment trigger passes to ``flow`` for an images-arrived event.

    Each event's outputs go to ``<out_dir>/events/<event id>``.
    """
    return {
        "images": "{{ event.payload.images }}",
        "out_dir": out_dir.rstrip("/") + "/events/{{ event.id }}",
        **OVERRIDES[flow],
    }


def trigger_match(flow: str) -> dict[str, str]:
    """The resource a deployment trigger for ``flow`` matches."""
    return {"prefect.resource.id": RESOURCE_ID, FLOW_LABEL: flow}


class ImagesArrived(BaseModel):
    """The webhook's JSON body."""

    model_config = ConfigDict(extra="forbid")

    images: list[str] = Field(min_length=1, max_length=MAX_IMAGES)
    flow: FlowName = "embed_images"
    parameters: dict[str, Any] = Field(default_factory=dict)

    @field_validator("images")
    @classmethod
    def _references(cls, images: list[str]) -> list[str]:
        for i, ref in enumerate(images):
            if not ref.strip() or len(ref) > 4096 or "\x00" in ref:
                raise ValueError(f"images[{i}]: expected a path or an https URL")
            if "://" in ref and not ref.startswith("https://"):
                raise ValueError(f"images[{i}]: only https:// URLs (or paths) are read")
        return images


def parse_body(body: bytes) -> ImagesArrived:
    """The validated request; ``parameters`` checked against the flow's overrides and kept as sent.

    Raises:
        ValidationError: the body is not JSON of that schema.
    """
    arrived = ImagesArrived.model_validate_json(body)
    try:
        overrides = OVERRIDE_MODELS[arrived.flow].model_validate(arrived.parameters)
    except ValidationError as exc:
        errors = [{**e, "loc": ("parameters", *e["loc"])} for e in exc.errors()]
        raise ValidationError.from_exception_data("ImagesArrived", errors) from None  # type: ignore[arg-type]
    arrived.parameters = overrides.model_dump(exclude_unset=True)
    return arrived


def sign(body: bytes, secret: str, delivery_id: str, timestamp: int | str) -> str:
    """The ``X-Signature-256`` value: ``sha256=<hex>`` of ``"<delivery_id>.<timestamp>."`` + ``body``.

    Example:
        >>> sign(b"{}", "s" * 32, "d1", 1700000000)[:15]
        'sha256=a55f297b'
    """
    content = f"{delivery_id}.{timestamp}.".encode() + body
    return "sha256=" + hmac.new(secret.encode(), content, hashlib.sha256).hexdigest()


def signature_ok(body: bytes, header: str | None, secret: str, delivery_id: str, timestamp: int | str) -> bool:
    """Whether ``header`` signs this body, delivery id and timestamp (compared in constant time)."""
    if not header:
        return False
    expected = sign(body, secret, delivery_id, timestamp)
    return hmac.compare_digest(header.strip().encode(), expected.encode())


def signature_headers(
    body: bytes, secret: str, delivery_id: str | None = None, timestamp: int | None = None
) -> dict[str, str]:
    """The three headers a sender adds: a new delivery id (uuid4) and the time now, unless given.

    Example:
        >>> headers = signature_headers(b'{"images": ["a.png"]}', "s" * 32)
        >>> sorted(headers)
        ['X-Signature-256', 'X-Webhook-Id', 'X-Webhook-Timestamp']
    """
    delivery_id = delivery_id or uuid4().hex
    timestamp = int(time.time()) if timestamp is None else timestamp
    return {
        ID_HEADER: delivery_id,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: sign(body, secret, delivery_id, timestamp),
    }


class Rejected(Exception):
    """A request refused before anything is emitted: ``status``, the answer's ``detail``, the logged ``reason``."""

    def __init__(self, status: int, detail: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.detail, self.reason = status, detail, reason


class DeliveryGuard:
    """Refuses stale and replayed deliveries: a timestamp window, and the ids accepted within it.

    An id is held until its timestamp leaves the window (``timestamp + tolerance``); after that the
    timestamp alone refuses the same request. At most ``max_ids`` entries are kept (a released id's
    entry counts until its timestamp leaves the window); a new delivery beyond that is refused with
    503 (retry later) rather than forgetting an id early.

    Example:
        >>> now = [1_700_000_000.0]
        >>> guard = DeliveryGuard(tolerance=300, clock=lambda: now[0])
        >>> guard.admit("d1", "1700000000")
        >>> guard.admit("d1", "1700000000")
        Traceback (most recent call last):
        ...
        webhook.Rejected: delivery d1 replayed
    """

    def __init__(self, tolerance: int, clock: Callable[[], float] = time.time, max_ids: int = MAX_DELIVERIES) -> None:
        if tolerance <= 0 or max_ids <= 0:
            raise ValueError("tolerance and max_ids must be positive")
        self.tolerance, self.clock, self.max_ids = tolerance, clock, max_ids
        self._expires: dict[str, int] = {}  # delivery id -> the second its timestamp leaves the window
        self._queue: list[tuple[int, str]] = []  # the same, soonest first (may hold released ids)

    def __len__(self) -> int:
        return len(self._expires)

    def admit(self, delivery_id: str, timestamp: str) -> None:
        """Hold ``delivery_id`` if its timestamp is in the window and it is new.

        Raises:
            Rejected: 401 outside the window or for an id already held; 503 when ``max_ids`` are held.
        """
        now = self.clock()
        skew = now - int(timestamp)
        if abs(skew) > self.tolerance:
            when = f"{skew:.0f} s old" if skew > 0 else f"{-skew:.0f} s in the future"
            raise Rejected(401, "timestamp outside the tolerance window", f"timestamp {when}, over {self.tolerance} s")
        self._forget_expired(now)
        if delivery_id in self._expires:
            raise Rejected(401, f"delivery {delivery_id} was already received", f"delivery {delivery_id} replayed")
        if len(self._queue) >= self.max_ids:
            raise Rejected(503, "too many deliveries, try again later", f"{self.max_ids} delivery ids held")
        expires = int(timestamp) + self.tolerance
        self._expires[delivery_id] = expires
        heapq.heappush(self._queue, (expires, delivery_id))

    def release(self, delivery_id: str) -> None:
        """Forget a held id whose request was not accepted after all, so the sender can retry it."""
        self._expires.pop(delivery_id, None)

    def _forget_expired(self, now: float) -> None:
        while self._queue and self._queue[0][0] < now:
            expires, delivery_id = heapq.heappop(self._queue)
            if self._expires.get(delivery_id) == expires:
                del self._expires[delivery_id]


def _one_header(request: Request, name: str, pattern: re.Pattern[str] | None = None) -> str:
    values = request.headers.getlist(name)
    if len(values) != 1 or (pattern is not None and not pattern.fullmatch(values[0])):
        what = "missing" if not values else "malformed"
        raise Rejected(401, "missing or invalid signature headers", f"{what} {name}")
    return values[0]


def check_signed(request: Request, body: bytes, secret: str, guard: DeliveryGuard) -> str:
    """The request's delivery id, now held by ``guard``, if the request is signed, fresh and new.

    Raises:
        Rejected: a header missing, repeated or malformed, a wrong signature, or what ``guard`` refuses.
    """
    delivery_id = _one_header(request, ID_HEADER, DELIVERY_ID)
    timestamp = _one_header(request, TIMESTAMP_HEADER, TIMESTAMP)
    signature = _one_header(request, SIGNATURE_HEADER)
    if not signature_ok(body, signature, secret, delivery_id, timestamp):
        raise Rejected(401, "missing or invalid signature headers", f"bad {SIGNATURE_HEADER}")
    guard.admit(delivery_id, timestamp)
    return delivery_id


async def load_secret(secret: str | None = None, secret_block: str | None = None) -> str:
    """The shared secret: given, else ``$PREFECT_ROBOFLOW_WEBHOOK_SECRET``, else a Prefect ``Secret`` block."""
    secret = secret or os.environ.get(SECRET_ENV)
    block_name = secret_block or os.environ.get(SECRET_BLOCK_ENV)
    if not secret and block_name:
        from prefect.blocks.system import Secret

        block: Secret[Any] = await Secret.aload(block_name)
        value = block.get()
        secret = value if isinstance(value, str) else None
    if not secret or len(secret) < MIN_SECRET_LENGTH:
        raise RuntimeError(
            f"no webhook secret of at least {MIN_SECRET_LENGTH} characters: set {SECRET_ENV}, "
            f"or {SECRET_BLOCK_ENV} to the name of a Prefect Secret block"
        )
    return secret


async def emit_to_prefect(event: Any) -> None:
    """Send one event to the Prefect API and wait until the server has it (a websocket ping)."""
    from prefect.events.clients import get_events_client

    async with get_events_client(reconnection_attempts=2, checkpoint_every=1) as client:
        await client.emit(event)


class _TooLarge(Exception):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _TooLarge
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise _TooLarge
    return bytes(body)


def _event(arrived: ImagesArrived) -> Any:
    from prefect.events import Event, Resource

    return Event(
        id=uuid4(),
        event=EVENT,
        resource=Resource(
            {
                "prefect.resource.id": RESOURCE_ID,
                "prefect.resource.name": "images webhook",
                FLOW_LABEL: arrived.flow,
            }
        ),
        payload=arrived.model_dump(),
    )


def create_app(
    secret: str | None = None,
    secret_block: str | None = None,
    max_body_bytes: int | None = None,
    emit: Callable[[Any], Awaitable[None]] = emit_to_prefect,
    tolerance_seconds: int | None = None,
    clock: Callable[[], float] = time.time,
    max_deliveries: int = MAX_DELIVERIES,
    via: str | None = None,
    state_dir: str | None = None,
    hand_off: HandOff | None = None,
    sweep_seconds: float = SWEEP_SECONDS,
    grace_seconds: float = 30.0,
    stale_seconds: float = 600.0,
) -> FastAPI:
    """The webhook app. The secret is loaded once, at start-up, and never logged or returned.

    ``tolerance_seconds`` (else ``$PREFECT_ROBOFLOW_WEBHOOK_TOLERANCE``, else 300) is how far a
    request's timestamp may be from ``clock()``; ``app.state.deliveries`` is its ``DeliveryGuard``.

    ``via`` (else ``$PREFECT_ROBOFLOW_WEBHOOK_VIA``, else ``"deployments"``) is where accepted
    deliveries go: ``"deployments"`` emits the event the deployment triggers match;
    ``"task-worker"`` writes the delivery to the journal under ``state_dir`` (else
    ``$PREFECT_ROBOFLOW_WEBHOOK_STATE``, else ``$PREFECT_HOME/prefect-roboflow-webhook``) and
    submits it as a background task run for ``serve.py --task-worker`` (see ``task_worker.py``),
    sweeping the journal every ``sweep_seconds``. ``hand_off`` replaces that hand-off (tests).
    """
    limit = max_body_bytes or int(os.environ.get(MAX_BYTES_ENV) or DEFAULT_MAX_BYTES)
    tolerance = tolerance_seconds or int(os.environ.get(TOLERANCE_ENV) or DEFAULT_TOLERANCE)
    path = "task-worker" if hand_off is not None else (via or os.environ.get(VIA_ENV) or "deployments")
    if path not in PATHS:
        raise ValueError(f"via must be one of {PATHS}, not {path!r}")
    deliveries = DeliveryGuard(tolerance, clock, max_deliveries)
    state: dict[str, str] = {}
    handed: list[HandOff] = [hand_off] if hand_off is not None else []

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state["secret"] = await load_secret(secret, secret_block)
        if path != "task-worker" or hand_off is not None:
            yield
            return
        from task_worker import TaskPath  # the task path's Prefect side (light: no flows)

        async with TaskPath(state_dir, grace=grace_seconds, stale=stale_seconds) as tasks:
            app.state.task_path = tasks
            handed[:] = [lambda arrived, delivery_id: tasks.hand_off(_delivery(arrived, delivery_id))]
            sweeping = asyncio.create_task(tasks.sweep_forever(sweep_seconds))
            try:
                yield
            finally:
                sweeping.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sweeping

    app = FastAPI(title="prefect-roboflow images webhook", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.deliveries = deliveries

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/webhooks/images", status_code=202)
    async def images_arrived(request: Request) -> JSONResponse:
        client = request.client.host if request.client else "-"
        try:
            body = await _read_body(request, limit)
        except _TooLarge:
            logger.warning("rejected a request from %s: body over %d bytes", client, limit)
            return JSONResponse({"detail": f"body over {limit} bytes"}, status_code=413)
        try:
            delivery_id = check_signed(request, body, state["secret"], deliveries)
        except Rejected as rejected:
            logger.warning("rejected a request from %s: %s", client, rejected.reason)
            return JSONResponse({"detail": rejected.detail}, status_code=rejected.status)
        try:
            arrived = parse_body(body)
        except ValidationError as exc:
            deliveries.release(delivery_id)
            errors = exc.errors(include_url=False, include_input=False, include_context=False)
            return JSONResponse({"detail": errors}, status_code=422)
        if handed:
            return await _hand_off(handed[0], arrived, delivery_id)
        event = _event(arrived)
        try:
            await emit(event)
        except Exception as exc:  # the sender should retry later, with the same delivery id
            deliveries.release(delivery_id)
            logger.error("could not emit %s to Prefect: %s", EVENT, type(exc).__name__)
            return JSONResponse({"detail": "Prefect is unavailable, try again later"}, status_code=503)
        images = len(arrived.images)
        logger.info(
            "emitted %s %s (delivery %s): %d image(s) for %s", EVENT, event.id, delivery_id, images, arrived.flow
        )
        return JSONResponse(
            {"event_id": str(event.id), "event": EVENT, "flow": arrived.flow, "images": images}, status_code=202
        )

    async def _hand_off(handing: HandOff, arrived: ImagesArrived, delivery_id: str) -> JSONResponse:
        try:
            task_run_id = await handing(arrived, delivery_id)
        except Exception as exc:  # the sender should retry later, with the same delivery id
            deliveries.release(delivery_id)
            logger.error("could not hand delivery %s to the task worker: %s: %s", delivery_id, type(exc).__name__, exc)
            return JSONResponse({"detail": "Prefect is unavailable, try again later"}, status_code=503)
        images = len(arrived.images)
        logger.info(
            "handed delivery %s to the task worker as task run %s: %d image(s) for %s",
            delivery_id, task_run_id, images, arrived.flow,
        )  # fmt: skip
        answer = {"delivery_id": delivery_id, "task_run_id": task_run_id, "flow": arrived.flow, "images": images}
        return JSONResponse(answer, status_code=202)

    return app


def _delivery(arrived: ImagesArrived, delivery_id: str) -> dict[str, Any]:
    """What the task worker is handed: the delivery as the sender sent it, checked."""
    received = datetime.now(timezone.utc).isoformat()
    return {"id": delivery_id, "received": received, **arrived.model_dump()}


def main() -> None:
    """``python deployments/webhook.py [--host 127.0.0.1] [--port 8787] [--secret-block NAME]``."""
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=os.environ.get("WEBHOOK_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("WEBHOOK_PORT", "8787")))
    parser.add_argument("--secret-block", help=f"Prefect Secret block holding the secret (else ${SECRET_ENV})")
    parser.add_argument("--max-bytes", type=int, help=f"body size limit (default {DEFAULT_MAX_BYTES})")
    parser.add_argument(
        "--tolerance", type=int, help=f"seconds a signed request stays valid (default {DEFAULT_TOLERANCE})"
    )
    parser.add_argument("--via", choices=PATHS, default=os.environ.get(VIA_ENV) or "deployments",
                        help=f"emit the deployments' event, or hand off to a task worker (${VIA_ENV})")  # fmt: skip
    parser.add_argument("--state", help=f"the task path's state folder, shared with the task workers (${STATE_ENV}; "
                        "default $PREFECT_HOME/prefect-roboflow-webhook)")  # fmt: skip
    parser.add_argument("--sweep", type=float, default=SWEEP_SECONDS,
                        help="seconds between sweeps of the task path's journal")  # fmt: skip
    args = parser.parse_args()
    if args.via == "task-worker":
        import task_worker  # noqa: F401  (Prefect sets its logging up on import: before uvicorn sets its own)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per Prefect API request otherwise
    app = create_app(
        secret_block=args.secret_block,
        max_body_bytes=args.max_bytes,
        tolerance_seconds=args.tolerance,
        via=args.via,
        state_dir=args.state,
        sweep_seconds=args.sweep,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
