"""Secret hygiene: run every flow (and the error paths) with a sentinel API key, then look for it
everywhere it must not be — logs, exceptions, the Prefect database, results and cache keys,
artifacts, events, output files, and the URLs sent to the server."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL, PREFECT_HOME
from pydantic import SecretStr
from support.fault_proxy import Fault, FaultProxy
from support.images import make_image, make_scene

from prefect_roboflow.blocks import Box, Clip, InferenceError, InferenceServer, OwlV2, ReferenceExample
from prefect_roboflow.flows import classify_images, detect_crop_classify, embed_images, search_images
from prefect_roboflow.flows.demo import example_spec

pytestmark = pytest.mark.server

SENTINEL = "rf-SENTINEL-7f3a9c1e5b2d4680"


def _files_containing(root: Path, needle: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


async def _api_text() -> str:
    """Everything the Prefect API holds about recent runs: flow runs, task runs, artifacts, logs, events."""
    async with get_client() as client:
        parts: list[Any] = [
            await client.read_flow_runs(limit=200),
            await client.read_task_runs(limit=200),
            await client.read_artifacts(limit=200),
            await client.read_logs(limit=200),
            (await client.read_events(limit=50)).events,
        ]
    return "\n".join(item.model_dump_json() for part in parts for item in part)


def test_the_api_key_appears_nowhere_it_must_not(
    proxy: FaultProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    InferenceServer(api_url=proxy.url, api_key=SecretStr(SENTINEL), retry_backoff_seconds=0.05).save(
        "keyed-server", overwrite=True
    )
    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):
        (images / f"{i}.png").write_bytes(make_scene(i) if i % 2 else make_image(i))
    (images / "broken.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 64 + b"IEND\xaeB`\x82"
    )  # the server refuses it
    out, cache = tmp_path / "out", tmp_path / "cache"
    examples, labels = example_spec()
    common = {"server": "keyed-server", "cache_storage": str(cache)}

    # every flow, including rows the server fails and a retried 503
    proxy.inject(Fault.status(503), path_prefix="/clip/embed_image")
    embedded = embed_images(str(images), str(out / "embed"), **common)
    classified = classify_images(str(images), labels, str(out / "classify"), model="perception_encoder", **common)
    detect_crop_classify(str(images), examples, labels, str(out / "dcc"), confidence=0.5, **common)
    search_images("a photo of an apple", embedded.embeddings_path, server="keyed-server")
    assert embedded.failed == 1 and classified.failed == 1

    # and the errors a user sees
    errors: list[BaseException] = []
    server = InferenceServer.load("keyed-server")
    for call in (
        lambda: Clip(server=server, version="ViT-Missing").embed_texts(["a"]),
        lambda: Clip(server=server).embed_texts(["word " * 80]),
        lambda: OwlV2(server=server).detect(
            b"", [ReferenceExample(image=make_image(1), boxes=[Box(x=5, y=5, w=4, h=4, cls="a")])]
        ),
    ):
        with pytest.raises(InferenceError) as caught:
            call()
        errors.append(caught.value)

    # the key did travel, so the checks below mean something: in a header and the body only
    assert proxy.count() > 0
    for request in proxy.requests:
        assert request.headers.get("authorization") == f"Bearer {SENTINEL}"
        assert SENTINEL not in request.path and SENTINEL not in request.query
    assert any(SENTINEL.encode() in r.body for r in proxy.requests)

    captured = capfd.readouterr()
    places = {
        "log records": caplog.text,
        "stdout": captured.out,
        "stderr": captured.err,
        "exceptions": "\n".join(f"{e!s} {e!r} {e.__cause__!r}" for e in errors),
        "block repr": repr(server) + str(server.model_dump()) + server.model_dump_json(),
        "prefect api": asyncio.run(_api_text()),
    }
    for place, text in places.items():
        assert SENTINEL not in text, f"API key found in {place}"
    # files: outputs, the content cache and task results, the Prefect database and home
    needle = SENTINEL.encode()
    assert _files_containing(out, needle) == []
    assert _files_containing(cache, needle) == []
    database = Path(str(PREFECT_API_DATABASE_CONNECTION_URL.value()).split("///", 1)[-1])
    assert database.is_file()
    for db_file in database.parent.glob(f"{database.name}*"):  # the database and its WAL/journal
        assert needle not in db_file.read_bytes(), f"API key found in {db_file}"
    assert _files_containing(Path(str(PREFECT_HOME.value())), needle) == []
