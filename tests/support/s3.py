"""An S3-compatible server for tests: moto's standalone server on loopback, started and stopped here.

``moto_server`` keeps everything in memory and dies with its process. `MotoServer.start` runs it on a
free 127.0.0.1 port and waits until ``GET /moto-api/`` answers; `MotoServer.stop` ends that process
only, by its PID. The ``s3_server`` fixture holds one for the session; the ``s3`` fixture points the
standard AWS configuration at it for one test (endpoint, dummy keys, region; no ``~/.aws`` files,
no instance metadata) and gives a fresh bucket.

Use from a test module (or list ``support.s3`` in ``pytest_plugins`` of the root conftest)::

    from support.s3 import s3, s3_server  # noqa: F401

    def test_listing(s3):
        s3.put("photos/a.jpg", jpeg_bytes)
        assert list(iter_refs(f"s3://{s3.bucket}/photos/")) == [f"s3://{s3.bucket}/photos/a.jpg"]
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

__all__ = ["ACCESS_KEY", "REGION", "SECRET_KEY", "MotoServer", "MotoBucket", "aws_env", "s3", "s3_server"]

ACCESS_KEY = "testing-access-key"
SECRET_KEY = "testing-secret-key"
REGION = "us-east-1"
_START_TIMEOUT = 60.0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class MotoServer:
    """A running ``moto_server`` process on loopback."""

    process: subprocess.Popen[bytes]
    endpoint: str
    log: Path

    @classmethod
    def start(cls, log_dir: Path) -> MotoServer:
        """Start ``moto_server`` (its conditional writes atomic: `support.moto_atomic`) on a free
        port and wait until it answers (at most a minute)."""
        if not Path(sys.executable).with_name("moto_server").exists():
            raise RuntimeError("moto_server is missing: install the dev extra (moto[server])")
        port = free_port()
        log = log_dir / f"moto-{port}.log"
        script = Path(__file__).with_name("moto_atomic.py")
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, str(script), "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT
            )
        server = cls(process, f"http://127.0.0.1:{port}", log)
        server._wait_ready()
        return server

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.process.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.endpoint}/moto-api/", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto_server did not answer within {_START_TIMEOUT:.0f} s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        """End the server process this object started (by its PID), and wait for it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def aws_env(endpoint: str, tmp: Path) -> dict[str, str]:
    """The standard AWS configuration for the test server, isolated from the machine's own."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_CONFIG_FILE": str(tmp / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def saved_bucket_block(
    endpoint: str, bucket: str, *, folder: str = "", secret: str = SECRET_KEY, name: str | None = None
) -> Any:
    """A prefect-aws ``S3Bucket`` block on the test server that carries its own credentials and
    endpoint (no AWS environment needed), saved to the current Prefect API under ``name`` (or a new
    name: ``block._block_document_name``)."""
    from prefect_aws import AwsCredentials, S3Bucket

    credentials = AwsCredentials(
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=secret,
        region_name=REGION,
        aws_client_parameters={"endpoint_url": endpoint},
    )
    block = S3Bucket(bucket_name=bucket, credentials=credentials, bucket_folder=folder)
    block.save(name or f"bucket-{secrets.token_hex(4)}", overwrite=True)
    return block


_UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_ENDPOINT_URL_S3")


@dataclass
class MotoBucket:
    """A bucket on the test server, with a boto3 client that talks to it."""

    endpoint: str
    bucket: str
    client: Any
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """``s3://<bucket>/``."""
        return f"s3://{self.bucket}/"

    def put(self, key: str, data: bytes) -> str:
        """Upload one object; returns its ``s3://`` URL."""
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)
        return f"s3://{self.bucket}/{key}"

    def put_many(self, objects: Iterable[tuple[str, bytes]]) -> None:
        """Upload objects concurrently (8 at a time)."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda item: self.put(*item), objects))

    def get(self, key: str) -> bytes:
        """One object's bytes."""
        return bytes(self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read())

    def delete(self, key: str) -> None:
        """Delete one object."""
        self.client.delete_object(Bucket=self.bucket, Key=key)

    def keys(self, prefix: str = "") -> list[str]:
        """Every key under ``prefix`` (for assertions on small buckets)."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", ())]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """One moto S3 server for the session, stopped at the end."""
    server = MotoServer.start(tmp_path_factory.mktemp("moto"))
    yield server
    server.stop()


@pytest.fixture()
def s3(s3_server: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> MotoBucket:
    """A fresh bucket, with the test's AWS environment pointed at the server."""
    import boto3

    env = aws_env(s3_server.endpoint, tmp_path)
    for name in _UNSET:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    client = boto3.session.Session().client("s3", endpoint_url=s3_server.endpoint, region_name=REGION)
    bucket = f"test-{secrets.token_hex(6)}"
    client.create_bucket(Bucket=bucket)
    assert os.environ["AWS_ENDPOINT_URL"] == s3_server.endpoint
    return MotoBucket(s3_server.endpoint, bucket, client, env)
