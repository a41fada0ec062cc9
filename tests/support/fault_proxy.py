"""Loopback HTTP/1.1 reverse proxy that injects network faults, for tests.

The proxy runs its own asyncio event loop in a daemon thread, so plain
synchronous tests can drive it::

    with FaultProxy(upstream_url) as proxy:
        proxy.inject(Fault.status(503), Fault.reset(), path_prefix="/infer")
        ...  # point the client under test at proxy.url

Every request is recorded; queued faults are consumed one per matching
request in FIFO order; unmatched requests are forwarded unchanged.

Limiting mode stands for a server that limits concurrency (a GPU box, a
gateway): at most ``max_in_flight`` requests are admitted at a time, the others
answered ``429`` with ``Retry-After``; each admitted request can also hold its
place for ``service_time`` seconds first, so the proxy is a server of known
capacity, ``max_in_flight / service_time`` requests per second::

    with FaultProxy(upstream_url, max_in_flight=2, service_time=0.05) as proxy:
        ...
        proxy.rejected  # 429s sent because more than 2 were in flight
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from types import TracebackType
from typing import Literal

import httpx

__all__ = ["Fault", "FaultProxy", "RecordedRequest"]

FaultKind = Literal["status", "reset", "close", "stall", "truncate", "lost"]

# Per-connection headers a proxy must not forward (RFC 9110 7.6.1), plus the
# ones it recomputes itself.
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding"}
    | {"upgrade", "host", "content-length"}
)
_MAX_HEADERS = 100
_MAX_BODY = 16 * 1024 * 1024


@dataclass(frozen=True)
class Fault:
    """One injected failure; build it with the classmethods below."""

    kind: FaultKind
    code: int = 0
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    seconds: float = 0.0

    @classmethod
    def status(
        cls,
        code: int,
        body: bytes = b'{"message":"injected"}',
        headers: Mapping[str, str] | None = None,
    ) -> Fault:
        """Answer ``code`` without forwarding: an overloaded or failing server
        (503/500), or a rate limiter (429 with ``{"Retry-After": "1"}``)."""
        return cls("status", code=code, body=body, headers=tuple((headers or {}).items()))

    @classmethod
    def reset(cls) -> Fault:
        """Read the request, then abort with a TCP RST and no response: a
        crashed server, a load balancer killing the flow, a NAT entry expiring."""
        return cls("reset")

    @classmethod
    def close(cls) -> Fault:
        """Read the request, then close cleanly (FIN) without answering: a
        server closing an idle keep-alive connection just as a request arrives."""
        return cls("close")

    @classmethod
    def stall(cls, seconds: float) -> Fault:
        """Read the request, hold it for ``seconds``, then forward normally: a
        hung or badly overloaded server; clients with shorter timeouts time out."""
        return cls("stall", seconds=seconds)

    @classmethod
    def delay(cls, seconds: float) -> Fault:
        """Alias of :meth:`stall` (a slow response is a short stall)."""
        return cls.stall(seconds)

    @classmethod
    def truncate(cls) -> Fault:
        """Forward, send status and headers with the full Content-Length but only
        half the body, then close: a connection dropped mid-response."""
        return cls("truncate")

    @classmethod
    def lost(cls) -> Fault:
        """Forward, then abort with a TCP RST instead of the answer: the request took effect
        upstream but its answer was lost (a client timing out after the server acted), so a
        retry of it finds its own effect (a conditional PUT retried gets 412)."""
        return cls("lost")

    @property
    def name(self) -> str:
        """Short label stored in :attr:`RecordedRequest.fault`."""
        if self.kind == "status":
            return f"status:{self.code}"
        if self.kind == "stall":
            return f"stall:{self.seconds:g}"
        return self.kind


@dataclass(frozen=True)
class RecordedRequest:
    """A request as received by the proxy (``fault`` is the injected fault's name)."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    fault: str | None


class FaultProxy:
    """Fault-injecting reverse proxy in front of ``upstream`` (see module doc).

    ``latency`` (seconds, settable at any time) is slept before every forwarded
    request, emulating a server across a real network. ``max_in_flight`` and
    ``service_time`` (also settable) are the limiting mode: see the module doc.
    A request is admitted after its latency (when it reaches the "server") and
    leaves before its answer is written, so a client that never has more than
    ``max_in_flight`` requests in flight never gets a 429.
    """

    def __init__(
        self,
        upstream: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        latency: float = 0.0,
        max_in_flight: int | None = None,
        service_time: float = 0.0,
        retry_after: str = "1",
    ) -> None:
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"FaultProxy binds loopback addresses only, not {host!r}")
        self.upstream = upstream.rstrip("/")
        self.host = host
        self.port = port
        self.latency = latency
        self.max_in_flight = max_in_flight
        self.service_time = service_time
        self.retry_after = retry_after
        self._admitted = 0
        self._peak_admitted = 0
        self._rejected = 0
        self._lock = threading.Lock()
        self._faults: list[tuple[str | None, Fault]] = []
        self._requests: list[RecordedRequest] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._client: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ----------------------------------------------------------- control
    def start(self) -> FaultProxy:
        if self._loop is not None:
            raise RuntimeError("FaultProxy already started")
        loop = self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._astart(), loop).result(timeout=10)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._astop(), loop).result(timeout=1.5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=1.0)
        if not thread.is_alive():
            loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def inject(self, *faults: Fault, path_prefix: str | None = None) -> None:
        """Queue ``faults`` for requests whose path starts with ``path_prefix``."""
        with self._lock:
            self._faults.extend((path_prefix, f) for f in faults)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def count(self, path_prefix: str | None = None) -> int:
        with self._lock:
            return sum(1 for r in self._requests if path_prefix is None or r.path.startswith(path_prefix))

    def clear(self) -> None:
        """Forget recorded requests, drop any unconsumed faults, zero the limiting counters."""
        with self._lock:
            self._requests.clear()
            self._faults.clear()
            self._rejected = 0
            self._peak_admitted = self._admitted

    @property
    def rejected(self) -> int:
        """429s answered by the limiting mode (``max_in_flight`` requests were already in)."""
        with self._lock:
            return self._rejected

    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet answered."""
        with self._lock:
            return self._admitted

    @property
    def peak_in_flight(self) -> int:
        """The most requests admitted at once (limiting mode or not, faults aside)."""
        with self._lock:
            return self._peak_admitted

    def _admit(self) -> bool:
        with self._lock:
            if self.max_in_flight is not None and self._admitted >= self.max_in_flight:
                self._rejected += 1
                return False
            self._admitted += 1
            self._peak_admitted = max(self._peak_admitted, self._admitted)
            return True

    def _leave(self) -> None:
        with self._lock:
            self._admitted -= 1

    # ----------------------------------------------------------- event loop side
    async def _astart(self) -> None:
        self._closing = False
        # As long as the blocks wait (InferenceServer.timeout_seconds): CPU-bound PE requests queue for a while.
        self._client = httpx.AsyncClient(timeout=60.0, trust_env=False)
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _astop(self) -> None:
        self._closing = True  # connections accepted from now on are closed at once
        if self._server is not None:
            # Stop accepting, let accepts under way reach _handle, only then close the
            # server: on 3.11 a connection accepted just before Server.close() leaks.
            loop = asyncio.get_running_loop()
            for sock in self._server.sockets:
                loop.remove_reader(sock.fileno())
            await asyncio.sleep(0.05)
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=0.5)
        if self._client is not None:
            await self._client.aclose()

    def _take_fault(self, path: str) -> Fault | None:
        with self._lock:
            for i, (prefix, fault) in enumerate(self._faults):
                if prefix is None or path.startswith(prefix):
                    del self._faults[i]
                    return fault
        return None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while not self._closing and await self._serve_one(reader, writer):
                pass
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass  # peer went away or sent garbage: drop the connection
        except asyncio.CancelledError:
            pass  # stop(): end quietly (3.11 streams log cancelled handler tasks)
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; return True to keep the connection open."""
        line = await reader.readline()
        if not line.strip():
            return False
        method, target, version = line.decode("latin-1").split()
        raw_headers: list[tuple[str, str]] = []
        while (hline := await reader.readline()) not in (b"\r\n", b"\n", b""):
            if len(raw_headers) >= _MAX_HEADERS:
                return False
            name, _, value = hline.decode("latin-1").partition(":")
            raw_headers.append((name.strip(), value.strip()))
        headers: dict[str, str] = {}
        for name, value in raw_headers:
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        if "chunked" in headers.get("transfer-encoding", "").lower():
            await self._respond(writer, 501, b'{"message":"chunked request bodies unsupported"}')
            return False
        length = int(headers.get("content-length", "0"))
        if not 0 <= length <= _MAX_BODY:
            return False
        body = await reader.readexactly(length)
        path, _, query = target.partition("?")
        fault = self._take_fault(path)
        with self._lock:
            self._requests.append(RecordedRequest(method, path, query, headers, body, fault.name if fault else None))
        keep_alive = version == "HTTP/1.1" and "close" not in headers.get("connection", "").lower()

        if fault is not None and fault.kind == "status":
            await self._respond(writer, fault.code, fault.body, fault.headers, keep_alive)
            return keep_alive
        if fault is not None and fault.kind == "reset":
            self._abort(writer)
            return False
        if fault is not None and fault.kind == "close":
            return False
        if fault is not None and fault.kind == "stall":
            await asyncio.sleep(fault.seconds)
        if self.latency > 0:
            await asyncio.sleep(self.latency)
        if not self._admit():
            body = b'{"message":"too many requests in flight"}'
            await self._respond(writer, 429, body, (("Retry-After", self.retry_after),), keep_alive)
            return keep_alive
        try:  # leave before answering: the client may send its next request as soon as it reads this one
            if self.service_time > 0:
                await asyncio.sleep(self.service_time)
            forwarded = await self._forward(method, target, raw_headers, body)
        finally:
            self._leave()
        if forwarded is None:  # upstream unreachable or broke: answer like a gateway
            await self._respond(writer, 502, b'{"message":"bad gateway"}')
            return False
        status, resp_headers, resp_body = forwarded
        if fault is not None and fault.kind == "lost":
            self._abort(writer)
            return False
        if fault is not None and fault.kind == "truncate":
            head = self._head(status, resp_headers, len(resp_body), keep_alive=False)
            writer.write(head + resp_body[: len(resp_body) // 2])
            await writer.drain()
            return False
        await self._respond(writer, status, resp_body, resp_headers, keep_alive)
        return keep_alive

    async def _forward(
        self, method: str, target: str, raw_headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, tuple[tuple[str, str], ...], bytes] | None:
        """The upstream's status, headers and body, or None when it could not be reached."""
        assert self._client is not None
        fwd_headers = [(k, v) for k, v in raw_headers if k.lower() not in _HOP_BY_HOP]
        try:
            request = self._client.build_request(method, self.upstream + target, headers=fwd_headers, content=body)
            response = await self._client.send(request, stream=True)
            try:
                resp_body = b"".join([chunk async for chunk in response.aiter_raw()])
            finally:
                await response.aclose()
        except httpx.HTTPError:
            return None
        return response.status_code, tuple(response.headers.multi_items()), resp_body

    @staticmethod
    def _abort(writer: asyncio.StreamWriter) -> None:
        """Close the connection with a TCP RST."""
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    @staticmethod
    def _head(code: int, headers: tuple[tuple[str, str], ...], length: int, *, keep_alive: bool) -> bytes:
        try:
            reason = HTTPStatus(code).phrase
        except ValueError:
            reason = "Unknown"
        lines = [f"HTTP/1.1 {code} {reason}"]
        lines += [f"{k}: {v}" for k, v in headers if k.lower() not in _HOP_BY_HOP]
        if not any(k.lower() == "content-type" for k, _ in headers):
            lines.append("Content-Type: application/json")
        lines.append(f"Content-Length: {length}")
        lines.append(f"Connection: {'keep-alive' if keep_alive else 'close'}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    @classmethod
    async def _respond(
        cls,
        writer: asyncio.StreamWriter,
        code: int,
        body: bytes,
        headers: tuple[tuple[str, str], ...] = (),
        keep_alive: bool = False,
    ) -> None:
        writer.write(cls._head(code, headers, len(body), keep_alive=keep_alive) + body)
        await writer.drain()
