"""A proxy named by the environment carries the engine's requests to a plain-http server, as httpx
carries any other client's: the engine's own transport made httpx ignore it (an ``http://``
server behind a company proxy was reached directly, or not at all)."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from typing import ClassVar

import pytest

from prefect_roboflow.blocks import InferenceServer, ServerUnreachableError
from prefect_roboflow.blocks._http import close_engines, environment_proxy, pool_options
from prefect_roboflow.blocks._transport import AsyncioBackend


class _ForwardProxy(http.server.BaseHTTPRequestHandler):
    """Answers every request itself, as a forward proxy would relay it, and records its target."""

    seen: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        type(self).seen.append(self.path)  # a proxy is sent the absolute URL
        body = json.dumps({"name": "through the proxy", "version": "0", "uuid": "x"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ForwardProxy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _ForwardProxy.seen = []
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{server.server_address[1]}")
    close_engines()  # engines are per process: one made before the variable was set would not see it
    try:
        yield _ForwardProxy.seen
    finally:
        close_engines()
        server.shutdown()
        server.server_close()


def test_an_http_server_is_reached_through_the_proxy_the_environment_names(proxy: list[str]) -> None:
    server = InferenceServer(api_url="http://inference.invalid:9001")  # a name only the proxy could resolve
    assert server.info()["name"] == "through the proxy"
    assert proxy == ["http://inference.invalid:9001/info"]


def test_no_proxy_still_sends_a_server_direct(proxy: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "inference.invalid")
    server = InferenceServer(api_url="http://inference.invalid:9001", connect_timeout_seconds=1)
    with pytest.raises(ServerUnreachableError):  # direct: the name does not resolve
        server.info()
    assert proxy == []


def test_a_proxy_for_other_servers_leaves_an_http_server_direct_and_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """``NO_PROXY`` names the server: the engine's own transport, even when the proxy for the others
    is one httpx could not use here (SOCKS without ``socksio``: building it for every server failed
    every request)."""
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "no_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ALL_PROXY", "socks5://127.0.0.1:1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    assert environment_proxy("http://127.0.0.1:9001") is None
    assert environment_proxy("http://inference.invalid:9001") == "socks5://127.0.0.1:1"
    assert isinstance(pool_options("http://127.0.0.1:9001", 4)["transport"]._pool._network_backend, AsyncioBackend)


def test_an_engine_that_cannot_be_built_leaves_no_thread_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", "ftp://127.0.0.1:1")  # a proxy httpx cannot use, with or without extras
    close_engines()

    def engine_threads() -> set[threading.Thread]:  # other tests' engines may live on, outside the registry
        return {t for t in threading.enumerate() if t.name == "prefect-roboflow-http"}

    before = engine_threads()
    try:
        with pytest.raises(ValueError, match="proxy"):
            InferenceServer(api_url="http://inference.invalid:9001").info()
        assert engine_threads() <= before  # the engine that could not be made started none that lives on
    finally:
        close_engines()
