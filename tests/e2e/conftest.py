"""End-to-end fixtures: a real `prefect server start`, `serve.py`, the webhook receiver.

All on 127.0.0.1 with a temporary PREFECT_HOME, started once per session and stopped at its end
(helpers in ``_e2e.py``). These tests talk to their own Prefect server, so the session-wide test
harness of ``tests/conftest.py`` is replaced by a no-op here (it would cost ~25 s, unused).
"""

from __future__ import annotations

import sys
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

# _e2e.py and _browser.py here; webhook.py and serve.py in deployments/
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "deployments"))

from _e2e import (
    DEPLOYMENT,
    DEPLOYMENTS,
    SCHEDULE_SECONDS,
    PrefectServer,
    Process,
    Served,
    TriggeredRun,
    WebhookReceiver,
    wait_for,
    wait_for_triggered_run,
)
from support.images import make_image


@pytest.fixture(scope="session", autouse=True)
def prefect_harness() -> Iterator[None]:
    """Replaces the session's ephemeral test harness: these tests use their own server."""
    yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failing test's report carries the Prefect server's log: a slow or failing API shows there."""
    report = yield
    server = getattr(item, "funcargs", {}).get("prefect_server")
    if report.failed and isinstance(server, PrefectServer):
        report.sections.append(("prefect server log", server.process.tail(60)))
    return report


@pytest.fixture(autouse=True)
def fresh_event_workers() -> Iterator[None]:
    """Stop Prefect's in-process event and log workers after each test.

    They are process-wide singletons bound to the API URL in force when first used; a test
    that emits under temporary settings (another server, or none) would otherwise leave them
    pointing there, and later tests' task runs and events would silently go nowhere.
    """
    yield
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    EventsWorker.drain_all(timeout=10)
    APILogWorker.drain_all(timeout=10)


@pytest.fixture(scope="session")
def e2e_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Logs, PREFECT_HOME, images and outputs of the end-to-end session."""
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def prefect_server(e2e_root: Path) -> Iterator[PrefectServer]:
    """`prefect server start` on a free loopback port with a fresh PREFECT_HOME (SQLite)."""
    server = PrefectServer.start(
        e2e_root,
        PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL="0.5",
        PREFECT_LOGGING_LEVEL="WARNING",
    )
    try:
        yield server
    finally:
        server.process.stop()


@pytest.fixture(scope="session")
def e2e_images(e2e_root: Path) -> Path:
    """Four small distinct images (the folder the scheduled deployment embeds)."""
    folder = e2e_root / "images"
    folder.mkdir()
    for i in range(4):
        (folder / f"photo_{i}.png").write_bytes(make_image(4000 + i))
    return folder


@pytest.fixture(scope="session")
def served(prefect_server: PrefectServer, inference_url: str, e2e_images: Path, e2e_root: Path) -> Iterator[Served]:
    """All four flows served from one process, embed-images every few seconds, polling every 2 s."""
    out = e2e_root / "out"
    cmd = [sys.executable, str(DEPLOYMENTS / "serve.py"), "--interval", str(SCHEDULE_SECONDS)]
    env = prefect_server.env(
        PREFECT_RUNNER_POLL_FREQUENCY="2",
        IMAGES_DIR=str(e2e_images),
        OUT_DIR=str(out),
        INFERENCE_SERVER_URL=inference_url,
    )
    process = Process.start("serve.py", cmd, env, e2e_root / "serve.log", cwd=e2e_root)
    flows = ("embed-images", "detect-crop-classify", "classify-images", "search-images")

    def registered() -> dict[str, dict[str, Any]] | None:
        found = {flow: prefect_server.api.deployment(flow, DEPLOYMENT) for flow in flows}
        return found if all(found.values()) else None  # type: ignore[return-value]

    try:
        found = wait_for(registered, 120, "serve.py's four deployments", process, prefect_server.process)
        yield Served(process, out, found)
    finally:
        process.stop(grace=30)


@pytest.fixture(scope="session")
def first_scheduled_run(served: Served, prefect_server: PrefectServer) -> dict[str, Any]:
    """The first run the embed-images interval schedule produced, completed; the schedule is then paused
    (so it does not keep the 2 cores busy during the other tests)."""
    api, deployment = prefect_server.api, served.deployments["embed-images"]

    def completed() -> dict[str, Any] | None:
        runs = api.flow_runs(deployment["id"], ["COMPLETED", "FAILED", "CRASHED"])
        return next((r for r in runs if (r.get("created_by") or {}).get("type") == "SCHEDULE"), None)

    try:
        run = wait_for(completed, 150, "a run from the embed-images schedule", served.process, prefect_server.process)
    except AssertionError as exc:
        if "bulk_dml" in prefect_server.process.log.read_text(errors="replace"):
            raise AssertionError(
                "the Prefect server's scheduler fails with SQLAlchemy 2.1 (prefect 3.8.8 needs sqlalchemy<2.1)"
            ) from exc
        raise
    for schedule in deployment["schedules"]:
        path = f"/deployments/{deployment['id']}/schedules/{schedule['id']}"
        api.http.patch(path, json={"active": False}).raise_for_status()  # else later runs race the tests
    return run


@pytest.fixture(scope="session")
def webhook_receiver(prefect_server: PrefectServer, e2e_root: Path) -> Iterator[WebhookReceiver]:
    """The webhook receiver, with the shared secret in its environment and a 64 KiB body limit."""
    receiver = WebhookReceiver.start(prefect_server, e2e_root, "--max-bytes", str(64 * 1024))
    try:
        yield receiver
    finally:
        receiver.process.stop()


@pytest.fixture(scope="session")
def embed_webhook_run(
    served: Served,
    first_scheduled_run: dict[str, Any],
    webhook_receiver: WebhookReceiver,
    prefect_server: PrefectServer,
    e2e_root: Path,
) -> TriggeredRun:
    """A signed POST of five new images for embed_images (2 per batch), and the run it started."""
    folder = e2e_root / "arrived"
    folder.mkdir()
    images = []
    for i in range(5):
        path = folder / f"arrived_{i}.png"
        path.write_bytes(make_image(5000 + i))
        images.append(str(path))
    response = webhook_receiver.post_signed({"images": images, "flow": "embed_images", "parameters": {"batch_size": 2}})
    assert response.status_code == 202, response.text
    event_id = response.json()["event_id"]
    run = wait_for_triggered_run(
        prefect_server.api,
        served.deployments["embed-images"]["id"],
        event_id,
        180,
        served.process,
        webhook_receiver.process,
        prefect_server.process,
    )
    return TriggeredRun(event_id, images, run)
