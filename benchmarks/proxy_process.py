"""Run the tests' `FaultProxy` with a fixed latency in its own process, driven over stdin.

    python -m benchmarks.proxy_process UPSTREAM LATENCY [MAX_IN_FLIGHT SERVICE_TIME]

With ``MAX_IN_FLIGHT`` and ``SERVICE_TIME`` it is also a server of known capacity (the proxy's
limiting mode): at most that many requests admitted at once, the others answered 429; each keeps
its place ``SERVICE_TIME`` seconds from admission, its forward to the real server included (so the
capacity holds as long as the real server answers within that time, however busy the shared CPUs).

Commands, one per line: ``url`` (answers the proxy's URL), ``count`` (requests forwarded),
``rejected`` (429s of the limiting mode), ``clear`` (forget both). End of input stops the proxy.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import httpx

from benchmarks.common import FaultProxy


class _LoggingClient(httpx.AsyncClient):
    """Says on stderr why a forward failed (the proxy answers those with a bare 502)."""

    async def send(self, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        try:
            return await super().send(request, **kwargs)
        except httpx.HTTPError as exc:
            print(f"proxy: forwarding {request.url.path} failed: {exc!r}", file=sys.stderr, flush=True)
            raise


class BenchProxy(FaultProxy):
    """`FaultProxy` whose upstream pool drops idle connections after 1 s, before the server's
    5 s keep-alive timeout closes them: reusing a connection the server is closing fails the
    request with a 502 the benchmark would wrongly charge to the client (inference-sdk does not
    retry 502s)."""

    _client: httpx.AsyncClient | None
    #: Seconds a request keeps its place from admission, its forward included (capacity mode).
    hold = 0.0

    async def _forward(
        self, method: str, target: str, raw_headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, tuple[tuple[str, str], ...], bytes] | None:
        started = time.monotonic()
        forwarded = await super()._forward(method, target, raw_headers, body)
        await asyncio.sleep(max(0.0, self.hold - (time.monotonic() - started)))
        return forwarded

    async def _astart(self) -> None:
        await super()._astart()
        assert self._client is not None
        await self._client.aclose()
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64, keepalive_expiry=1.0)
        self._client = _LoggingClient(timeout=60.0, trust_env=False, limits=limits)


def main(upstream: str, latency: str, max_in_flight: str = "", service_time: str = "0") -> None:
    with BenchProxy(
        upstream, latency=float(latency), max_in_flight=int(max_in_flight) if max_in_flight else None
    ) as proxy:
        proxy.hold = float(service_time)
        for line in sys.stdin:
            command = line.strip()
            if command == "url":
                answer = proxy.url
            elif command == "count":
                answer = str(proxy.count())
            elif command == "rejected":
                answer = str(proxy.rejected)
            elif command == "clear":
                proxy.clear()
                answer = "ok"
            else:
                answer = f"unknown command {command!r}"
            print(answer, flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:5])
