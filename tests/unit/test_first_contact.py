"""Retries only where they can help: a refused connection is retried for a short grace while no
server of the engine has ever answered (a wrong URL, or a server still starting), and for the whole
retry budget once one has (a server restarting mid-run). A plain HTTP server on loopback stands in."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from prefect_roboflow.blocks import InferenceServer, ServerUnreachableError
from prefect_roboflow.blocks._http import FIRST_CONTACT_GRACE, close_engines


class _Info(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"name": "stand-in"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _Server:
    """`GET /info` on a fixed loopback port, stopped and started again at will."""

    def __init__(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        self._http: ThreadingHTTPServer | None = None

    def start(self) -> None:
        self._http = ThreadingHTTPServer(("127.0.0.1", self.port), _Info)
        threading.Thread(target=self._http.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


@pytest.fixture()
def stand_in() -> Iterator[_Server]:
    server = _Server()
    try:
        yield server
    finally:
        server.stop()
        close_engines()


def _get_info(url: str) -> dict:
    engine = InferenceServer(api_url=url, retry_backoff_seconds=0.2, max_retries=20).engine
    return engine.run(engine.get("/info"))


def test_a_server_that_never_answered_is_unreachable_after_the_grace(stand_in: _Server) -> None:
    url = f"http://127.0.0.1:{stand_in.port}"  # nothing listens yet
    with pytest.raises(ServerUnreachableError, match="is it running") as raised:
        _get_info(url)
    assert url in str(raised.value) and not raised.value.retryable


def test_a_server_that_answered_before_is_waited_for_past_the_grace(stand_in: _Server) -> None:
    stand_in.start()
    url = f"http://127.0.0.1:{stand_in.port}"
    assert _get_info(url)["name"] == "stand-in"
    stand_in.stop()  # now refused: a restart mid-run
    back = threading.Timer(FIRST_CONTACT_GRACE + 1.0, stand_in.start)
    back.start()
    try:
        assert _get_info(url)["name"] == "stand-in"  # retried past the grace, within the budget
    finally:
        back.cancel()
        back.join()


def test_a_server_still_starting_within_the_grace_is_waited_for(stand_in: _Server) -> None:
    up = threading.Timer(FIRST_CONTACT_GRACE / 6, stand_in.start)
    up.start()
    try:
        assert _get_info(f"http://127.0.0.1:{stand_in.port}")["name"] == "stand-in"
    finally:
        up.join()
