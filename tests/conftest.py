"""Shared fixtures: the real inference server, a fault proxy in front of it, Prefect, images.

The real server is started once per session by ``deployments/inference_server/up`` (or reused
when ``INFERENCE_SERVER_URL`` points at a running one) and stopped at the end if we started it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import hypothesis
import pytest

from prefect_roboflow.blocks import InferenceServer
from prefect_roboflow.blocks._http import close_engines

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from support.fault_proxy import FaultProxy  # noqa: E402
from support.images import make_image  # noqa: E402

# No per-example time limit in the property tests: a wall-clock deadline is a timed assertion, and
# on a shared 2-core machine a first call that imports supervision takes seconds.
hypothesis.settings.register_profile("no-deadline", deadline=None)
hypothesis.settings.load_profile("no-deadline")

SERVER_SCRIPTS = REPO / "deployments" / "inference_server"


@pytest.fixture(scope="session", autouse=True)
def prefect_harness() -> Iterator[None]:
    """A throwaway Prefect API for the whole session (its start-up takes ~25 s on 2 cores)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/info", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="session")
def inference_url() -> Iterator[str]:
    """URL of a real Roboflow Inference server with CLIP, PE and OWLv2 loaded."""
    url = os.environ.get("INFERENCE_SERVER_URL")
    if url:
        assert _answers(url), f"INFERENCE_SERVER_URL={url} does not answer GET /info"
        yield url.rstrip("/")
        return
    port = os.environ.get("INFERENCE_PORT", "9001")
    url = f"http://127.0.0.1:{port}"
    already_running = _answers(url)
    env = {**os.environ, "INFERENCE_PORT": port}
    done = subprocess.run(
        [str(SERVER_SCRIPTS / "up")], env=env, stdout=subprocess.PIPE, text=True, timeout=1800, check=False
    )
    assert done.returncode == 0, "deployments/inference_server/up failed (see its output above)"
    assert done.stdout.strip().splitlines()[-1] == url
    yield url
    close_engines()
    if not already_running and not os.environ.get("PREFECT_ROBOFLOW_KEEP_SERVER"):
        subprocess.run([str(SERVER_SCRIPTS / "down")], env=env, timeout=60, check=False)


@pytest.fixture(scope="session")
def server(inference_url: str) -> InferenceServer:
    """An `InferenceServer` block for the real server."""
    return InferenceServer(api_url=inference_url)


@pytest.fixture()
def proxy(inference_url: str) -> Iterator[FaultProxy]:
    """A fault-injecting loopback proxy in front of the real server, counting requests."""
    with FaultProxy(inference_url) as running:
        yield running


@pytest.fixture()
def proxied(proxy: FaultProxy) -> InferenceServer:
    """A server block that goes through the proxy, with short retry delays."""
    return InferenceServer(
        api_url=proxy.url, timeout_seconds=60.0, retry_backoff_seconds=0.05, max_retries=4, retry_budget_seconds=60
    )


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 distinct 320×240 images on disk: 12 PNG, 12 JPEG."""
    folder = tmp_path_factory.mktemp("images")
    for i in range(24):
        fmt = "PNG" if i % 2 == 0 else "JPEG"
        (folder / f"img_{i:02d}.{fmt.lower().replace('jpeg', 'jpg')}").write_bytes(make_image(i, fmt=fmt))
    return folder


@pytest.fixture(scope="session")
def image_paths(image_dir: Path) -> list[Path]:
    """The session's image files, sorted."""
    return sorted(image_dir.iterdir())
