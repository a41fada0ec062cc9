"""HTTP transport to a Roboflow Inference server: the only module that talks to httpx.

One `InferenceHTTP` engine exists per distinct server configuration in a process. It owns
a pooled `httpx.AsyncClient` on a private event-loop thread, so that the sync API, the async
API and every thread of a Prefect task runner share one connection pool and one concurrency
limit. Retries, backoff, error mapping and response metadata live here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import os
import random
import threading
import time
from collections.abc import Coroutine, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

from ._limiter import AdaptiveLimiter, Signal
from .exceptions import (
    InferenceClientError,
    InferenceConnectionError,
    InferenceError,
    InferenceResponseError,
    InferenceServerError,
    InferenceStatusError,
    InferenceTimeoutError,
    ModelNotFoundError,
    RateLimitedError,
    ServerUnavailableError,
)

logger = logging.getLogger("prefect_roboflow")

T = TypeVar("T")

USER_AGENT = "prefect-roboflow"


@dataclass(frozen=True)
class HttpSettings:
    """Everything that shapes how requests are sent; equal settings share one engine."""

    api_url: str
    api_key: str | None = field(default=None, repr=False)
    timeout: float = 60.0
    connect_timeout: float = 5.0
    max_retries: int = 6
    retry_backoff: float = 0.5
    retry_max_backoff: float = 10.0
    retry_budget: float = 120.0
    max_concurrency: int = 64
    adaptive_concurrency: bool = True


@dataclass(frozen=True)
class ResponseInfo:
    """What one answered request tells about the server, for logs and artifacts.

    Attributes:
        endpoint: The route, e.g. ``/clip/embed_image``.
        status_code: HTTP status of the final attempt.
        engine: The ``x-inference-engine`` header (``inference-models`` or ``old-inference``).
        processing_time: The ``X-Processing-Time`` header in seconds, when the server sends it.
        server_time: The body's ``time`` field: seconds the model itself took.
        model_id: The ``X-Model-Id`` header.
        cold_start: Whether the server loaded the model for this request.
        elapsed: Client-side seconds from the first attempt to the answer.
        attempts: How many attempts the request took.
        concurrency_limit: The engine's adaptive concurrency limit when the answer came (0: unknown).
    """

    endpoint: str
    status_code: int
    engine: str | None
    processing_time: float | None
    server_time: float | None
    model_id: str | None
    cold_start: bool
    elapsed: float
    attempts: int
    concurrency_limit: int = 0


# Recorders nest (a flow's around its tasks'), so every active one gets each ResponseInfo.
_recorders: ContextVar[tuple[list[ResponseInfo], ...]] = ContextVar("prefect_roboflow_recorders", default=())


@contextlib.contextmanager
def record_responses() -> Iterator[list[ResponseInfo]]:
    """Collect the `ResponseInfo` of every request made inside the block, sync or async.

    Examples:
        ```python
        with record_responses() as infos:
            clip.embed_images(["a.jpg", "b.jpg"])
        sum(i.server_time or 0 for i in infos)  # seconds the server spent on the model
        ```
    """
    infos: list[ResponseInfo] = []
    token = _recorders.set((*_recorders.get(), infos))
    try:
        yield infos
    finally:
        _recorders.reset(token)


def describe_responses(infos: Sequence[ResponseInfo]) -> str:
    """One line on what the server reported for some requests, for logs.

    Examples:
        ```python
        describe_responses(infos)
        # '40 request(s), server model time 0.412s, engine inference-models, 0 retries,
        #  concurrency limit 9 (peak 12)'
        ```
    """
    retries = sum(i.attempts - 1 for i in infos)
    engines = "/".join(sorted({i.engine for i in infos if i.engine})) or "unknown"
    server_time = sum(i.server_time or 0.0 for i in infos)
    line = f"{len(infos)} request(s), server model time {server_time:.3f}s, engine {engines}, {retries} retries"
    limits = [i.concurrency_limit for i in infos if i.concurrency_limit > 0]
    if limits:
        line += f", concurrency limit {limits[-1]} (peak {max(limits)})"
    return line


def _float_header(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _retry_after_seconds(value: str | None) -> float | None:
    if value is None:
        return None
    seconds = _float_header(value)
    if seconds is not None:
        return max(0.0, seconds)
    with contextlib.suppress(TypeError, ValueError):
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    return None


def _server_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500].strip() or response.reason_phrase
    if isinstance(body, dict):
        message = body.get("message", body.get("detail"))
        if isinstance(message, str):
            return message
        if message is not None:
            return json.dumps(message)[:1000]
    return json.dumps(body)[:1000]


def status_error(endpoint: str, response: httpx.Response) -> InferenceStatusError:
    """Map an error answer onto the exception hierarchy."""
    status = response.status_code
    message = _server_message(response)
    kwargs: dict[str, Any] = {"endpoint": endpoint, "request_id": response.headers.get("x-request-id")}
    retry_after = _retry_after_seconds(response.headers.get("retry-after"))
    if status == 404 or "Could not retrieve model" in message:
        return ModelNotFoundError(status, message, **kwargs)
    if status == 429:
        return RateLimitedError(status, message, retry_after=retry_after, **kwargs)
    if status in (502, 503, 504):
        return ServerUnavailableError(status, message, retry_after=retry_after, **kwargs)
    if status >= 500:
        if message == "Internal error.":
            message += " (the server hides the cause: often an input it cannot handle)"
        return InferenceServerError(status, message, **kwargs)
    return InferenceClientError(status, message, **kwargs)


def _response_info(
    endpoint: str, response: httpx.Response, body: Any, started: float, attempts: int, limit: int
) -> ResponseInfo:
    headers = response.headers
    server_time = body.get("time") if isinstance(body, dict) else None
    return ResponseInfo(
        endpoint=endpoint,
        status_code=response.status_code,
        engine=headers.get("x-inference-engine"),
        processing_time=_float_header(headers.get("x-processing-time")),
        server_time=float(server_time) if isinstance(server_time, (int, float)) else None,
        model_id=headers.get("x-model-id"),
        cold_start=headers.get("x-model-cold-start", "").lower() == "true",
        elapsed=time.monotonic() - started,
        attempts=attempts,
        concurrency_limit=limit,
    )


def _load_signal(status: int) -> Signal:
    """What an answer's status says about the server's load, for the concurrency limiter."""
    if status < 400:
        return Signal.OK
    if status in (429, 502, 503, 504):
        return Signal.OVERLOAD
    return Signal.IGNORE  # a 4xx or 500 is about the request, and often comes back fast


def client_options(settings: HttpSettings) -> dict[str, Any]:
    """Base URL, headers and timeouts of an httpx client for these settings, sync or async."""
    headers = {"User-Agent": USER_AGENT}
    if settings.api_key:
        # httpx masks Authorization in reprs; the key never goes into a URL.
        headers["Authorization"] = f"Bearer {settings.api_key}"
    return {
        "base_url": settings.api_url.rstrip("/"),
        "headers": headers,
        "timeout": httpx.Timeout(settings.timeout, connect=settings.connect_timeout),
    }


class InferenceHTTP:
    """Sends JSON requests with an adaptive concurrency limit, retries, and typed errors.

    The limit (`concurrency_limit`) starts at 4 and follows the server (see `_limiter`), at most
    ``settings.max_concurrency``; with ``adaptive_concurrency=False`` it stays at that cap.
    """

    def __init__(self, settings: HttpSettings) -> None:
        self.settings = settings
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="prefect-roboflow-http", daemon=True)
        self._thread.start()
        self._random = random.Random()
        cap = settings.max_concurrency
        self._limiter = AdaptiveLimiter(cap, floor=1 if settings.adaptive_concurrency else cap)
        # Built on the engine's loop: the pool belongs to it. The pool is as large as the cap.
        self._client = self._submit(self._make_client()).result()

    async def _make_client(self) -> httpx.AsyncClient:
        cap = self.settings.max_concurrency
        return httpx.AsyncClient(
            **client_options(self.settings),
            limits=httpx.Limits(max_connections=cap, max_keepalive_connections=cap),
        )

    def __reduce__(self) -> tuple[Any, tuple[HttpSettings]]:
        """Pickled as its settings: unpickled, it is the receiving process's own engine."""
        return get_engine, (self.settings,)

    @property
    def concurrency_limit(self) -> int:
        """How many requests may be in flight to this server now (the adaptive limit)."""
        return self._limiter.limit

    @property
    def concurrency_peak(self) -> int:
        """The highest the limit has been since the engine started."""
        return self._limiter.peak

    def _submit(self, coro: Coroutine[Any, Any, T]) -> Any:
        # run_coroutine_threadsafe copies the caller's context, so record_responses() sees the calls.
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the engine's loop and wait for it (the sync API)."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("the sync API cannot be called from the engine's own event loop")
        future = self._submit(coro)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    async def arun(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the engine's loop from any other event loop."""
        return await asyncio.wrap_future(self._submit(coro))

    async def get(self, endpoint: str) -> dict[str, Any]:
        """GET a JSON document (e.g. ``/info``), with the same retries as `post`."""
        return await self._send("GET", endpoint, None)

    async def post(self, endpoint: str, payload: dict[str, Any]) -> dict[str, Any]:
        """POST one JSON payload, retrying what is retryable; return the JSON answer.

        Must run on the engine's loop (through `run`/`arun`).
        """
        settings = self.settings
        body = payload if not settings.api_key else {**payload, "api_key": settings.api_key}
        return await self._send("POST", endpoint, json.dumps(body, separators=(",", ":")).encode())

    async def _send(self, method: str, endpoint: str, content: bytes | None) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"} if content is not None else None
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self._request(method, endpoint, content, headers)
                answer = self._parse(endpoint, response)
            except InferenceError as error:
                failure: InferenceError = error
            except httpx.TimeoutException as exc:
                failure = InferenceTimeoutError(
                    f"no answer within the timeout ({type(exc).__name__})", endpoint=endpoint
                )
                failure.__cause__ = exc
            except httpx.TransportError as exc:
                failure = InferenceConnectionError(f"{type(exc).__name__}: {exc}", endpoint=endpoint)
                failure.__cause__ = exc
            else:
                info = _response_info(endpoint, response, answer, started, attempt, self._limiter.limit)
                self._record(info)
                return answer
            delay = self._retry_delay(failure, attempt, started)
            if delay is None:
                logger.warning("%s failed after %d attempt(s): %s", endpoint, attempt, failure)
                raise failure
            logger.info(
                "%s attempt %d failed (%s); retrying in %.2fs (concurrency limit %d)",
                endpoint,
                attempt,
                failure,
                delay,
                self._limiter.limit,
            )
            await asyncio.sleep(delay)

    async def _request(
        self, method: str, endpoint: str, content: bytes | None, headers: dict[str, str] | None
    ) -> httpx.Response:
        """One attempt within the concurrency limit, telling the limiter what the server said."""
        # Latencies are compared between requests of one kind: same route, payload size within 2x.
        key = (endpoint, len(content or b"").bit_length())
        before = self._limiter.limit
        async with self._limiter.slot(key) as slot:
            try:
                response = await self._client.request(method, endpoint, content=content, headers=headers)
            except httpx.TimeoutException:
                slot.signal = Signal.OVERLOAD
                raise
            slot.signal = _load_signal(response.status_code)
        if self._limiter.limit != before:
            logger.debug(
                "concurrency limit %d -> %d (%s %d)", before, self._limiter.limit, endpoint, response.status_code
            )
        return response

    async def post_many(
        self, endpoint: str, payloads: Sequence[dict[str, Any]]
    ) -> list[dict[str, Any] | InferenceError]:
        """POST each payload concurrently (bounded); answers or errors, in input order."""

        async def one(payload: dict[str, Any]) -> dict[str, Any] | InferenceError:
            try:
                return await self.post(endpoint, payload)
            except InferenceError as error:
                return error

        return list(await asyncio.gather(*(one(p) for p in payloads)))

    @staticmethod
    def _parse(endpoint: str, response: httpx.Response) -> dict[str, Any]:
        if response.status_code >= 400:
            raise status_error(endpoint, response)
        try:
            answer = response.json()
        except ValueError as exc:
            raise InferenceResponseError(
                f"HTTP {response.status_code} with a body that is not JSON ({len(response.content)} bytes)",
                endpoint=endpoint,
            ) from exc
        if not isinstance(answer, dict):
            raise InferenceResponseError(f"expected a JSON object, got {type(answer).__name__}", endpoint=endpoint)
        return answer

    def _retry_delay(self, error: InferenceError, attempt: int, started: float) -> float | None:
        settings = self.settings
        if not error.retryable or attempt > settings.max_retries:
            return None
        backoff = min(settings.retry_max_backoff, settings.retry_backoff * 2 ** (attempt - 1))
        # Equal jitter: clients that failed together do not retry together, yet still wait.
        delay = backoff / 2 + self._random.uniform(0, backoff / 2)
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None:
            delay = max(delay, min(retry_after, settings.retry_max_backoff))
        if time.monotonic() - started + delay > settings.retry_budget:
            return None
        return delay

    @staticmethod
    def _record(info: ResponseInfo) -> None:
        for infos in _recorders.get():
            infos.append(info)
        logger.debug(
            "%s %d engine=%s model=%s server_time=%s processing_time=%s attempts=%d limit=%d%s",
            info.endpoint,
            info.status_code,
            info.engine,
            info.model_id,
            info.server_time,
            info.processing_time,
            info.attempts,
            info.concurrency_limit,
            " cold-start" if info.cold_start else "",
        )

    def close(self) -> None:
        """Close the connection pool and stop the engine's thread."""
        if self._loop.is_closed():
            return
        with contextlib.suppress(Exception):
            self._submit(self._client.aclose()).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()


# Engines belong to the process that made them: their loop thread and pool do not cross a fork,
# a spawn or a pickle (a Dask worker, a process pool). Each process keys its own by its PID.
_engines: dict[HttpSettings, InferenceHTTP] = {}
_engines_pid = os.getpid()
_engines_lock = threading.Lock()


def get_engine(settings: HttpSettings) -> InferenceHTTP:
    """The process-wide engine for these settings, created on first use in this process.

    A block sent to another process (a Dask worker, a forked or spawned child) carries only its
    settings; its first request there starts that process's own engine, thread and pool.
    """
    global _engines_pid
    with _engines_lock:
        if _engines_pid != os.getpid():  # inherited from a parent: its engines are not ours
            _engines.clear()
            _engines_pid = os.getpid()
        engine = _engines.get(settings)
        if engine is None:
            engine = _engines[settings] = InferenceHTTP(settings)
        return engine


def close_engines() -> None:
    """Close every engine of this process (tests, and long-lived workers that reconfigure)."""
    with _engines_lock:
        engines = list(_engines.values())
        _engines.clear()
    for engine in engines:
        engine.close()


def _forget_parent_engines() -> None:
    """In a forked child: the parent's engines (and a lock some parent thread may hold) are not ours."""
    global _engines_lock, _engines_pid
    _engines_lock = threading.Lock()
    _engines.clear()
    _engines_pid = os.getpid()


os.register_at_fork(after_in_child=_forget_parent_engines)
