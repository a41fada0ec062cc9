"""Several inference servers behind one engine: which server takes a request, and which are up.

Each server is a `Backend` with its own pooled `httpx.AsyncClient` and its own `AdaptiveLimiter`
(a GPU box and a CPU box admit different numbers of requests). `Balancer.choose` sends each
request to the least-loaded healthy server: the lowest ``pending / limit``, where ``pending``
counts the requests routed there and not finished (queued for a place, or in flight). Equal loads
go to the server that has taken fewer requests, so a light load still reaches every server.

Health, from what attempts met (`Balancer.report`):

- a connection that cannot be made or breaks (refused, reset) takes the server out at once;
- ``max_strikes`` 502/503/504 answers or timeouts in a row take it out;
- any answer (even a 4xx or 500: the server is there) clears the strikes.

A server out of rotation is probed with ``GET /info`` on a backoff (doubling up to a cap) and comes
back in when the probe answers 200. With no healthy server left, requests still go out (to the
least-loaded server), so they fail with the same typed errors as with one server. One server alone
is never taken out nor probed: it behaves exactly as before there were several.

The balancer belongs to the engine's event loop and is not thread-safe.

Examples:
    ```python
    balancer = Balancer([Backend(url, client, AdaptiveLimiter(64)) for url, client in pools], probe)
    backend = balancer.choose()
    async with balancer.routed(backend):
        response = await backend.client.post(...)
    balancer.report(backend, Outcome.ANSWERED)
    ```
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

from ._limiter import AdaptiveLimiter

__all__ = ["Backend", "Balancer", "Outcome", "server_label"]

logger = logging.getLogger("prefect_roboflow")

#: 502-504 answers or timeouts in a row that take a server out of rotation.
MAX_STRIKES = 3


def server_label(url: str) -> str:
    """A server's base URL as logs and tables show it: no user or password, no trailing slash.

    Examples:
        ```python
        server_label("http://user:secret@10.0.0.5:9001/")  # 'http://10.0.0.5:9001'
        ```
    """
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}{parts.path.rstrip('/')}"


class Outcome(enum.Enum):
    """What one attempt says about the health of the server that took it."""

    ANSWERED = "answered"  # any HTTP answer but 502-504: the server is there
    UNAVAILABLE = "unavailable"  # 502-504 or a timeout: a strike
    UNREACHABLE = "unreachable"  # the connection failed or broke: out at once
    NEUTRAL = "neutral"  # says nothing (e.g. a body that could not be parsed)


@dataclass(eq=False)
class Backend:
    """One server of the engine: its base URL, connection pool, concurrency limit and health.

    Attributes:
        url: Base URL, as configured.
        client: The server's own pooled client.
        limiter: The server's own adaptive concurrency limit.
        label: `server_label` of the URL (what `ResponseInfo.server` says).
        pending: Requests routed here and not finished (waiting for a place, or in flight).
        routed: Requests routed here so far.
        healthy: In rotation.
        strikes: 502-504 answers or timeouts in a row.
    """

    url: str
    client: httpx.AsyncClient
    limiter: AdaptiveLimiter
    label: str = ""
    pending: int = 0
    routed: int = 0
    healthy: bool = True
    strikes: int = 0
    _probe: asyncio.Task[None] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.label = self.label or server_label(self.url)

    @property
    def load(self) -> float:
        """Requests routed here per place the limiter allows now."""
        return self.pending / self.limiter.limit


class Balancer:
    """Least-loaded routing over healthy servers, with health tracking and probes (module doc).

    Args:
        backends: The servers, at least one.
        probe: Whether a server answers (``GET /info`` with 200); called on the engine's loop.
        probe_backoff: Seconds before the first probe of a server taken out; doubles after each failed probe.
        probe_max_backoff: The longest wait between probes.
        max_strikes: 502-504 answers or timeouts in a row that take a server out.
    """

    def __init__(
        self,
        backends: Sequence[Backend],
        probe: Callable[[Backend], Awaitable[bool]],
        *,
        probe_backoff: float = 0.5,
        probe_max_backoff: float = 10.0,
        max_strikes: int = MAX_STRIKES,
    ) -> None:
        if not backends:
            raise ValueError("a balancer needs at least one server")
        self.backends = tuple(backends)
        self._probe = probe
        self.probe_backoff = max(probe_backoff, 0.01)
        self.probe_max_backoff = max(probe_max_backoff, self.probe_backoff)
        self.max_strikes = max_strikes

    @property
    def healthy(self) -> tuple[Backend, ...]:
        """The servers in rotation."""
        return tuple(b for b in self.backends if b.healthy)

    def choose(self, avoid: Backend | None = None) -> Backend:
        """The server for the next attempt: the least-loaded healthy one, other than ``avoid``
        (the server the last attempt failed on) when there is another.

        With no healthy server, the least-loaded of all (other than ``avoid`` when possible):
        the request goes out and fails or succeeds as it would with one server.
        """
        others = [b for b in self.backends if b is not avoid] or list(self.backends)
        candidates = [b for b in others if b.healthy] or [b for b in self.backends if b.healthy] or others
        return min(candidates, key=lambda b: (b.load, b.routed))

    def has_alternative(self, backend: Backend) -> bool:
        """Whether a healthy server other than ``backend`` can take a retry at once."""
        return any(b.healthy and b is not backend for b in self.backends)

    @contextlib.asynccontextmanager
    async def routed(self, backend: Backend) -> AsyncIterator[Backend]:
        """Count a request against ``backend``'s load while it waits for a place and runs."""
        backend.pending += 1
        backend.routed += 1
        try:
            yield backend
        finally:
            backend.pending -= 1

    def report(self, backend: Backend, outcome: Outcome) -> None:
        """Update ``backend``'s health from what an attempt on it met."""
        if len(self.backends) == 1 or outcome is Outcome.NEUTRAL:
            return
        if outcome is Outcome.ANSWERED:
            backend.strikes = 0
            if not backend.healthy:
                self._bring_back(backend, "it answered")
            return
        backend.strikes += 1
        if backend.healthy and (outcome is Outcome.UNREACHABLE or backend.strikes >= self.max_strikes):
            self._take_out(backend, outcome)

    def _take_out(self, backend: Backend, outcome: Outcome) -> None:
        backend.healthy = False
        reason = "cannot connect" if outcome is Outcome.UNREACHABLE else f"{backend.strikes} failures in a row"
        logger.warning(
            "inference server %s out of rotation (%s); %d of %d left",
            backend.label,
            reason,
            len(self.healthy),
            len(self.backends),
        )
        if backend._probe is None or backend._probe.done():
            backend._probe = asyncio.get_running_loop().create_task(self._probe_until_back(backend))

    def _bring_back(self, backend: Backend, why: str) -> None:
        backend.healthy, backend.strikes = True, 0
        logger.warning("inference server %s back in rotation (%s)", backend.label, why)

    async def _probe_until_back(self, backend: Backend) -> None:
        delay = self.probe_backoff
        while not backend.healthy:
            await asyncio.sleep(delay)
            if backend.healthy:  # a request answered meanwhile
                return
            try:
                answered = await self._probe(backend)
            except Exception:  # a probe must never end the loop that brings the server back
                answered = False
            if answered:
                self._bring_back(backend, "GET /info answered")
                return
            delay = min(self.probe_max_backoff, delay * 2)

    async def aclose(self) -> None:
        """Stop the probes and close every server's pool."""
        probes = [b._probe for b in self.backends if b._probe is not None and not b._probe.done()]
        for task in probes:
            task.cancel()
        if probes:
            await asyncio.gather(*probes, return_exceptions=True)
        for backend in self.backends:
            await backend.client.aclose()
