"""Several real inference servers behind one `InferenceServer`: least-loaded routing, the same
results as with one server, a server killed mid-run, every server down, a server probed back in,
the step table's requests per server, and malformed server lists refused before any request.

Two more real servers are started on 9002 and 9003 (``MULTI_SERVER_PORTS``) by a module fixture,
or reused when ``MULTI_SERVER_URLS`` (comma-separated) points at running ones; only servers the
fixture started are stopped, or killed by a test.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
from pydantic import ValidationError
from support.fault_proxy import FaultProxy
from support.images import make_image
from support.servers import ServerProcess, start_server, start_servers

from prefect_roboflow.blocks import Clip, InferenceServer, InvalidInputError, ServerUnreachableError, record_responses
from prefect_roboflow.blocks._http import close_engines, requests_per_server
from prefect_roboflow.flows import embed_images

pytestmark = [pytest.mark.server, pytest.mark.slow]

N_IMAGES = 200


@pytest.fixture(scope="module")
def servers() -> Iterator[list[ServerProcess]]:
    """Two real servers besides the session's: reused from ``MULTI_SERVER_URLS``, or started here."""
    given = [u.strip().rstrip("/") for u in os.environ.get("MULTI_SERVER_URLS", "").split(",") if u.strip()]
    if given:
        yield [ServerProcess(url, url.rsplit(":", 1)[-1], owned=False) for url in given]
        return
    ports = os.environ.get("MULTI_SERVER_PORTS", "9002,9003").split(",")
    started = start_servers(ports)
    try:
        yield started
    finally:
        close_engines()
        for server in started:
            server.stop()


@pytest.fixture(scope="module")
def urls(servers: list[ServerProcess]) -> list[str]:
    return [s.url for s in servers]


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("multi_server")
    for i in range(N_IMAGES):
        (folder / f"img_{i:03d}.png").write_bytes(make_image(7000 + i, size=(96, 72)))
    return folder


def _rows(path: str) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()


def _steps_artifact(flow_run_id: Any) -> list[dict[str, Any]]:
    async def read() -> list[Any]:
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
                    key=ArtifactFilterKey(any_=["embed-images-steps"]),
                )
            )

    (artifact,) = asyncio.run(read())
    return json.loads(artifact.data)


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
    """Poll until ``condition`` holds; the timeout only ends a broken test."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.01)


def _free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_least_loaded_routing_spreads_requests_over_both_servers(urls: list[str], many: Path) -> None:
    clip = Clip(server=InferenceServer(api_url=urls))
    paths = sorted(many.iterdir())[:40]
    with record_responses() as infos:
        vectors = clip.embed_images(paths)
    assert vectors.shape == (40, 512)
    per_server = requests_per_server(infos)
    assert set(per_server) == set(urls) and sum(per_server.values()) == 40
    assert all(count >= 5 for count in per_server.values()), per_server  # both busy, not one taking all
    assert all(info.attempts == 1 for info in infos)


def test_a_flow_over_two_servers_gives_what_one_server_gives(urls: list[str], many: Path, tmp_path: Path) -> None:
    subset = [str(p) for p in sorted(many.iterdir())[:60]]
    two = embed_images(
        subset, str(tmp_path / "two"), server=urls, batch_size=20, cache_storage=str(tmp_path / "c2"), return_state=True
    )
    one = embed_images(subset, str(tmp_path / "one"), server=urls[0], batch_size=20, cache_storage=str(tmp_path / "c1"))
    two_rows, one_rows = _rows(two.result().embeddings_path), _rows(one.embeddings_path)
    assert [r["image_ref"] for r in two_rows] == [r["image_ref"] for r in one_rows] == subset
    assert all(r["status"] == "ok" for r in two_rows + one_rows)
    # one image per request on both: float32 on the same weights, only summation order may differ
    np.testing.assert_allclose(
        np.array([r["embedding"] for r in two_rows]), np.array([r["embedding"] for r in one_rows]), rtol=0, atol=1e-5
    )
    # the step table says which server answered how many
    (step,) = _steps_artifact(two.state_details.flow_run_id)
    counts = dict(part.rsplit(": ", 1) for part in step["requests_per_server"].split(", "))
    assert set(counts) == set(urls) and sum(int(n) for n in counts.values()) == step["requests"] == 60
    assert all(int(n) > 0 for n in counts.values())


MALFORMED: dict[str, Callable[[str], list[str]]] = {
    "empty": lambda url: [],
    "duplicate": lambda url: [url, url.replace("http://", "HTTP://") + "/"],
    "not http": lambda url: [url, "ftp://127.0.0.1:21"],
    "no scheme, no port": lambda url: [url, "127.0.0.1"],  # host:port alone is taken as http://
    "query string": lambda url: [url, f"{url}/?api_key=abc"],
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_server_list_is_refused_before_any_request(case: str, many: Path, tmp_path: Path) -> None:
    with FaultProxy("http://127.0.0.1:9") as counting:
        bad = MALFORMED[case](counting.url)
        with pytest.raises(InvalidInputError) as raised:
            embed_images(str(many), str(tmp_path / "out"), server=bad, cache_storage=str(tmp_path / "c"))
        assert raised.value.field == "server"
        assert "abc" not in str(raised.value)  # a key in a query string is not echoed
        with pytest.raises(ValidationError, match="api_url"):
            InferenceServer(api_url=bad)
        assert counting.count() == 0


def test_with_every_server_down_from_the_start_the_run_fails_naming_them(tmp_path: Path, many: Path) -> None:
    """No server has ever answered: the run fails after a short grace with one line naming them all
    (a saved block of two servers here), rather than each image failing after the whole retry budget."""
    dead = [f"http://127.0.0.1:{_free_port()}", f"http://127.0.0.1:{_free_port()}"]
    InferenceServer(api_url=dead, retry_backoff_seconds=0.05, retry_budget_seconds=2.0).save("all-down", overwrite=True)
    subset = [str(p) for p in sorted(many.iterdir())[:6]]
    state = embed_images(
        subset, str(tmp_path / "out"), server="all-down", cache_storage=str(tmp_path / "c"), return_state=True
    )
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, ServerUnreachableError) and all(url in str(error) for url in dead)


def test_a_server_down_at_start_is_probed_back_in(urls: list[str], many: Path) -> None:
    proxy = FaultProxy(urls[0]).start()  # only to learn a port; the "server" is down at first
    port = proxy.port
    proxy.stop()
    server = InferenceServer(api_url=[f"http://127.0.0.1:{port}", urls[1]], retry_backoff_seconds=0.05)
    clip = Clip(server=server)
    down, up = server.engine.backends
    paths = sorted(many.iterdir())
    with record_responses() as first:
        clip.embed_images(paths[:20])
    assert requests_per_server(first) == {urls[1]: 20}  # every request answered by the live server
    assert not down.healthy and up.healthy

    with FaultProxy(urls[0], port=port) as back:
        _wait_for(lambda: down.healthy, "the restarted server probed back in")
        assert back.requests[0].method == "GET" and back.requests[0].path == "/info"  # the probe
        with record_responses() as second:
            clip.embed_images(paths[20:60])
        assert back.count("/clip/embed_image") > 0
        assert set(requests_per_server(second)) == {f"http://127.0.0.1:{port}", urls[1]}


def test_one_server_killed_mid_run_every_image_once_and_no_failed_row(
    servers: list[ServerProcess], many: Path, tmp_path: Path
) -> None:
    """Runs last in this module: it kills a server the fixture started (or one of its own)."""
    victim = servers[1] if servers[1].owned else start_server(os.environ.get("MULTI_SERVER_KILL_PORT", "9004"))
    urls = [servers[0].url, victim.url]
    engine = InferenceServer(api_url=urls).engine  # the very engine the flow's server list resolves to
    target = engine.backends[1]
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = embed_images(
                str(many), str(tmp_path / "out"), server=urls, batch_size=50, cache_storage=str(tmp_path / "c")
            )
        except BaseException as error:  # pragma: no cover - reported below
            outcome["error"] = error

    flow = threading.Thread(target=run)
    flow.start()
    try:
        _wait_for(lambda: target.routed >= 20 or not flow.is_alive(), "requests routed to the victim")
        assert flow.is_alive(), "the run finished before the server could be killed"
        victim.kill()
        killed_after = target.routed
    finally:
        flow.join(timeout=600)
        if victim is not servers[1]:
            victim.stop()
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    rows = _rows(result.embeddings_path)
    assert len(rows) == N_IMAGES and len({r["image_ref"] for r in rows}) == N_IMAGES
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows if r["status"] != "ok"][:3]
    assert result.requests == N_IMAGES  # every image answered exactly once
    assert result.retries >= 1  # some request met the dead server and went to the other one
    assert killed_after < N_IMAGES and not target.healthy  # the dead server was taken out and stays out
