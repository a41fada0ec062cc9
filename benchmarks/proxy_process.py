"""Run the tests' `FaultProxy` with a fixed latency in its own process, driven over stdin.

    python -m benchmarks.proxy_process UPSTREAM LATENCY [MAX_IN_FLIGHT SERVICE_TIME]

With ``MAX_IN_FLIGHT`` and ``SERVICE_TIME`` it is also a server of known capacity (the proxy's
limiting mode): at most that many requests admitted at once, each held that many seconds, the
others answered 429. Commands, one per line: ``url`` (answers the proxy's URL), ``count`` (requests
forwarded), ``rejected`` (429s of the limiting mode), ``clear`` (forget both). End of input stops
the proxy.
"""

from __future__ import annotations

import sys
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

    async def _astart(self) -> None:
        await super()._astart()
        assert self._client is not None
        await self._client.aclose()
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64, keepalive_expiry=1.0)
        self._client = _LoggingClient(timeout=60.0, trust_env=False, limits=limits)


def main(upstream: str, latency: str, max_in_flight: str = "", service_time: str = "0") -> None:
    limit = int(max_in_flight) if max_in_flight else None
    with BenchProxy(upstream, latency=float(latency), max_in_flight=limit, service_time=float(service_time)) as proxy:
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
