"""Flow outputs as Prefect assets, read back from the real Prefect API of the test harness: the
table and the index of an `embed_images` run are materialised with their metadata and the image
folder as upstream, again on a fully cached rerun, and the summary artifact names them."""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import pyarrow.parquet as pq
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.events.filters import EventFilter, EventNameFilter
from prefect.events.worker import EventsWorker
from support.fault_proxy import FaultProxy
from support.images import make_image

from prefect_roboflow.flows import embed_images, find_duplicates

pytestmark = pytest.mark.server

MATERIALIZED = "prefect.asset.materialization.succeeded"
REFERENCED = "prefect.asset.referenced"


def _events(name: str, resource_id: str, expected: int) -> list[Any]:
    """The events of this name on this resource, once the API holds ``expected`` (they arrive asynchronously)."""
    EventsWorker.drain_all()

    async def read() -> list[Any]:
        async with get_client() as client:
            page = await client.read_events(filter=EventFilter(event=EventNameFilter(name=[name])), limit=50)
        return [e for e in page.events if e.resource.id == resource_id]

    found: list[Any] = []
    for _ in range(40):
        found = asyncio.run(read())
        if len(found) >= expected:
            break
        time.sleep(0.5)
    return found


def _summary(flow_run_id: UUID) -> str:
    async def read() -> list[Any]:
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
            )

    return next(a.data for a in asyncio.run(read()) if a.key == "embed-images-summary")


def test_outputs_are_assets_even_on_a_cached_rerun(proxy: FaultProxy, tmp_path: Path) -> None:
    photos = tmp_path / "camera 1"  # a space: not allowed in an asset key
    photos.mkdir()
    for i in range(6):
        (photos / f"{i}.png").write_bytes(make_image(400 + i))
    (photos / "broken.png").write_bytes(b"")
    out, index = tmp_path / "out", tmp_path / "index"
    kwargs: dict[str, Any] = {"server": proxy.url, "cache_storage": str(tmp_path / "cache"), "index_path": str(index)}
    first = embed_images(str(photos), str(out), return_state=True, **kwargs)
    sent = proxy.count()
    second = embed_images(str(photos), str(out), return_state=True, **kwargs)
    assert proxy.count() == sent  # the rerun came wholly from the cache

    table_key = f"file://{tmp_path}/out/embeddings.parquet"
    index_key = f"file://{tmp_path}/index"
    # "camera 1" has a space: replaced, and the folder's hash appended (its key is its own)
    source_key = f"file://{tmp_path}/camera_1~" + hashlib.sha256(f"file://{photos}".encode()).hexdigest()[:12]
    tables = _events(MATERIALIZED, table_key, expected=2)
    assert len(tables) == 2  # one per run, the cached one included
    latest = max(tables, key=lambda e: e.occurred)
    assert latest.payload["rows"] == 7 and latest.payload["failed"] == 1 and latest.payload["table_rows"] == 7
    assert (latest.payload["model"], latest.payload["flow"]) == ("clip", "embed-images")
    assert latest.payload["version"] and latest.payload["schema"]["embedding"].startswith("list<")
    assert {(r.id, r.role) for r in latest.related} >= {(source_key, "asset")}
    indexes = _events(MATERIALIZED, index_key, expected=1)  # the first run added 6 rows; the rerun none
    assert len(indexes) == 1 and indexes[0].payload["images"] == 7
    assert len(_events(REFERENCED, source_key, expected=2)) >= 2

    assert table_key in _summary(first.state_details.flow_run_id)
    assert table_key in _summary(second.state_details.flow_run_id)

    # find_duplicates: its table, with the embeddings table as upstream
    found = find_duplicates(str(out / "embeddings.parquet"), str(tmp_path / "dups"))
    (duplicates,) = _events(MATERIALIZED, f"file://{tmp_path}/dups/duplicates.parquet", expected=1)
    written = pq.read_metadata(found.duplicates_path).num_rows
    assert duplicates.payload["flow"] == "find-duplicates" and duplicates.payload["table_rows"] == written
    assert {(r.id, r.role) for r in duplicates.related} >= {(table_key, "asset")}
