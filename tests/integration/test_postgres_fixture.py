"""The throw-away PostgreSQL fixture: a real cluster on loopback that asyncpg and Prefect's server use."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import httpx
import pytest
from support.postgres import PostgresCluster, postgres, postgres_cluster, running  # noqa: F401
from support.s3 import free_port

pytestmark = pytest.mark.slow


async def test_cluster_serves_the_prefect_database(postgres: PostgresCluster) -> None:  # noqa: F811
    # given a cluster from the fixture
    assert postgres.url == f"postgresql+asyncpg://prefect@127.0.0.1:{postgres.port}/prefect"
    # when asyncpg connects to its database and writes to it
    connection = await asyncpg.connect(postgres.dsn, timeout=30)
    try:
        await connection.execute("create table probe (n int); insert into probe values (41), (1)")
        total = await connection.fetchval("select sum(n) from probe")
        name = await connection.fetchval("select current_database()")
    finally:
        await connection.close()
    # then
    assert (name, total) == ("prefect", 42)


def test_cluster_stops_and_leaves_nothing() -> None:
    # given a second cluster, started and stopped by the context manager
    with postgres_cluster() as cluster:
        pid = cluster.pid
        assert pid is not None and running(pid)
    # then its postmaster is gone and its folder deleted
    assert not running(pid)
    assert not cluster.data.exists()


def test_prefect_server_runs_on_the_cluster(postgres: PostgresCluster, tmp_path: Path) -> None:  # noqa: F811
    # given a Prefect server pointed at the cluster's database
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_DATABASE_CONNECTION_URL": postgres.url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    prefect = Path(sys.executable).with_name("prefect")
    log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen(
        [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-services"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        # when it has started (at most three minutes on two busy cores)
        healthy = _wait_healthy(f"http://127.0.0.1:{port}/api/health", server, timeout=180)
        # then it answers, and it created its tables in PostgreSQL
        assert healthy, (tmp_path / "server.log").read_text()[-3000:]
        flows = httpx.post(f"http://127.0.0.1:{port}/api/flows/filter", json={}, timeout=30)
        assert flows.status_code == 200, flows.text
        assert asyncio.run(_has_table(postgres.dsn, "flow_run"))
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=30)
        log.close()


async def _has_table(dsn: str, table: str) -> bool:
    connection = await asyncpg.connect(dsn, timeout=30)
    try:
        query = "select count(*) from information_schema.tables where table_name = $1"
        return bool(await connection.fetchval(query, table))
    finally:
        await connection.close()


def _wait_healthy(url: str, server: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False
