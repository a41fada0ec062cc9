"""What the end-to-end tests share: processes, bounded waits, the Prefect REST API, the webhook.

Every process is started in its own process group with its output in a log file, and stopped
by that group (SIGTERM, then SIGKILL). Every wait is bounded; a timeout fails with the tail of
the logs of the processes involved.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import httpx

REPO = Path(__file__).resolve().parents[2]
DEPLOYMENTS = REPO / "deployments"
UI_ARTIFACTS = REPO / "test-artifacts" / "ui"
if str(DEPLOYMENTS) not in sys.path:
    sys.path.insert(0, str(DEPLOYMENTS))

import webhook  # noqa: E402  (deployments/webhook.py)

SECRET = "e2e-" + os.urandom(16).hex()
DEPLOYMENT = "local"  # serve.py's default deployment name
SCHEDULE_SECONDS = 10
# Longer than the SQLite busy timeout (60 s) of `prefect server start`: on a loaded 2-core CI
# machine a write has waited past 30 s for the lock. A slow answer is not a failure; every wait
# stays bounded.
API_TIMEOUT = 120.0
T = TypeVar("T")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env(**extra: str) -> dict[str, str]:
    """This environment without any PREFECT_* setting (profiles, test harness), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


@dataclass
class Process:
    """A subprocess in its own process group, its output in a log file."""

    name: str
    log: Path
    popen: subprocess.Popen[bytes]

    @classmethod
    def start(cls, name: str, cmd: list[str], env: dict[str, str], log: Path, cwd: Path | None = None) -> Process:
        handle = log.open("wb")
        popen = subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        handle.close()
        return cls(name, log, popen)

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.name} ({self.log}) ---\n" + "\n".join(text.splitlines()[-lines:])

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM to the process group, SIGKILL after ``grace`` seconds."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.popen.wait(timeout=wait)
                if sig is signal.SIGTERM:  # the group may still hold children: end them too
                    os.killpg(self.popen.pid, signal.SIGKILL)
                return
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                return


def answers(url: str) -> bool:
    """Whether a GET of ``url`` answers 200 now."""
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_for(check: Callable[[], T | None], timeout: float, what: str, *logs: Process, every: float = 0.5) -> T:
    """Poll ``check`` until it returns something truthy; on timeout fail with the processes' logs."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        dead = [p for p in logs if not p.alive()]
        if dead or time.monotonic() > deadline:
            reason = f"{dead[0].name} exited with {dead[0].popen.returncode}" if dead else f"{timeout:.0f}s passed"
            raise AssertionError(f"gave up waiting for {what}: {reason}\n" + "\n".join(p.tail() for p in logs))
        time.sleep(every)


class RetryingTransport(httpx.HTTPTransport):
    """Retries the answers Prefect's own client retries (429, 502, 503, 408) with backoff.

    The SQLite-backed server answers 503 "database is locked" when two writers collide, which
    a loaded CI machine makes likely; Prefect's clients retry it, so this one does too.
    """

    RETRY = frozenset({408, 429, 502, 503})

    def __init__(self, attempts: int = 6, backoff: float = 0.5) -> None:
        super().__init__()
        self.attempts, self.backoff = attempts, backoff

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        for attempt in range(1, self.attempts):
            if response.status_code not in self.RETRY:
                break
            response.read()
            response.close()
            retry_after = response.headers.get("retry-after", "")
            time.sleep(float(retry_after) if retry_after.isdigit() else self.backoff * 2**attempt)
            response = super().handle_request(request)
        return response


class PrefectApi:
    """Just enough of the Prefect REST API, over plain HTTP."""

    def __init__(self, api_url: str) -> None:
        self.url = api_url
        self.http = httpx.Client(base_url=api_url, timeout=API_TIMEOUT, transport=RetryingTransport())

    def post(self, path: str, body: Any = None) -> Any:
        response = self.http.post(path, json=body if body is not None else {})
        response.raise_for_status()
        return response.json() if response.content else None

    def delete(self, path: str) -> None:
        """DELETE; already gone (404) counts as done."""
        response = self.http.delete(path)
        if response.status_code != 404:
            response.raise_for_status()

    def deployment(self, flow: str, name: str) -> dict[str, Any] | None:
        response = self.http.get(f"/deployments/name/{flow}/{name}")
        return response.json() if response.status_code == 200 else None

    def flow_runs(self, deployment_id: str | None = None, states: list[str] | None = None) -> list[dict[str, Any]]:
        flow_runs: dict[str, Any] = {}
        if deployment_id:
            flow_runs["deployment_id"] = {"any_": [deployment_id]}
        if states:
            flow_runs["state"] = {"type": {"any_": states}}
        return self.post("/flow_runs/filter", {"flow_runs": flow_runs, "sort": "EXPECTED_START_TIME_ASC", "limit": 200})

    def flow_run(self, flow_run_id: str) -> dict[str, Any]:
        return self.http.get(f"/flow_runs/{flow_run_id}").raise_for_status().json()

    def task_runs(self, flow_run_id: str) -> list[dict[str, Any]]:
        return self.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})

    def task_run_names(self, flow_run_id: str, count: int, timeout: float = 60) -> list[str]:
        """The flow run's task run names, sorted, once at least ``count`` are recorded, each in a final
        state: Prefect's server records task runs from their events, which a loaded server may write
        after the flow run has ended (in a CI run, a run's last task run was written 0.1 s after the
        run was Completed), a task run's own name arriving with its states (`support.runs.task_runs_of`)."""

        def recorded() -> list[str] | None:
            runs = self.task_runs(flow_run_id)
            final = all(t.get("state_type") in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for t in runs)
            return sorted(t["name"] for t in runs) if len(runs) >= count and final else None

        return wait_for(recorded, timeout, f"{count} task runs of flow run {flow_run_id}")

    def artifacts(self, flow_run_id: str) -> list[dict[str, Any]]:
        return self.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})

    def events(self, name: str) -> list[dict[str, Any]]:
        page = self.post("/events/filter", {"filter": {"event": {"name": [name]}}, "limit": 50})  # the most it gives
        return page["events"]

    def emit(self, event: dict[str, Any]) -> None:
        """POST /api/events: what a webhook relay would do without the events websocket."""
        response = self.http.post("/events", content=json.dumps([event], default=str))
        assert response.status_code == 204, response.text

    def mark_events(self, name: str = "prefect_roboflow.e2e.marker") -> str:
        """Emit a marker event and wait until it can be read back: events sent before it are stored too."""
        marker = os.urandom(8).hex()
        self.emit(
            {
                "id": str(uuid.uuid4()),
                "occurred": datetime.now(timezone.utc).isoformat(),
                "event": name,
                "resource": {"prefect.resource.id": f"prefect_roboflow.e2e.{marker}"},
            }
        )
        wait_for(
            lambda: any(e["resource"]["prefect.resource.id"].endswith(marker) for e in self.events(name)),
            60,
            "the marker event",
        )
        return marker


@dataclass
class PrefectServer:
    """A running `prefect server start` and its API."""

    url: str
    home: Path
    process: Process
    api: PrefectApi = field(init=False)

    def __post_init__(self) -> None:
        self.api = PrefectApi(f"{self.url}/api")

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for a client process of this server."""
        return base_env(PREFECT_API_URL=self.api.url, PREFECT_HOME=str(self.home), **extra)

    @classmethod
    def start(cls, root: Path, **settings: str) -> PrefectServer:
        """`prefect server start` on a free loopback port with a fresh PREFECT_HOME (SQLite) in
        ``root``, answering ``/api/health``; ``settings`` are extra environment variables."""
        home, port = root / "prefect-home", free_port()
        home.mkdir()
        url = f"http://127.0.0.1:{port}"
        env = base_env(
            PREFECT_HOME=str(home),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_UI_API_URL=f"{url}/api",  # else the UI calls the default port
            **settings,
        )
        cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
        process = Process.start("prefect server", cmd, env, root / "prefect-server.log")
        try:
            wait_for(lambda: answers(f"{url}/api/health"), 180, "prefect server /api/health", process)
        except BaseException:
            process.stop()
            raise
        return cls(url, home, process)


@dataclass
class Served:
    """`deployments/serve.py` running against the e2e server."""

    process: Process
    out: Path
    deployments: dict[str, dict[str, Any]]


@dataclass
class WebhookReceiver:
    """`deployments/webhook.py` on a free loopback port."""

    url: str
    process: Process

    def post(
        self, body: bytes, signature: str | None = None, headers: Mapping[str, str] | None = None
    ) -> httpx.Response:
        """POST ``body`` with ``headers`` (and ``signature`` as ``X-Signature-256``, if given)."""
        sent = {"content-type": "application/json", **(headers or {})}
        if signature is not None:
            sent[webhook.SIGNATURE_HEADER] = signature
        return httpx.post(f"{self.url}/webhooks/images", content=body, headers=sent, timeout=API_TIMEOUT)

    @classmethod
    def start(cls, server: PrefectServer, root: Path, *options: str) -> WebhookReceiver:
        """`deployments/webhook.py` on a free loopback port, emitting to ``server``, with the shared
        secret in its environment, answering ``/health``."""
        port = free_port()
        cmd = [sys.executable, str(DEPLOYMENTS / "webhook.py"), "--port", str(port), *options]
        process = Process.start("webhook.py", cmd, server.env(**{webhook.SECRET_ENV: SECRET}), root / "webhook.log")
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for(lambda: answers(f"{url}/health"), 60, "the webhook receiver", process)
        except BaseException:
            process.stop()
            raise
        return cls(url, process)

    def post_signed(self, payload: dict[str, Any], secret: str = SECRET) -> httpx.Response:
        """POST ``payload`` as a sender does: a new delivery id, the time now, and their signature."""
        body = json.dumps(payload).encode()
        return self.post(body, headers=webhook.signature_headers(body, secret))


@dataclass
class TaskWorker:
    """`deployments/serve.py --task-worker` (the webhook's task path) against the e2e server."""

    process: Process
    out: Path
    state: Path

    @classmethod
    def start(cls, server: PrefectServer, root: Path, out: Path, state: Path, inference_url: str) -> TaskWorker:
        """A task worker writing under ``out``, registered in the journal under ``state``, once it
        has warmed up and subscribed (its log says so); each start logs to a file of its own."""
        starts = len(list(root.glob("task-worker-*.log")))
        cmd = [sys.executable, str(DEPLOYMENTS / "serve.py"), "--task-worker", "--out", str(out), "--state", str(state)]
        env = server.env(INFERENCE_SERVER_URL=inference_url)
        process = Process.start("task worker", cmd, env, root / f"task-worker-{starts + 1}.log", cwd=root)
        try:
            wait_for(lambda: "Subscribing to runs" in process.log.read_text(errors="replace"), 180,
                     "the task worker's subscription", process, server.process)  # fmt: skip
        except BaseException:
            process.stop()
            raise
        return cls(process, out, state)

    def kill(self) -> None:
        """SIGKILL the worker by its PID, as the kernel's OOM killer or a power cut would end it."""
        os.kill(self.process.popen.pid, signal.SIGKILL)
        self.process.popen.wait(timeout=30)


@dataclass
class TriggeredRun:
    """A flow run that a signed webhook request started, and what was sent."""

    event_id: str
    images: list[str]
    flow_run: dict[str, Any]


def wait_for_triggered_run(
    api: PrefectApi, deployment_id: str, event_id: str, timeout: float, *logs: Process
) -> dict[str, Any]:
    """The finished run of a deployment whose out_dir names the event (each event gets its own)."""

    def finished() -> dict[str, Any] | None:
        runs = api.flow_runs(deployment_id, ["COMPLETED", "FAILED", "CRASHED", "CANCELLED"])
        return next((r for r in runs if str(r["parameters"].get("out_dir", "")).endswith(event_id)), None)

    return wait_for(finished, timeout, f"the run triggered by event {event_id}", *logs)
