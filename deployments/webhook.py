"""A signed webhook for self-hosted Prefect: ``POST /webhooks/images`` → the event that starts the flows.

Prefect Cloud has incoming webhooks; a self-hosted Prefect server does not, but it has events and
deployment triggers. This small ASGI app is the missing piece: it checks a request and emits
``prefect_roboflow.images.arrived``, which the triggers in ``serve.py`` and ``prefect.yaml`` turn
into a run of ``embed_images`` or ``detect_crop_classify`` over the request's images.

Request: ``POST /webhooks/images`` with a JSON body ::

    {"images": ["/data/in/a.jpg", "https://example.com/b.png"],
     "flow": "embed_images",                 # or "detect_crop_classify"; embed_images if omitted
     "parameters": {"model": "clip"}}        # optional; keys from OVERRIDES below

and the header ``X-Signature-256: sha256=<hex HMAC-SHA256 of the raw body with the shared secret>``.

Answers: 202 ``{"event_id": ...}`` once Prefect has the event; 413 for a body over the size
limit, 401 for a missing or wrong signature, 422 for a body that is not the schema above, 503
when Prefect cannot be reached. Nothing is emitted unless the answer is 202.

Run it (the secret from an env var, or from a Prefect ``Secret`` block)::

    PREFECT_ROBOFLOW_WEBHOOK_SECRET=$(openssl rand -hex 32) python deployments/webhook.py --port 8787
    python deployments/webhook.py --secret-block roboflow-webhook-secret
    uvicorn webhook:create_app --factory --app-dir deployments --host 127.0.0.1 --port 8787

It emits to the Prefect API of its environment (``PREFECT_API_URL``).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Literal
from uuid import uuid4

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

EVENT = "prefect_roboflow.images.arrived"
RESOURCE_ID = "prefect_roboflow.webhook.images"
FLOW_LABEL = "prefect_roboflow.flow"  # resource label the deployment triggers match on
SIGNATURE_HEADER = "X-Signature-256"
SECRET_ENV = "PREFECT_ROBOFLOW_WEBHOOK_SECRET"
SECRET_BLOCK_ENV = "PREFECT_ROBOFLOW_WEBHOOK_SECRET_BLOCK"
MAX_BYTES_ENV = "PREFECT_ROBOFLOW_WEBHOOK_MAX_BYTES"
DEFAULT_MAX_BYTES = 256 * 1024  # flow-run parameters must stay under 512 KiB
MAX_IMAGES = 2000
MIN_SECRET_LENGTH = 16

EmbeddingFamily = Literal["clip", "perception_encoder"]


class EmbedOverrides(BaseModel):
    """What a sender may set for ``embed_images``."""

    model_config = ConfigDict(extra="forbid")
    model: EmbeddingFamily = "clip"
    version: str | None = None
    batch_size: int = Field(64, ge=1, le=1024)


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


def sign(body: bytes, secret: str) -> str:
    """The signature header value for ``body``: ``sha256=<hex>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def signature_ok(body: bytes, header: str | None, secret: str) -> bool:
    """Whether ``header`` is the body's signature (compared in constant time)."""
    if not header:
        return False
    return hmac.compare_digest(header.strip().encode(), sign(body, secret).encode())


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


def create_app(
    secret: str | None = None,
    secret_block: str | None = None,
    max_body_bytes: int | None = None,
    emit: Callable[[Any], Awaitable[None]] = emit_to_prefect,
) -> FastAPI:
    """The webhook app. The secret is loaded once, at start-up, and never logged or returned."""
    limit = max_body_bytes or int(os.environ.get(MAX_BYTES_ENV) or DEFAULT_MAX_BYTES)
    state: dict[str, str] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state["secret"] = await load_secret(secret, secret_block)
        yield

    app = FastAPI(title="prefect-roboflow images webhook", lifespan=lifespan, docs_url=None, redoc_url=None)

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
        if not signature_ok(body, request.headers.get(SIGNATURE_HEADER), state["secret"]):
            logger.warning("rejected a request from %s: missing or bad %s", client, SIGNATURE_HEADER)
            return JSONResponse({"detail": f"missing or invalid {SIGNATURE_HEADER} signature"}, status_code=401)
        try:
            arrived = parse_body(body)
        except ValidationError as exc:
            errors = exc.errors(include_url=False, include_input=False, include_context=False)
            return JSONResponse({"detail": errors}, status_code=422)

        from prefect.events import Event, Resource

        event = Event(
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
        try:
            await emit(event)
        except Exception as exc:  # the sender should retry later
            logger.error("could not emit %s to Prefect: %s", EVENT, type(exc).__name__)
            return JSONResponse({"detail": "Prefect is unavailable, try again later"}, status_code=503)
        logger.info("emitted %s %s: %d image(s) for %s", EVENT, event.id, len(arrived.images), arrived.flow)
        return JSONResponse(
            {"event_id": str(event.id), "event": EVENT, "flow": arrived.flow, "images": len(arrived.images)},
            status_code=202,
        )

    return app


def main() -> None:
    """``python deployments/webhook.py [--host 127.0.0.1] [--port 8787] [--secret-block NAME]``."""
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=os.environ.get("WEBHOOK_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("WEBHOOK_PORT", "8787")))
    parser.add_argument("--secret-block", help=f"Prefect Secret block holding the secret (else ${SECRET_ENV})")
    parser.add_argument("--max-bytes", type=int, help=f"body size limit (default {DEFAULT_MAX_BYTES})")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(secret_block=args.secret_block, max_body_bytes=args.max_bytes)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
