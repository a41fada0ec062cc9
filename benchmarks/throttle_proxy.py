"""A TCP proxy that emulates a slow link: a shared bandwidth limit and a one-way delay each way.

    python -m benchmarks.throttle_proxy UPSTREAM_HOST:PORT MBIT_PER_S DELAY_MS

Every byte in either direction crosses one shared link of ``MBIT_PER_S`` (per direction, like a
full-duplex link) and arrives ``DELAY_MS`` after it has been sent, so a request pays the
upload time of its body plus twice the delay. It works below HTTP (bytes are forwarded as
they are) and counts the bytes clients send. Driven over stdin, one command per line: ``url``
(answers the proxy's URL), ``bytes`` (client-to-server bytes since the last ``clear``),
``clear``. End of input stops it. `ThrottleProxy` runs it from the benchmark.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from types import TracebackType

__all__ = ["ThrottleProxy"]

CHUNK = 64 * 1024


class Link:
    """One direction of the emulated link: bytes queue for the wire, then travel ``delay`` s."""

    def __init__(self, bits_per_second: float, delay: float) -> None:
        self.bytes_per_second = bits_per_second / 8
        self.delay = delay
        self.free_at = 0.0
        self.sent = 0

    def arrival(self, size: int) -> float:
        """When ``size`` bytes put on the link now arrive at the other end."""
        now = time.monotonic()
        self.free_at = max(self.free_at, now) + size / self.bytes_per_second
        self.sent += size
        return self.free_at + self.delay


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: Link) -> None:
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            at, data = await queue.get()
            if not data:
                break
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            writer.write(data)
            await writer.drain()
        writer.close()

    delivering = asyncio.create_task(deliver())
    try:
        while data := await reader.read(CHUNK):
            queue.put_nowait((link.arrival(len(data)), data))
    except ConnectionError:
        pass
    queue.put_nowait((0.0, b""))
    with contextlib.suppress(ConnectionError):
        await delivering


async def serve(upstream: str, mbit: float, delay_ms: float) -> None:
    host, port = upstream.rsplit(":", 1)
    up, down = Link(mbit * 1e6, delay_ms / 1000), Link(mbit * 1e6, delay_ms / 1000)

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(host, int(port))
        except OSError:
            client_writer.close()
            return
        try:
            await asyncio.gather(_pump(client_reader, server_writer, up), _pump(server_reader, client_writer, down))
        except asyncio.CancelledError:  # shutting down with connections open
            return

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    listening = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    while line := await stdin.readline():
        command = line.decode().strip()
        if command == "url":
            answer = f"http://127.0.0.1:{listening}"
        elif command == "bytes":
            answer = str(up.sent)
        elif command == "clear":
            up.sent = 0
            answer = "ok"
        else:
            answer = f"unknown command {command!r}"
        print(answer, flush=True)
    server.close()


class ThrottleProxy:
    """The throttling proxy in its own process (its event loop never competes with the client
    being measured for the GIL)."""

    def __init__(self, upstream_url: str, mbit: float, delay_ms: float) -> None:
        self.upstream = upstream_url.split("://", 1)[-1].rstrip("/")
        self.mbit = mbit
        self.delay_ms = delay_ms
        self.url = ""
        self._process: subprocess.Popen[str] | None = None

    def __enter__(self) -> ThrottleProxy:
        from .common import REPO

        self._process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.throttle_proxy", self.upstream, str(self.mbit), str(self.delay_ms)],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        self.url = self._ask("url")
        return self

    def _ask(self, command: str) -> str:
        assert self._process is not None and self._process.stdin and self._process.stdout
        self._process.stdin.write(command + "\n")
        self._process.stdin.flush()
        answer = self._process.stdout.readline().strip()
        if not answer:
            raise RuntimeError(f"throttle proxy exited (code {self._process.poll()})")
        return answer

    def sent_bytes(self) -> int:
        """Bytes clients sent through the proxy since the last `clear`."""
        return int(self._ask("bytes"))

    def clear(self) -> None:
        """Restart the byte count."""
        self._ask("clear")

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._process is not None:
            assert self._process.stdin is not None
            self._process.stdin.close()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], float(sys.argv[2]), float(sys.argv[3])))
