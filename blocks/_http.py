"""HTTP transport to a Roboflow Inference server: the only module that talks to httpx.

One `InferenceHTTP` engine exists per distinct server configuration in a process. It owns one
pooled `httpx.AsyncClient` and one adaptive concurrency limit per server URL, on a private
event-loop thread, so that the sync API, the async API and every thread of a Prefect task runner
share them. Retries, backoff, error mapping and response metadata live here and nowhere else;
which of several servers takes a request, and which servers are up, live in `_balancer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import os
import random
import ssl
import threading
import time
import urllib.request
from collections.abc import Coroutine, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpcore
import httpx

try:  # how httpx reads the environment's proxies (private, in every httpx from 0.27 on)
    from httpx._utils import URLPattern, get_environment_proxies
except ImportError:  # pragma: no cover - a later httpx
    URLPattern = get_environment_proxies = None  # type: ignore[assignment,misc]

from ._balancer import Backend, Balancer, Outcome
from ._limiter import AdaptiveLimiter, Signal
from ._transport import AsyncioBackend
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
    ServerUnreachableError,
)

logger = logging.getLogger("prefect_roboflow")

T = TypeVar("T")

USER_AGENT = "prefect-roboflow"
#: Seconds an engine whose servers have never answered keeps retrying connections that cannot be
#: made (a server still starting); then every such failure is `ServerUnreachableError` at once.
#: Once any server has answered, a refused connection is retried within ``retry_budget`` as before
#: (a server restarting mid-run).
FIRST_CONTACT_GRACE = 3.0
#: A connection failure this long after the previous one starts a new grace (a later run).
_NEW_STREAK_AFTER = 60.0


@dataclass(frozen=True)
class HttpSettings:
    """Everything that shapes how requests are sent; equal settings share one engine.

    ``api_url`` is one base URL, or several (a tuple) that share the load.
    """

    api_url: str | tuple[str, ...]
    api_key: str | None = field(default=None, repr=False)
    timeout: float = 60.0
    connect_timeout: float = 5.0
    max_retries: int = 6
    retry_backoff: float = 0.5
    retry_max_backoff: float = 10.0
    retry_budget: float = 120.0
    max_concurrency: int = 64
    adaptive_concurrency: bool = True

    @property
    def api_urls(self) -> tuple[str, ...]:
        """The server base URLs, one or more."""
        return (self.api_url,) if isinstance(self.api_url, str) else self.api_url


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
        concurrency_limit: The answering server's adaptive concurrency limit when the answer came (0: unknown).
        server: The base URL of the server that answered (never with credentials).
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
    server: str = ""


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

        With several servers, the requests each answered:
        ```python
        # '40 request(s), ..., servers http://10.0.0.5:9001: 21, http://10.0.0.6:9001: 19'
        ```
    """
    retries = sum(i.attempts - 1 for i in infos)
    engines = "/".join(sorted({i.engine for i in infos if i.engine})) or "unknown"
    server_time = sum(i.server_time or 0.0 for i in infos)
    line = f"{len(infos)} request(s), server model time {server_time:.3f}s, engine {engines}, {retries} retries"
    limits = [i.concurrency_limit for i in infos if i.concurrency_limit > 0]
    if limits:
        line += f", concurrency limit {limits[-1]} (peak {max(limits)})"
    per_server = requests_per_server(infos)
    if len(per_server) > 1:
        line += ", servers " + ", ".join(f"{server}: {count}" for server, count in per_server.items())
    return line


def requests_per_server(infos: Sequence[ResponseInfo]) -> dict[str, int]:
    """How many of these requests each server answered, by base URL, sorted by URL.

    Examples:
        ```python
        requests_per_server(infos)  # {'http://127.0.0.1:9002': 40, 'http://127.0.0.1:9003': 38}
        ```
    """
    counts: dict[str, int] = {}
    for info in infos:
        counts[info.server] = counts.get(info.server, 0) + 1
    return dict(sorted(counts.items()))


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
    endpoint: str, response: httpx.Response, body: Any, started: float, attempts: int, backend: Backend
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
        concurrency_limit=backend.limiter.limit,
        server=backend.label,
    )


def _load_signal(status: int) -> Signal:
    """What an answer's status says about the server's load, for the concurrency limiter."""
    if status < 400:
        return Signal.OK
    if status in (429, 502, 503, 504):
        return Signal.OVERLOAD
    return Signal.IGNORE  # a 4xx or 500 is about the request, and often comes back fast


def _health(failure: InferenceError) -> Outcome:
    """What a failed attempt says about its server's health, for the balancer."""
    if isinstance(failure, InferenceConnectionError):
        return Outcome.UNREACHABLE
    if isinstance(failure, (InferenceTimeoutError, ServerUnavailableError)):
        return Outcome.UNAVAILABLE
    if isinstance(failure, InferenceStatusError):
        return Outcome.ANSWERED
    return Outcome.NEUTRAL


def client_options(settings: HttpSettings, url: str | None = None) -> dict[str, Any]:
    """Base URL, headers and timeouts of an httpx client for these settings, sync or async.

    ``url`` is one of the settings' servers; the first by default.
    """
    headers = {"User-Agent": USER_AGENT}
    if settings.api_key:
        # httpx masks Authorization in reprs; the key never goes into a URL.
        headers["Authorization"] = f"Bearer {settings.api_key}"
    return {
        "base_url": (url or settings.api_urls[0]).rstrip("/"),
        "headers": headers,
        "timeout": httpx.Timeout(settings.timeout, connect=settings.connect_timeout),
    }


def environment_proxy(url: str) -> str | None:
    """The proxy the environment names for ``url`` (``HTTP_PROXY``, ``ALL_PROXY``, ``NO_PROXY``), as
    httpx itself picks it for a client that is given no transport; None when it goes direct."""
    target = httpx.URL(url)
    for pattern, proxy in sorted((URLPattern(key), proxy) for key, proxy in get_environment_proxies().items()):
        if pattern.matches(target):
            return proxy
    return None


def pool_options(url: str, size: int) -> dict[str, Any]:
    """The connection pool of an engine's client for one server: ``size`` connections kept.

    A plain ``http://`` server gets httpx's transport over `_transport.AsyncioBackend` (asyncio's
    own transports, not anyio: ~40% less client CPU a request against a server that answers at
    once), unless the environment names a proxy for it (`environment_proxy`: httpx ignores the
    environment for a client given its own transport, so the transport is httpx's, through that
    proxy); ``https://`` keeps httpx's default transport, TLS and the environment's proxies included.
    """
    limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
    if not url.lower().startswith("http://"):
        return {"limits": limits}
    if URLPattern is None:  # an httpx without these helpers: it picks the environment's proxies itself
        if urllib.request.getproxies():
            return {"limits": limits}
    elif (proxy := environment_proxy(url)) is not None:
        return {"transport": httpx.AsyncHTTPTransport(proxy=proxy, limits=limits)}
    # The transport's own pool is replaced below, so its TLS context is never used: a bare one
    # (no CA certificates loaded, verification still required) instead of httpx's default, whose
    # certificates took 35-90 ms to load, before a fresh worker's first request.
    transport = httpx.AsyncHTTPTransport(limits=limits, verify=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    # httpx builds its httpcore pool on the default backend and takes no other: the same pool, on ours.
    transport._pool = httpcore.AsyncConnectionPool(
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=AsyncioBackend(),
    )
    return {"transport": transport}


class InferenceHTTP:
    """Sends JSON requests with an adaptive concurrency limit, retries, and typed errors.

    Each server URL of the settings gets its own pool and limit (a `Backend`); each request goes
    to the least-loaded healthy server, and a retry to another one when there is (see `_balancer`).
    A limit starts at 4 and follows its server (see `_limiter`), at most
    ``settings.max_concurrency``; with ``adaptive_concurrency=False`` it stays at that cap.
    """

    def __init__(self, settings: HttpSettings) -> None:
        self.settings = settings
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="prefect-roboflow-http", daemon=True)
        self._thread.start()
        self._random = random.Random()
        #: Embedding size per (family, version) of versions whose size is not known in advance:
        #: the first answer's, so a server that later answers another size is caught.
        self.learned_dimensions: dict[tuple[str, str], int] = {}
        #: Whether any server of this engine has answered (any HTTP status), and when connections
        #: that cannot be made started failing before that (see `FIRST_CONTACT_GRACE`).
        self.answered = False
        self._unreached: tuple[float, float] | None = None  # (first, last) failure of the streak
        # Built on the engine's loop: the pools belong to it.
        try:
            self.balancer: Balancer = self._submit(self._make_balancer()).result()
        except BaseException:  # e.g. a proxy httpx cannot use: no engine, and no thread left behind
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            if not self._thread.is_alive():
                self._loop.close()
            raise

    async def _make_balancer(self) -> Balancer:
        settings = self.settings
        cap = settings.max_concurrency
        backends = [
            Backend(
                url,
                # Each pool is as large as the cap.
                httpx.AsyncClient(**client_options(settings, url), **pool_options(url, cap)),
                AdaptiveLimiter(cap, floor=1 if settings.adaptive_concurrency else cap),
            )
            for url in settings.api_urls
        ]
        return Balancer(
            backends, self._probe, probe_backoff=settings.retry_backoff, probe_max_backoff=settings.retry_max_backoff
        )

    def __reduce__(self) -> tuple[Any, tuple[HttpSettings]]:
        """Pickled as its settings: unpickled, it is the receiving process's own engine."""
        return get_engine, (self.settings,)

    async def _probe(self, backend: Backend) -> bool:
        """Whether a server taken out of rotation answers ``GET /info`` again."""
        try:
            response = await backend.client.get("/info", timeout=self.settings.connect_timeout)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    @property
    def backends(self) -> tuple[Backend, ...]:
        """The servers, in the order of the settings' URLs."""
        return self.balancer.backends

    @property
    def concurrency_limit(self) -> int:
        """How many requests may be in flight now: the adaptive limits of the servers in rotation, added up."""
        return sum(b.limiter.limit for b in self.balancer.healthy or self.backends)

    @property
    def concurrency_peak(self) -> int:
        """The highest limit since the engine started (added up over servers)."""
        return sum(b.limiter.peak for b in self.backends)

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
        failed_on: Backend | None = None
        while True:
            attempt += 1
            backend = self.balancer.choose(avoid=failed_on)
            try:
                response = await self._request(backend, method, endpoint, content, headers)
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
                self.answered, self._unreached = True, None
                self.balancer.report(backend, Outcome.ANSWERED)
                self._record(_response_info(endpoint, response, answer, started, attempt, backend))
                return answer
            if isinstance(failure, InferenceStatusError):
                self.answered, self._unreached = True, None
            self.balancer.report(backend, _health(failure))
            failed_on = backend
            grace = self._first_contact_grace(failure)
            delay = self._retry_delay(failure, attempt, started)
            if grace is not None and (grace <= 0 or delay is None):  # the grace, or the retries, are over
                raise self._unreachable(failure, endpoint) from None
            if delay is not None and grace is not None:
                delay = min(delay, grace)
            if delay is None:
                logger.warning(
                    "%s failed after %d attempt(s) (last on %s): %s", endpoint, attempt, backend.label, failure
                )
                raise failure
            if self.balancer.has_alternative(backend):
                delay = 0.0  # another server takes the retry at once: nothing to wait for
            logger.info(
                "%s attempt %d on %s failed (%s); retrying in %.2fs (concurrency limit %d)",
                endpoint,
                attempt,
                backend.label,
                failure,
                delay,
                backend.limiter.limit,
            )
            await asyncio.sleep(delay)

    def _first_contact_grace(self, failure: InferenceError) -> float | None:
        """Seconds left to retry a connection that could not be made while no server of this engine
        has answered yet; None when the failure is anything else or a server has answered."""
        cause = failure.__cause__
        if self.answered or not isinstance(cause, (httpx.ConnectError, httpx.ConnectTimeout)):
            return None
        now = time.monotonic()
        first = now if self._unreached is None or now - self._unreached[1] > _NEW_STREAK_AFTER else self._unreached[0]
        self._unreached = (first, now)
        return FIRST_CONTACT_GRACE - (now - first)

    def _unreachable(self, failure: InferenceError, endpoint: str) -> ServerUnreachableError:
        servers = " or ".join(b.label for b in self.backends)
        cause = failure.__cause__
        return ServerUnreachableError(
            f"cannot connect to the inference server at {servers} ({type(cause).__name__}: {cause}), and it has "
            "not answered before: is it running, and is the URL right?",
            endpoint=endpoint,
        )

    async def _request(
        self, backend: Backend, method: str, endpoint: str, content: bytes | None, headers: dict[str, str] | None
    ) -> httpx.Response:
        """One attempt on one server within its concurrency limit, telling the limiter what the server said."""
        # Latencies are compared between requests of one kind: same route, payload size within 2x.
        key = (endpoint, len(content or b"").bit_length())
        limiter = backend.limiter
        before = limiter.limit
        async with self.balancer.routed(backend), limiter.slot(key) as slot:
            try:
                response = await backend.client.request(method, endpoint, content=content, headers=headers)
            except httpx.TimeoutException:
                slot.signal = Signal.OVERLOAD
                raise
            slot.signal = _load_signal(response.status_code)
        if limiter.limit != before:
            logger.debug(
                "concurrency limit of %s %d -> %d (%s %d)",
                backend.label,
                before,
                limiter.limit,
                endpoint,
                response.status_code,
            )
        return response

    async def post_many(
        self, endpoint: str, payloads: Sequence[dict[str, Any]]
    ) -> list[dict[str, Any] | InferenceError]:
        """POST each payload concurrently (bounded); answers or errors, in input order."""

        async def one(payload: dict[str, Any]) -> dict[str, Any] | InferenceError:
            try:
                return await self.post(endpoint, payload)
            except ServerUnreachableError:
                raise  # no request can succeed: the call fails, not each payload
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
            "%s %d server=%s engine=%s model=%s server_time=%s processing_time=%s attempts=%d limit=%d%s",
            info.endpoint,
            info.status_code,
            info.server,
            info.engine,
            info.model_id,
            info.server_time,
            info.processing_time,
            info.attempts,
            info.concurrency_limit,
            " cold-start" if info.cold_start else "",
        )

    def close(self) -> None:
        """Close the connection pools, stop the health probes and the engine's thread."""
        if self._loop.is_closed():
            return
        with contextlib.suppress(Exception):
            self._submit(self.balancer.aclose()).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():  # a loop still running cannot be closed
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
