"""Reliability: flows over hundreds of images through real faults — bursts of 5xx/429, resets,
stalls, truncated bodies, the server process killed and restarted, the flow process killed —
must end with every image exactly once, and fail clearly when the server never comes back."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from prefect.settings import PREFECT_API_URL
from support.cache import cached_entries
from support.fault_proxy import Fault, FaultProxy
from support.images import make_image
from support.runs import task_runs_of

from prefect_roboflow.blocks import InferenceServer, ServerUnreachableError
from prefect_roboflow.flows import detect_crop_classify, embed_images

pytestmark = [pytest.mark.server, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SERVER_SCRIPTS = REPO / "deployments" / "inference_server"
CACHE_ROOT = Path(os.environ.get("PREFECT_ROBOFLOW_CACHE", Path.home() / ".cache" / "prefect-roboflow"))


@pytest.fixture(scope="module")
def two_hundred(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("two_hundred")
    for i in range(200):
        (folder / f"img_{i:03d}.png").write_bytes(make_image(3000 + i, size=(96, 72)))
    return folder


def _save_server(name: str, url: str, **settings: float) -> str:
    InferenceServer(api_url=url, **settings).save(name, overwrite=True)
    return name


def _rows(path: str) -> list[dict]:
    return pq.read_table(path, columns=["image_ref", "status", "error"]).to_pylist()


def _inject_when(proxy: FaultProxy, after: int, *faults: Fault) -> threading.Thread:
    """Inject faults once ``after`` requests have gone by: mid-run, not at the start."""

    def wait_then_inject() -> None:
        deadline = time.monotonic() + 120
        while proxy.count() < after and time.monotonic() < deadline:
            time.sleep(0.02)
        proxy.inject(*faults, path_prefix="/clip/embed_image")

    thread = threading.Thread(target=wait_then_inject, daemon=True)
    thread.start()
    return thread


def test_flow_rides_out_bursts_of_faults(proxy: FaultProxy, two_hundred: Path, tmp_path: Path) -> None:
    server = _save_server("faulty-link", proxy.url, timeout_seconds=2.0, retry_backoff_seconds=0.05)
    faults = [
        *[Fault.status(503)] * 4,
        *[Fault.status(429, headers={"Retry-After": "1"})] * 3,
        *[Fault.reset()] * 3,
        *[Fault.stall(3.0)] * 2,
        *[Fault.truncate()] * 2,
        *[Fault.close()] * 2,
        Fault.status(502),
        Fault.status(504),
    ]
    injector = _inject_when(proxy, 60, *faults)
    result = embed_images(
        str(two_hundred), str(tmp_path / "out"), server=server, batch_size=50, cache_storage=str(tmp_path / "c")
    )
    injector.join(timeout=1)
    rows = _rows(result.embeddings_path)
    assert len(rows) == 200 and len({r["image_ref"] for r in rows}) == 200
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"][:3]
    assert result.retries == len(faults)  # every fault cost exactly one retry
    assert proxy.count("/clip/embed_image") == 200 + len(faults)


def test_flow_fails_clearly_when_the_server_never_comes_back(tmp_path: Path) -> None:
    with FaultProxy("http://127.0.0.1:9") as dead:  # nothing listens on the discard port
        server = _save_server("dead-server", dead.url, retry_backoff_seconds=0.05, retry_budget_seconds=2.0)
        folder = tmp_path / "few"
        folder.mkdir()
        for i in range(6):
            (folder / f"{i}.png").write_bytes(make_image(i))
        state = embed_images(
            str(folder), str(tmp_path / "out"), server=server, cache_storage=str(tmp_path / "c"), return_state=True
        )
    assert state.is_failed()
    assert "6 of 6 images failed" in str(state.message)
    rows = _rows(str(tmp_path / "out" / "embeddings.parquet"))  # written before the run failed
    assert len(rows) == 6 and all(r["status"] == "failed" and "ServerUnavailableError" in r["error"] for r in rows)


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("servers", [1, 2])
def test_a_flow_whose_every_server_refuses_connections_fails_at_once_with_one_clear_line(
    servers: int, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No server has ever answered: a refused connection is retried only for a short grace (a server
    still starting), then the run fails with one line naming the servers, no task is retried, and
    no image becomes a failed row (the images are not at fault). It took 46 s and 239 log lines."""
    urls = [f"http://127.0.0.1:{_closed_port()}" for _ in range(servers)]
    folder = tmp_path / "few"
    folder.mkdir()
    for i in range(6):
        (folder / f"{i}.png").write_bytes(make_image(i))
    examples = [{"image": str(folder / "0.png"), "boxes": [{"x": 160, "y": 120, "w": 80, "h": 80, "cls": "a"}]}]
    calls = [
        lambda out: embed_images(str(folder), out, server=urls, cache_storage=str(tmp_path / "c"), return_state=True),
        lambda out: detect_crop_classify(
            str(folder), examples, ["a", "b"], out, server=urls, cache_storage=str(tmp_path / "c"), return_state=True
        ),
    ]
    for call in calls:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="prefect_roboflow"):
            state = call(str(tmp_path / "out"))
        assert state.is_failed()
        error = state.result(raise_on_failure=False)
        assert isinstance(error, ServerUnreachableError)
        assert all(url in str(error) for url in urls) and "is it running" in str(error)
        assert "\n" not in str(error)
        attempts = [int(m.group(1)) for r in caplog.records if (m := re.search(r"attempt (\d+) on", r.getMessage()))]
        # the grace's backoff (0.25, 0.5, 1, 2 s at least) leaves room for at most 4 retries of a request
        assert max(attempts, default=0) <= 4
        runs = asyncio.run(task_runs_of(state.state_details.flow_run_id, 1))
        assert runs and all(r.run_count <= 1 for r in runs), [(r.name, r.run_count) for r in runs]
        assert not (tmp_path / "out" / "embeddings.parquet").exists() or all(
            r["status"] != "failed" for r in _rows(str(tmp_path / "out" / "embeddings.parquet"))
        )


@pytest.fixture()
def own_server() -> Iterator[tuple[str, str]]:
    """A second real server on its own port, which this test may kill."""
    port = os.environ.get("RELIABILITY_INFERENCE_PORT", "9012")
    env = {**os.environ, "INFERENCE_PORT": port}
    done = subprocess.run(
        [str(SERVER_SCRIPTS / "up")], env=env, stdout=subprocess.PIPE, text=True, timeout=900, check=False
    )
    assert done.returncode == 0
    try:
        yield done.stdout.strip().splitlines()[-1], port
    finally:
        subprocess.run([str(SERVER_SCRIPTS / "down")], env=env, timeout=120, check=False)


def test_flow_survives_the_server_being_killed_and_restarted(
    own_server: tuple[str, str], two_hundred: Path, tmp_path: Path
) -> None:
    url, port = own_server
    pid_file = CACHE_ROOT / "inference-cpu-1.8.3" / f"server-{port}.pid"
    with FaultProxy(url) as proxy:
        server = _save_server(
            "restarting", proxy.url, retry_backoff_seconds=0.2, retry_budget_seconds=300, max_retries=20
        )
        restarted = threading.Event()

        def kill_and_restart() -> None:
            deadline = time.monotonic() + 120
            while proxy.count() < 70 and time.monotonic() < deadline:
                time.sleep(0.02)
            os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
            time.sleep(3)  # requests now fail: connection refused behind the proxy
            env = {**os.environ, "INFERENCE_PORT": port}
            subprocess.run([str(SERVER_SCRIPTS / "up")], env=env, stdout=subprocess.DEVNULL, timeout=600, check=True)
            restarted.set()

        chaos = threading.Thread(target=kill_and_restart, daemon=True)
        chaos.start()
        result = embed_images(
            str(two_hundred), str(tmp_path / "out"), server=server, batch_size=50, cache_storage=str(tmp_path / "c")
        )
        chaos.join(timeout=600)
    assert restarted.is_set()
    rows = _rows(result.embeddings_path)
    assert len(rows) == 200 and len({r["image_ref"] for r in rows}) == 200
    assert all(r["status"] == "ok" for r in rows)
    assert result.retries > 0  # some requests waited out the restart


CRASHING_RUN = textwrap.dedent(
    """
    import sys
    from prefect_roboflow.flows import embed_images
    embed_images(sys.argv[1], sys.argv[2], server=sys.argv[3], batch_size=20, cache_storage=sys.argv[4])
    """
)


def test_killed_flow_resumes_sending_only_the_missing_images(
    proxy: FaultProxy, two_hundred: Path, tmp_path: Path
) -> None:
    proxy.latency = 0.1  # slow enough to kill it halfway
    server = _save_server("slow-link", proxy.url, max_concurrency=2)
    out, cache = tmp_path / "out", tmp_path / "cache"
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    run = subprocess.Popen(
        [sys.executable, "-c", CRASHING_RUN, str(two_hundred), str(out), server, str(cache)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        while proxy.count("/clip/embed_image") < 100 and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.05)
        assert run.poll() is None, "the flow finished before it could be killed"
        os.kill(run.pid, signal.SIGKILL)
    finally:
        run.wait(timeout=30)
    # nothing half-written is visible under the final name
    assert not (out / "embeddings.parquet").exists()
    assert [p.name for p in out.iterdir() if not p.name.startswith(".")] == []
    cached = cached_entries(cache)
    assert 0 < cached < 200

    proxy.latency = 0.0
    proxy.clear()
    result = embed_images(str(two_hundred), str(out), server=server, batch_size=20, cache_storage=str(cache))
    assert proxy.count("/clip/embed_image") == 200 - cached  # only the images without a stored result
    rows = _rows(result.embeddings_path)
    assert len(rows) == 200 and len({r["image_ref"] for r in rows}) == 200 and all(r["status"] == "ok" for r in rows)
    assert not list(out.glob(".embeddings.parquet.*.tmp"))  # the dead run's temp file is gone


def test_two_thousand_images_at_default_concurrency_cause_no_server_errors(proxy: FaultProxy, tmp_path: Path) -> None:
    folder = tmp_path / "load"
    folder.mkdir()
    for i in range(2000):
        (folder / f"{i:04d}.png").write_bytes(make_image(10_000 + i, size=(48, 36)))
    result = embed_images(str(folder), str(tmp_path / "out"), server=proxy.url, cache_storage=str(tmp_path / "c"))
    assert result.succeeded == 2000 and result.failed == 0
    assert proxy.count("/clip/embed_image") == 2000 and result.retries == 0  # no 429, no 5xx, no retry
