"""The flows are async Prefect flows (a run costs Prefect ~0.2 s instead of ~1.1 s): plain sync
code, a coroutine, a running event loop (as in Jupyter), a sync or async parent flow and
`with_options` all call them, with the same run and task names."""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from support.fault_proxy import FaultProxy
from support.images import make_image
from support.runs import task_runs_of

from prefect_roboflow.flows import EmbedImagesResult, embed_images

pytestmark = pytest.mark.server


@pytest.fixture()
def photos(tmp_path: Path) -> str:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        (folder / f"p{i}.png").write_bytes(make_image(1200 + i))
    return str(folder)


#: The batch tasks, and the task that materialises the run's outputs as assets.
NAMES = ["embed-images-assets", "embed[clip ViT-B-16] batch 1/2", "embed[clip ViT-B-16] batch 2/2"]


async def _names(flow_run_id: object, task_runs: int = len(NAMES)) -> tuple[str, list[str]]:
    async with get_client() as client:
        run = await client.read_flow_run(flow_run_id)  # type: ignore[arg-type]
    return run.name, sorted(t.name for t in await task_runs_of(flow_run_id, task_runs))


def test_every_way_of_calling_a_flow(proxy: FaultProxy, photos: str, tmp_path: Path) -> None:
    kwargs = {"server": proxy.url, "cache_storage": str(tmp_path / "cache"), "batch_size": 2}

    # plain sync code: the result, not an awaitable
    state = embed_images(photos, str(tmp_path / "sync"), return_state=True, **kwargs)
    assert state.is_completed() and isinstance(state.result(), EmbedImagesResult)
    assert asyncio.run(_names(state.state_details.flow_run_id)) == (
        "embed-images[clip]",
        NAMES,
    )

    # a coroutine, or a running loop as in a Jupyter cell: an awaitable to await
    async def in_a_loop() -> EmbedImagesResult:
        called = embed_images(photos, str(tmp_path / "async"), **kwargs)
        assert inspect.isawaitable(called)
        return await called  # type: ignore[misc]

    assert asyncio.run(in_a_loop()).succeeded == 3

    # inside a sync parent flow, and an async one: a subflow run each
    @flow
    def sync_parent() -> int:
        return embed_images(photos, str(tmp_path / "sub-sync"), **kwargs).succeeded

    @flow
    async def async_parent() -> int:
        return (await embed_images(photos, str(tmp_path / "sub-async"), **kwargs)).succeeded  # type: ignore[misc]

    assert sync_parent() == 3 and asyncio.run(async_parent()) == 3

    # with_options keeps the plain call
    renamed = embed_images.with_options(flow_run_name="renamed-run")
    again = renamed(photos, str(tmp_path / "renamed"), return_state=True, **kwargs)
    assert asyncio.run(_names(again.state_details.flow_run_id))[0] == "renamed-run"
    assert proxy.count("/clip/embed_image") == 3  # one request per image, whatever the call: the cache did the rest
