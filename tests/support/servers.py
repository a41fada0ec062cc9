"""More real inference servers, on ports of their own, started and stopped by the tests.

``deployments/inference_server/up`` with ``INFERENCE_PORT`` starts one more server from the same
venv and placeholder weights (~35 s warm); ``down`` with the same port stops it by the PID in its
pid file. A `ServerProcess` knows whether the tests started it (``owned``): only those are stopped
or killed::

    servers = start_servers(["9002", "9003"])  # reuses one already answering on a port
    ...
    for server in servers:
        server.stop()  # only the ones started here
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

__all__ = ["ServerProcess", "answers", "start_server", "start_servers"]

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "deployments" / "inference_server"
INFERENCE_VERSION = "1.8.3"  # as in deployments/inference_server/up


def answers(url: str) -> bool:
    """Whether ``GET url/info`` answers 200."""
    try:
        return httpx.get(f"{url}/info", timeout=2, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def _cache_root() -> Path:
    root = Path(os.environ.get("PREFECT_ROBOFLOW_CACHE", Path.home() / ".cache" / "prefect-roboflow"))
    return root / f"inference-cpu-{INFERENCE_VERSION}"


@dataclass
class ServerProcess:
    """A real inference server on ``port``; ``owned`` when the tests started it."""

    url: str
    port: str
    owned: bool

    @property
    def pid(self) -> int:
        """The server process's PID, from the pid file `up` wrote."""
        return int((_cache_root() / f"server-{self.port}.pid").read_text().strip())

    def kill(self) -> None:
        """SIGKILL the server process (a crash: no graceful shutdown). Only one the tests started."""
        if not self.owned:
            raise RuntimeError(f"{self.url} was not started by the tests: not killing it")
        os.kill(self.pid, signal.SIGKILL)

    def stop(self) -> None:
        """Stop the server with `down`, if the tests started it (a killed one: `down` cleans up)."""
        if self.owned:
            env = {**os.environ, "INFERENCE_PORT": self.port}
            subprocess.run([str(SCRIPTS / "down")], env=env, timeout=120, check=False)


def start_server(port: str) -> ServerProcess:
    """A real server on 127.0.0.1:``port``: started with `up`, or the one already answering there."""
    url = f"http://127.0.0.1:{port}"
    if answers(url):
        return ServerProcess(url, port, owned=False)
    env = {**os.environ, "INFERENCE_PORT": port}
    done = subprocess.run([str(SCRIPTS / "up")], env=env, stdout=subprocess.PIPE, text=True, timeout=900, check=False)
    if done.returncode != 0 or done.stdout.strip().splitlines()[-1:] != [url]:
        raise RuntimeError(f"deployments/inference_server/up on port {port} failed (see its output above)")
    return ServerProcess(url, port, owned=True)


def start_servers(ports: Sequence[str]) -> list[ServerProcess]:
    """`start_server` for each port, in turn (`up` starts one at a time anyway); if one fails, the
    ones started here are stopped again."""
    started: list[ServerProcess] = []
    try:
        for port in ports:
            started.append(start_server(port))
    except BaseException:
        for server in started:
            server.stop()
        raise
    return started
