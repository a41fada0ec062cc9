"""A throw-away PostgreSQL cluster on loopback for tests (Prefect's server database in the e2e tests).

It uses Debian's ``postgresql`` binaries (``/usr/lib/postgresql/<version>/bin``, or ``initdb`` on
PATH) and installs nothing: without them it fails with a message saying what to install. ``initdb``
refuses to run as root, so as root the cluster belongs to an unprivileged user (``postgres`` if it
exists, else ``nobody``). Trust authentication, TCP on 127.0.0.1 only, socket in the data folder;
`PostgresCluster.stop` stops that cluster's postmaster (``pg_ctl stop``, which signals the PID in its
``postmaster.pid``) and deletes the folder.

Use::

    from support.postgres import postgres, postgres_url  # noqa: F401  (session fixtures)

    def test_prefect_on_postgres(postgres_url):
        env = {"PREFECT_API_DATABASE_CONNECTION_URL": postgres_url}
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["PostgresCluster", "find_bindir", "postgres", "postgres_cluster", "postgres_url", "running"]

USER = "prefect"
DATABASE = "prefect"
_MISSING = (
    "PostgreSQL server binaries (initdb, pg_ctl) not found: install Debian's postgresql package "
    "(apt-get install -y postgresql), or put its bin folder on PATH"
)


def find_bindir() -> Path:
    """The folder holding ``initdb`` and ``pg_ctl`` (the newest Debian version first)."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    for folder in candidates:
        if (Path(folder) / "initdb").exists() and (Path(folder) / "pg_ctl").exists():
            return Path(folder)
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(os.path.realpath(initdb)).parent
    raise RuntimeError(_MISSING)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _owner() -> pwd.struct_passwd | None:
    """The unprivileged user to run the cluster as when we are root; None when we are not root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root and no unprivileged user (postgres, nobody) to own the cluster")


@dataclass
class PostgresCluster:
    """A running cluster with a database ``prefect`` owned by user ``prefect`` (trust auth)."""

    bindir: Path
    data: Path
    port: int
    owner: pwd.struct_passwd | None

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the ``prefect`` database, for ``PREFECT_API_DATABASE_CONNECTION_URL``."""
        return f"postgresql+asyncpg://{USER}@127.0.0.1:{self.port}/{DATABASE}"

    @property
    def dsn(self) -> str:
        """libpq / asyncpg DSN of the ``prefect`` database."""
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{DATABASE}"

    def _run(self, *args: str, timeout: float = 60) -> None:
        user = ["setpriv", f"--reuid={self.owner.pw_uid}", f"--regid={self.owner.pw_gid}", "--clear-groups"]
        command = [*(user if self.owner else []), *args]
        done = subprocess.run(command, cwd=self.data, capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            output = (done.stdout + done.stderr)[-3000:]
            raise RuntimeError(f"{Path(args[0]).name} failed with {done.returncode}: {output}")

    @classmethod
    def start(cls) -> PostgresCluster:
        """initdb a new cluster in a temp folder, start it on a free port, create the database."""
        bindir, owner = find_bindir(), _owner()
        data = Path(tempfile.mkdtemp(prefix="prefect-roboflow-pg-"))
        if owner:
            os.chown(data, owner.pw_uid, owner.pw_gid)
        cluster = cls(bindir, data, _free_port(), owner)
        try:
            cluster._run(str(bindir / "initdb"), "-D", str(data), "-U", USER, "--auth=trust", "-E", "UTF8", timeout=120)
            options = f"-k {data} -h 127.0.0.1 -p {cluster.port} -c fsync=off"
            log = str(data / "server.log")
            cluster._run(str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", log, "-w", "-t", "60", "start")
            cluster._run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(cluster.port), "-U", USER, DATABASE)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    @property
    def pid(self) -> int | None:
        """The postmaster's PID, while it runs."""
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (FileNotFoundError, IndexError, ValueError):
            return None

    def stop(self) -> None:
        """Stop this cluster (fast shutdown), wait until its postmaster has exited, delete its folder."""
        pid = self.pid
        if pid is not None:
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")
            # pg_ctl returns once the PID file is gone, a moment before the process itself
            deadline = time.monotonic() + 30
            while running(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        shutil.rmtree(self.data, ignore_errors=True)


def running(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


@contextlib.contextmanager
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A running cluster for the ``with`` block, stopped and deleted after it."""
    cluster = PostgresCluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A throw-away cluster for the session."""
    with postgres_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def postgres_url(postgres: PostgresCluster) -> str:
    """``postgresql+asyncpg://`` URL of the session cluster's ``prefect`` database."""
    return postgres.url
