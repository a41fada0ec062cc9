"""Run the tests' `FaultProxy` with a fixed latency in its own process, driven over stdin.

    python -m benchmarks.proxy_process UPSTREAM LATENCY

Commands, one per line: ``url`` (answers the proxy's URL), ``count`` (requests forwarded),
``clear`` (forget them). End of input stops the proxy.
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


def main(upstream: str, latency: str) -> None:
    with BenchProxy(upstream, latency=float(latency)) as proxy:
        for line in sys.stdin:
            command = line.strip()
            if command == "url":
                answer = proxy.url
            elif command == "count":
                answer = str(proxy.count())
            elif command == "clear":
                proxy.clear()
                answer = "ok"
            else:
                answer = f"unknown command {command!r}"
            print(answer, flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
