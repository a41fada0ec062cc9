"""A plain-TCP network backend for httpcore on asyncio's own transports and protocols.

httpx's default backend runs every socket operation through anyio: a cancel scope and a timer per
read, a checkpoint per write, and, before each request, a readability check of every idle pooled
connection that asks the socket for its peer name and polls it (``has_expired``). Against a server
that answers at once (a GPU box on the LAN) that was ~40% of the client's CPU per request. This
backend keeps each connection's protocol reading into a small buffer, so "is this idle connection
readable?" is answered from state (data or a close arrived) without a system call, and a read or a
write is one call into the transport unless it has to wait.

It implements httpcore's documented `httpcore.AsyncNetworkBackend` interface for plain ``http://``
servers; `blocks._http` uses it for those and httpx's default transport for ``https://`` (TLS stays
with the well-trodden path) and for proxies. Errors are httpcore's own types, so httpx maps them as
for its default backend (`httpx.ConnectError`, `httpx.ReadTimeout`, ...).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Iterable
from typing import Any

import httpcore

__all__ = ["AsyncioBackend", "AsyncioStream"]

#: Bytes a connection buffers before it stops reading from the socket (and starts again below LOW).
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024


class _Protocol(asyncio.Protocol):
    """Buffers what the socket receives and wakes the one reader or writer waiting on it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.eof = False
        self.error: BaseException | None = None  # the connection was lost with an error
        self.closed = False
        self.reading_paused = False
        self.writing_paused = False
        self.read_waiter: asyncio.Future[bool] | None = None
        self.drain_waiter: asyncio.Future[bool] | None = None

    # -- asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.buffered += len(data)
        if self.buffered > HIGH_WATER and not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()
        self._wake_reader()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake_reader()
        return False  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.eof = True
        if exc is not None:
            self.error = exc
        self._wake_reader()
        waiter, self.drain_waiter = self.drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        waiter, self.drain_waiter = self.drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    # -- helpers -----------------------------------------------------------------------------
    def _wake_reader(self) -> None:
        waiter, self.read_waiter = self.read_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    def take(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` of what is buffered (there is some)."""
        chunk = self.chunks.popleft()
        if len(chunk) > max_bytes:
            self.chunks.appendleft(chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        self.buffered -= len(chunk)
        if self.reading_paused and self.buffered <= LOW_WATER and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()
        return chunk


async def _wait(loop: asyncio.AbstractEventLoop, waiter: asyncio.Future[bool], timeout: float | None) -> bool:
    """Wait for ``waiter`` (woken with True); False when ``timeout`` seconds passed first."""
    if timeout is None:
        return await waiter
    timer = loop.call_later(max(0.0, timeout), _expire, waiter)
    try:
        return await waiter
    finally:
        timer.cancel()


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


class AsyncioStream(httpcore.AsyncNetworkStream):
    """One TCP connection: reads from its protocol's buffer, writes straight to its transport."""

    def __init__(self, transport: asyncio.Transport, protocol: _Protocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self._loop = protocol.loop

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        protocol = self._protocol
        if not protocol.chunks:
            if protocol.error is not None:
                raise httpcore.ReadError(str(protocol.error) or type(protocol.error).__name__)
            if protocol.eof:
                return b""
            waiter = protocol.read_waiter = self._loop.create_future()
            if not await _wait(self._loop, waiter, timeout):
                protocol.read_waiter = None
                raise httpcore.ReadTimeout(f"no data within {timeout}s")
            if not protocol.chunks:
                if protocol.error is not None:
                    raise httpcore.ReadError(str(protocol.error) or type(protocol.error).__name__)
                return b""  # the server closed the connection
        return protocol.take(max_bytes)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        protocol = self._protocol
        if protocol.closed or self._transport.is_closing():
            raise httpcore.WriteError("the connection is closed")
        try:
            self._transport.write(buffer)
        except (OSError, RuntimeError) as exc:
            raise httpcore.WriteError(str(exc)) from exc
        if protocol.writing_paused and not protocol.closed:
            waiter = protocol.drain_waiter = self._loop.create_future()
            if not await _wait(self._loop, waiter, timeout):
                protocol.drain_waiter = None
                raise httpcore.WriteTimeout(f"the socket took no data for {timeout}s")
            if protocol.closed and protocol.error is not None:
                raise httpcore.WriteError(str(protocol.error))

    async def aclose(self) -> None:
        if not self._transport.is_closing():
            self._transport.close()
        await asyncio.sleep(0)  # the transport closes the socket on the next loop iteration

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.UnsupportedProtocol("this backend serves plain http:// servers; https uses httpx's default")

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":  # asked of idle connections: anything received, or a close, means expired
            protocol = self._protocol
            return bool(protocol.chunks) or protocol.eof
        if info == "socket":
            return self._transport.get_extra_info("socket")
        if info == "client_addr":
            return self._transport.get_extra_info("sockname")
        if info == "server_addr":
            return self._transport.get_extra_info("peername")
        return None  # "ssl_object": no TLS here


async def _connect(
    connecting: Awaitable[tuple[asyncio.BaseTransport, _Protocol]], where: str, timeout: float | None
) -> tuple[asyncio.Transport, _Protocol]:
    """A new connection's transport and protocol, or httpcore's connect errors."""
    try:
        transport, protocol = await asyncio.wait_for(connecting, timeout)
    except asyncio.TimeoutError:
        raise httpcore.ConnectTimeout(f"no connection to {where} within {timeout}s") from None
    except OSError as exc:
        raise httpcore.ConnectError(str(exc) or type(exc).__name__) from exc
    assert isinstance(transport, asyncio.Transport)
    return transport, protocol


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    """Opens `AsyncioStream` connections on the running asyncio loop."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        local = (local_address, 0) if local_address else None
        connecting = loop.create_connection(lambda: _Protocol(loop), host, port, local_addr=local)
        transport, protocol = await _connect(connecting, f"{host}:{port}", timeout)
        sock: socket.socket | None = transport.get_extra_info("socket")
        if sock is not None:  # asyncio already set TCP_NODELAY
            for option in socket_options or ():
                sock.setsockopt(*option)
        return AsyncioStream(transport, protocol)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        connecting = loop.create_unix_connection(lambda: _Protocol(loop), path)
        return AsyncioStream(*await _connect(connecting, path, timeout))

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
