"""Tests for the loopback fault-injecting proxy used by the HTTP client tests."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from support.fault_proxy import Fault, FaultProxy  # tests/ is on sys.path (conftest.py)


class _Upstream(BaseHTTPRequestHandler):
    """Answers JSON echoing the method, path and received body length."""

    protocol_version = "HTTP/1.1"
    hits = 0
    hits_lock = threading.Lock()
    gate = threading.Event()  # requests to /gate wait for it
    together = threading.Barrier(1)  # requests to /together wait for each other (set per test)

    def _answer(self) -> None:
        with _Upstream.hits_lock:
            _Upstream.hits += 1
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.path.startswith("/gate"):
            _Upstream.gate.wait(timeout=10)
        if self.path.startswith("/together"):  # every request of the test must be here at once
            _Upstream.together.wait()
        payload = json.dumps(
            {
                "method": self.command,
                "path": self.path,
                "received": len(body),
                "x_test": self.headers.get("X-Test"),
                "padding": "x" * 200,
            }
        ).encode()
        self.send_response(201 if self.path.startswith("/created") else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Upstream", "yes")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_POST = _answer
    do_GET = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    request_queue_size = 64  # the default 5 refuses connections when many arrive at once on a busy machine


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    server = _Server(("127.0.0.1", 0), _Upstream)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def proxy(upstream: str) -> Iterator[FaultProxy]:
    with FaultProxy(upstream) as p:
        yield p


def _upstream_hits() -> int:
    with _Upstream.hits_lock:
        return _Upstream.hits


def _raw_exchange(proxy: FaultProxy, path: str = "/raw") -> bytes:
    """Send one request on a bare socket and return everything read until EOF."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{{}}".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data


def test_forwards_request_and_response_with_keep_alive(proxy: FaultProxy) -> None:
    assert proxy.url == f"http://127.0.0.1:{proxy.port}" and proxy.port > 0
    local_ports = set()
    with httpx.Client(base_url=proxy.url, timeout=2) as client:
        for i in range(3):
            r = client.post(f"/infer/{i}?api_key=k", json={"n": i}, headers={"X-Test": "t"})
            assert r.status_code == 200
            assert r.headers["x-upstream"] == "yes"
            assert r.headers["content-type"] == "application/json"
            data = r.json()
            assert data["method"] == "POST"
            assert data["path"] == f"/infer/{i}?api_key=k"
            assert data["received"] == len(json.dumps({"n": i}, separators=(",", ":")))
            assert data["x_test"] == "t"
            local_ports.add(r.extensions["network_stream"].get_extra_info("client_addr")[1])
        r = client.post("/created", content=b"abc")
        assert r.status_code == 201 and r.json()["received"] == 3
    assert len(local_ports) == 1  # all three requests reused one client connection
    reqs = proxy.requests
    assert [(q.method, q.path, q.query, q.fault) for q in reqs[:3]] == [
        ("POST", f"/infer/{i}", "api_key=k", None) for i in range(3)
    ]
    assert reqs[0].headers["x-test"] == "t"
    assert reqs[0].headers["content-type"] == "application/json"
    assert json.loads(reqs[2].body) == {"n": 2}


def test_count_by_prefix_and_clear(proxy: FaultProxy) -> None:
    with httpx.Client(base_url=proxy.url, timeout=2) as client:
        for path in ("/a/1", "/a/2", "/b/1"):
            client.post(path, json={})
    assert proxy.count() == 3
    assert proxy.count("/a") == 2
    assert proxy.count("/b") == 1
    assert proxy.count("/c") == 0
    proxy.inject(Fault.status(500))
    proxy.clear()
    assert proxy.count() == 0 and proxy.requests == []
    with httpx.Client(base_url=proxy.url, timeout=2) as client:
        assert client.post("/a", json={}).status_code == 200  # clear() dropped the fault


def test_status_fault_answers_without_forwarding(proxy: FaultProxy) -> None:
    proxy.inject(Fault.status(429, headers={"Retry-After": "1"}))
    before = _upstream_hits()
    with httpx.Client(base_url=proxy.url, timeout=2) as client:
        r = client.post("/infer", json={"x": 1})
        assert r.status_code == 429
        assert r.headers["retry-after"] == "1"
        assert r.json() == {"message": "injected"}
        assert _upstream_hits() == before
        assert client.post("/infer", json={"x": 1}).status_code == 200  # connection kept
    assert _upstream_hits() == before + 1
    assert [r.fault for r in proxy.requests] == ["status:429", None]


def test_reset_aborts_with_rst(proxy: FaultProxy) -> None:
    proxy.inject(Fault.reset(), Fault.reset())
    with httpx.Client(base_url=proxy.url, timeout=2) as client, pytest.raises(httpx.TransportError):
        client.post("/infer", json={})
    with pytest.raises(ConnectionResetError):
        _raw_exchange(proxy)
    assert [r.fault for r in proxy.requests] == ["reset", "reset"]


def test_lost_forwards_then_aborts_without_the_answer(proxy: FaultProxy) -> None:
    proxy.inject(Fault.lost())
    before = _upstream_hits()
    with httpx.Client(base_url=proxy.url, timeout=2) as client, pytest.raises(httpx.TransportError):
        client.post("/infer", json={})
    assert _upstream_hits() == before + 1  # the request reached the upstream; its answer did not come back
    assert [r.fault for r in proxy.requests] == ["lost"]


def test_close_ends_connection_without_response(proxy: FaultProxy) -> None:
    proxy.inject(Fault.close(), Fault.close())
    with (
        httpx.Client(base_url=proxy.url, timeout=2) as client,
        pytest.raises(httpx.RemoteProtocolError),
    ):
        client.post("/infer", json={})
    assert _raw_exchange(proxy) == b""  # clean FIN, not RST
    assert proxy.count() == 2


def test_stall_times_out_client_without_blocking_others(proxy: FaultProxy) -> None:
    proxy.inject(Fault.stall(3.0), path_prefix="/slow")
    errors: list[BaseException] = []

    def slow() -> None:
        try:
            httpx.post(proxy.url + "/slow", json={}, timeout=0.3)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=slow)
    thread.start()
    deadline = time.monotonic() + 2
    while proxy.count("/slow") == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proxy.count("/slow") == 1
    with httpx.Client(base_url=proxy.url, timeout=2) as client:
        start = time.monotonic()
        assert client.post("/fast", json={}).status_code == 200
        assert time.monotonic() - start < 1.0  # not held behind the 3 s stall
    thread.join(timeout=2)
    assert len(errors) == 1 and isinstance(errors[0], httpx.ReadTimeout)


def test_stall_then_forwards(proxy: FaultProxy) -> None:
    proxy.inject(Fault.stall(0.3))
    start = time.monotonic()
    r = httpx.post(proxy.url + "/infer", json={}, timeout=2)
    assert r.status_code == 200 and r.json()["path"] == "/infer"
    assert time.monotonic() - start >= 0.3
    assert Fault.delay(0.3) == Fault.stall(0.3)


def test_truncate_sends_half_the_body(proxy: FaultProxy) -> None:
    full = httpx.post(proxy.url + "/infer", json={}, timeout=2).content
    proxy.inject(Fault.truncate())
    received = b""
    with (
        httpx.Client(timeout=2) as client,
        client.stream("POST", proxy.url + "/infer", json={}) as r,
    ):
        assert r.status_code == 200
        assert r.headers["x-upstream"] == "yes"
        assert int(r.headers["content-length"]) == len(full)
        with pytest.raises(httpx.RemoteProtocolError):
            for chunk in r.iter_raw():
                received += chunk
    assert received == full[: len(full) // 2]
    proxy.inject(Fault.truncate())
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.post(proxy.url + "/infer", json={}, timeout=2)


def test_faults_consumed_fifo_by_prefix(proxy: FaultProxy) -> None:
    proxy.inject(Fault.status(500), Fault.status(503))
    proxy.inject(Fault.status(418), path_prefix="/x")
    proxy.inject(Fault.status(502))
    with httpx.Client(base_url=proxy.url, timeout=2) as client:
        codes = [client.post(p, json={}).status_code for p in ("/y", "/y", "/y", "/x", "/x")]
    assert codes == [500, 503, 502, 418, 200]
    assert [r.fault for r in proxy.requests] == [
        "status:500",
        "status:503",
        "status:502",
        "status:418",
        None,
    ]


def test_prefix_fault_skips_non_matching_requests(proxy: FaultProxy) -> None:
    proxy.inject(Fault.status(503), path_prefix="/b")
    with httpx.Client(base_url=proxy.url, timeout=2) as client:
        assert client.post("/a", json={}).status_code == 200
        assert client.post("/b/1", json={}).status_code == 503
        assert client.post("/b/1", json={}).status_code == 200


def test_latency_applies_and_is_settable(proxy: FaultProxy) -> None:
    with httpx.Client(base_url=proxy.url, timeout=2) as client:
        client.post("/warm", json={})
        proxy.latency = 0.5
        start = time.monotonic()
        assert client.post("/infer", json={}).status_code == 200
        assert time.monotonic() - start >= 0.5
        proxy.latency = 0.0
        start = time.monotonic()
        assert client.post("/infer", json={}).status_code == 200
        assert time.monotonic() - start < 0.4


def test_concurrent_requests(proxy: FaultProxy) -> None:
    proxy.latency = 0.25
    # all 16 must be at the upstream at once to pass its barrier: a proxy that serialised them
    # would break it (timeout) and answer 502s; no wall-clock bound needed
    _Upstream.together = threading.Barrier(16, timeout=30)
    results: list[int] = []
    lock = threading.Lock()

    def call(i: int) -> None:
        r = client.post(f"/together/{i}", json={"i": i})
        with lock:
            results.append(r.status_code)

    limits = httpx.Limits(max_connections=32)
    with httpx.Client(base_url=proxy.url, timeout=60, limits=limits) as client:
        threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=90)
    assert results == [200] * 16
    assert proxy.count("/together/") == 16


def test_unreachable_upstream_gives_502() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with FaultProxy(dead) as proxy:
        assert httpx.post(proxy.url + "/infer", json={}, timeout=2).status_code == 502


def test_stop_is_prompt_with_stalled_connections(upstream: str) -> None:
    proxy = FaultProxy(upstream).start()
    try:
        proxy.inject(*(Fault.stall(30) for _ in range(4)))
        for _ in range(4):
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(proxy.url + "/infer", json={}, timeout=0.1)
        with socket.create_connection(("127.0.0.1", proxy.port)):  # an idle connection too
            start = time.monotonic()
            proxy.stop()
            assert time.monotonic() - start < 2
    finally:
        proxy.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.post(proxy.url + "/infer", json={}, timeout=1)


def test_rejects_non_loopback_host() -> None:
    with pytest.raises(ValueError):
        FaultProxy("http://127.0.0.1:1", host="0.0.0.0")


# --- limiting mode --------------------------------------------------------------------------


def _wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "condition not reached within 10 s"
        time.sleep(0.005)


def _post_in_thread(url: str, codes: list[int]) -> threading.Thread:
    thread = threading.Thread(target=lambda: codes.append(httpx.post(url, json={}, timeout=10).status_code))
    thread.start()
    return thread


def test_limiting_mode_answers_429_beyond_max_in_flight(upstream: str) -> None:
    _Upstream.gate.clear()
    with FaultProxy(upstream, max_in_flight=2, retry_after="3") as proxy:
        codes: list[int] = []
        held = [_post_in_thread(proxy.url + "/gate", codes) for _ in range(2)]
        _wait_until(lambda: proxy.in_flight == 2)
        with httpx.Client(base_url=proxy.url, timeout=5) as client:
            for _ in range(3):
                r = client.post("/infer", json={})
                assert r.status_code == 429 and r.headers["retry-after"] == "3"
                assert r.json() == {"message": "too many requests in flight"}
            _Upstream.gate.set()
            for thread in held:
                thread.join(timeout=10)
            assert codes == [200, 200] and proxy.in_flight == 0
            assert client.post("/infer", json={}).status_code == 200  # room again, same connection
        assert proxy.rejected == 3 and proxy.peak_in_flight == 2
        assert proxy.count() == 6  # rejected requests are recorded too
        proxy.clear()
        assert proxy.rejected == 0


def test_limiting_mode_never_rejects_a_client_within_the_limit(upstream: str) -> None:
    # A place is given back before the answer is written: the next request always finds it free.
    with FaultProxy(upstream, max_in_flight=1) as proxy, httpx.Client(base_url=proxy.url, timeout=5) as client:
        assert [client.post(f"/seq/{i}", json={}).status_code for i in range(30)] == [200] * 30
        assert proxy.rejected == 0 and proxy.peak_in_flight == 1


def test_service_time_holds_the_place(upstream: str) -> None:
    with FaultProxy(upstream, max_in_flight=1, service_time=0.5) as proxy:
        codes: list[int] = []
        start = time.monotonic()
        first = _post_in_thread(proxy.url + "/infer", codes)
        _wait_until(lambda: proxy.in_flight == 1)
        assert httpx.post(proxy.url + "/infer", json={}, timeout=5).status_code == 429
        first.join(timeout=10)
        assert codes == [200] and time.monotonic() - start >= 0.5
        proxy.max_in_flight = None  # settable: unlimited again
        proxy.service_time = 0.0
        assert httpx.post(proxy.url + "/infer", json={}, timeout=5).status_code == 200
