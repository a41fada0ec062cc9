"""A fanned-out job lists its source once, and each shard's schema is the job's.

The parent run cuts its source into manifests as it lists it. Whether the job has a video decides
every shard's schema (the video columns, or none), so a shard of a job that may have one waits
until that is known: from the first manifest that names a video, or the listing's end. The shard
runs are replaced by a recorder here (the whole fan-out on a work pool is in
``tests/e2e/test_scale_out_e2e.py``); the listing is the real one, counted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow as pa
import pytest
from prefect.states import Completed

from prefect_roboflow.flows._run import fanout
from prefect_roboflow.flows._run.totals import RunTotals

TABLES = {"embeddings": pa.schema([("image_ref", pa.string())])}
VIDEO_TABLES = {"embeddings": pa.schema([("image_ref", pa.string()), ("frame_index", pa.int64())])}


class Recorded:
    """The listings of the source and the shard runs started, with how many references had been
    listed when each started."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.listings = 0
        self.listed = 0
        self.started: list[tuple[int, list[str], bool, Any, int]] = []
        real = fanout.iter_image_refs

        def counted(images: Any) -> Iterator[str]:
            self.listings += 1
            for ref in real(images):
                self.listed += 1
                yield ref

        async def run(job: Any, shard: fanout.Shard, images: int) -> Any:
            self.started.append((shard.index, shard.refs(), shard.videos, job.tables, self.listed))
            shard.save(job.out, RunTotals("embed_images"))
            return fanout._Outcome(shard, SimpleNamespace(state=Completed(), name=shard.name), 1, images)

        async def deployment(plan: fanout.FanOut) -> str:
            return "a-deployment"

        monkeypatch.setattr(fanout, "iter_image_refs", counted)
        monkeypatch.setattr(fanout, "_run", run)
        monkeypatch.setattr(fanout, "_deployment", deployment)
        monkeypatch.setattr(fanout, "this_run", SimpleNamespace(parameters={"images": None, "out_dir": "x"}))

    def fan_out(self, images: Any, out: Path, video_tables: dict[str, pa.Schema] | None) -> fanout.FannedOut:
        plan = fanout.FanOut(shard_size=3)
        return asyncio.run(fanout.fan_out("embed_images", images, str(out), plan, TABLES, video_tables=video_tables))


@pytest.fixture()
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(10):
        (folder / f"photo_{i:02d}.jpg").write_bytes(b"not read here")
    return folder


def test_a_job_without_a_video_lists_once_and_its_shards_wait_for_the_listing_s_end(
    monkeypatch: pytest.MonkeyPatch, photos: Path, tmp_path: Path
) -> None:
    recorded = Recorded(monkeypatch)
    fanned = recorded.fan_out(str(photos), tmp_path / "out", VIDEO_TABLES)
    assert recorded.listings == 1 and recorded.listed == 10
    assert [len(refs) for _, refs, *_ in recorded.started] == [3, 3, 3, 1]
    assert sorted(ref for _, refs, *_ in recorded.started for ref in refs) == sorted(str(p) for p in photos.iterdir())
    assert all(not videos and tables is TABLES for _, _, videos, tables, _ in recorded.started)
    assert all(listed == 10 for *_, listed in recorded.started)  # none started before the schema was known
    assert len(fanned.parts("embeddings")) == 4


def test_a_job_with_a_video_starts_its_shards_once_a_manifest_names_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    refs = [f"/data/photo_{i}.jpg" for i in range(4)] + ["/data/clip.MP4"] + [f"/data/late_{i}.jpg" for i in range(7)]
    recorded = Recorded(monkeypatch)
    recorded.fan_out(refs, tmp_path / "out", VIDEO_TABLES)
    assert recorded.listings == 1
    assert [refs for _, refs, *_ in recorded.started] == [refs[i : i + 3] for i in range(0, 12, 3)]
    assert all(videos and tables is VIDEO_TABLES for _, _, videos, tables, _ in recorded.started)
    # the first two were started once the second manifest (the video's) was written, before the
    # listing's end (the next chunk may be listed before they run, not the one after: <= 9 of 12)
    assert max(listed for *_, listed in recorded.started[:2]) <= 9


def test_a_job_that_cannot_have_a_video_starts_each_shard_as_its_manifest_is_written(
    monkeypatch: pytest.MonkeyPatch, photos: Path, tmp_path: Path
) -> None:
    recorded = Recorded(monkeypatch)
    recorded.fan_out(str(photos), tmp_path / "out", None)
    assert recorded.listings == 1
    assert all(not videos and tables is TABLES for _, _, videos, tables, _ in recorded.started)
    assert recorded.started[0][-1] <= 6  # the first shard ran while the source was still being listed
