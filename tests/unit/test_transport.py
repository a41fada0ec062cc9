"""The asyncio network backend the engine uses for plain http:// servers (`blocks._transport`).

Every test runs a real HTTP/1.1 server on 127.0.0.1 (asyncio streams, in the test's own loop) and a
real httpx client built as the engine builds it (`pool_options`): large bodies both ways (the
backend's flow control), a server that closes an idle keep-alive connection, read and write
timeouts, a refused connection, a cancelled request, and the engine's typed errors over it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
from collections.abc import AsyncIterator

import httpx
import pytest

from prefect_roboflow.blocks._http import HttpSettings, InferenceHTTP, pool_options
from prefect_roboflow.blocks._transport import HIGH_WATER, AsyncioBackend, AsyncioStream
from prefect_roboflow.blocks.exceptions import InferenceConnectionError, InferenceTimeoutError


class Server:
    """``/echo`` answers the body's length and sha256; ``/big?n=N`` N bytes; ``/bye`` answers and
    then closes the connection (no ``Connection: close``: the client learns it when idle);
    ``/never`` and ``/deaf`` never answer (``/deaf`` never reads its body either)."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests = 0
        self.closed_idle = asyncio.Event()
        self.got_never = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for handler in self._handlers:  # the ones still waiting (/never, /deaf): the test loop is the session's
            handler.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests += 1
                lines = head.decode().split("\r\n")
                path = lines[0].split(" ")[1]
                headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
                length = int(headers.get("content-length", headers.get("Content-Length", "0")))
                if path.startswith("/deaf"):
                    await asyncio.Event().wait()
                body = await reader.readexactly(length)
                if path.startswith("/never"):
                    self.got_never.set()
                    await asyncio.Event().wait()
                if path.startswith("/big"):
                    payload = b"x" * int(path.split("n=")[1])
                else:
                    payload = json.dumps({"received": len(body), "sha256": hashlib.sha256(body).hexdigest()}).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(payload)}\r\n\r\n".encode()
                    + payload
                )
                await writer.drain()
                if path.startswith("/bye"):
                    writer.close()
                    await writer.wait_closed()
                    self.closed_idle.set()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self._handlers.discard(handler)


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    async with Server() as running:
        yield running


def client(url: str, timeout: float = 10.0) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, timeout=timeout, **pool_options(url, 4))


def test_http_servers_use_the_asyncio_backend_https_keeps_httpx_default() -> None:
    transport = pool_options("http://127.0.0.1:9001", 4)["transport"]
    # The pool httpx would build, on this backend (fails if httpx stops building it this way).
    assert isinstance(transport, httpx.AsyncHTTPTransport)
    assert isinstance(transport._pool._network_backend, AsyncioBackend)
    assert transport._pool._max_connections == 4
    options = pool_options("https://infer.example.com", 4)
    assert "transport" not in options and options["limits"].max_connections == 4


async def test_large_bodies_both_ways_arrive_whole(server: Server) -> None:
    body = bytes(range(256)) * (20 * 4096)  # 20 MiB: the transport pauses and resumes writing
    big = 3 * HIGH_WATER + 12_345  # the protocol pauses and resumes reading
    async with client(server.url) as http:
        echoed = (await http.post("/echo", content=body)).json()
        assert echoed == {"received": len(body), "sha256": hashlib.sha256(body).hexdigest()}
        answer = await http.get(f"/big?n={big}")
        assert answer.content == b"x" * big
        # Both on one kept-alive connection.
        assert (await http.post("/echo", content=b"abc")).json()["received"] == 3
    assert server.connections == 1 and server.requests == 3


async def test_a_connection_the_server_closed_while_idle_is_not_reused(server: Server) -> None:
    async with client(server.url) as http:
        assert (await http.post("/bye", content=b"1")).status_code == 200
        await server.closed_idle.wait()
        # The FIN is on its way over loopback: wait until the client has it (not a sleep). The pool
        # drops the connection as soon as it sees it; until then the connection says it is readable.
        pool = http._transport._pool  # type: ignore[attr-defined]

        def seen() -> bool:
            if not pool.connections:
                return True
            stream = pool.connections[0]._connection._network_stream
            assert isinstance(stream, AsyncioStream)
            return bool(stream.get_extra_info("is_readable"))

        for _ in range(100_000):
            if seen():
                break
            await asyncio.sleep(0)
        assert seen(), "the client never saw the server's close"
        # The next request goes on a new connection, without an error.
        assert (await http.post("/echo", content=b"22")).json()["received"] == 2
    assert server.connections == 2


async def test_read_timeout(server: Server) -> None:
    async with client(server.url, timeout=0.3) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post("/never", content=b"x")
        # The pool is still usable (this answer under the default timeout: a loaded machine is slow).
        assert (await http.post("/echo", content=b"ok", timeout=10.0)).json()["received"] == 2


async def test_write_timeout_when_the_server_reads_nothing(server: Server) -> None:
    body = b"\0" * (256 * 1024 * 1024)  # more than loopback's socket buffers hold
    async with httpx.AsyncClient(
        base_url=server.url, timeout=httpx.Timeout(10.0, write=0.5), **pool_options(server.url, 4)
    ) as http:
        with pytest.raises(httpx.WriteTimeout):
            await http.post("/deaf", content=body)


async def test_refused_connection() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with client(f"http://127.0.0.1:{port}") as http:
        with pytest.raises(httpx.ConnectError):
            await http.get("/")


async def test_a_cancelled_request_leaves_the_pool_usable(server: Server) -> None:
    async with client(server.url) as http:
        waiting = asyncio.ensure_future(http.post("/never", content=b"x"))
        await server.got_never.wait()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert (await http.post("/echo", content=b"after")).json()["received"] == 5


async def test_the_engine_maps_the_backend_errors_to_typed_ones(server: Server) -> None:
    engine = InferenceHTTP(HttpSettings(api_url=server.url, max_retries=0))
    try:
        answer = await engine.arun(engine.post("/echo", {"a": 1}))
        assert answer["received"] == len(b'{"a":1}')
    finally:
        engine.close()
    engine = InferenceHTTP(HttpSettings(api_url=server.url, timeout=0.3, max_retries=0))
    try:
        with pytest.raises(InferenceTimeoutError):
            await engine.arun(engine.post("/never", {"a": 1}))
    finally:
        engine.close()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    engine = InferenceHTTP(HttpSettings(api_url=f"http://127.0.0.1:{port}", max_retries=0))
    try:
        with pytest.raises(InferenceConnectionError):
            await engine.arun(engine.get("/info"))
    finally:
        engine.close()
