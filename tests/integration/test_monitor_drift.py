"""`monitor_drift` on the Prefect test harness: planted embeddings tables and indexes (the verdicts
are known), pinned baselines, the history and plot, the drift event read back from the API, images
embedded through the real server, and bad input refused before anything is written or sent."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prefect.client.orchestration import get_client
from prefect.events.filters import EventFilter, EventNameFilter
from prefect.events.worker import EventsWorker
from support.fault_proxy import FaultProxy
from support.images import make_image

from prefect_roboflow.blocks import InvalidInputError
from prefect_roboflow.flows import monitor_drift, update_index_from_table
from prefect_roboflow.flows.embed_images import EMBEDDINGS_SCHEMA
from prefect_roboflow.flows.monitor_drift import DRIFT_EVENT

DIM = 512
METHODS = ["domain_classifier", "mean_cosine", "share_drifted", "mmd"]


def _directions(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A mean direction and one at 60° from it (see tests/unit/test_drift_methods.py)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(DIM)
    a /= np.linalg.norm(a)
    r = rng.standard_normal(DIM)
    r -= (r @ a) * a
    r /= np.linalg.norm(r)
    return a, 0.5 * a + np.sqrt(0.75) * r


def _table(path: Path, direction: np.ndarray, rows: int, seed: int, **columns: Any) -> str:
    rng = np.random.default_rng(seed)
    vectors = direction[None, :] + rng.standard_normal((rows, len(direction))) / np.sqrt(len(direction))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    records = [
        {
            "image_ref": f"cam/{seed}-{i}.jpg",
            "image_sha256": f"{seed:04d}{i:060d}",
            "model": columns.get("model", "clip"),
            "version": columns.get("version", "ViT-B-16"),
            "embedding": v.tolist(),
            "status": "ok",
            "error": None,
        }
        for i, v in enumerate(vectors)
    ]
    pq.write_table(pa.Table.from_pylist(records, schema=EMBEDDINGS_SCHEMA), path)
    return str(path)


def _events(name: str) -> list[Any]:
    """Events of this name as the Prefect API stored them (they arrive asynchronously)."""
    EventsWorker.drain_all()

    async def read() -> list[Any]:
        async with get_client() as client:
            return (await client.read_events(filter=EventFilter(event=EventNameFilter(name=[name])), limit=50)).events

    for _ in range(40):
        found = asyncio.run(read())
        if found:
            return found
        time.sleep(0.5)
    return []


def test_tables_and_index_history_plot_and_drift_event(tmp_path: Path) -> None:
    same, shifted = _directions()
    reference = _table(tmp_path / "reference.parquet", same, 1500, seed=1)
    steady = _table(tmp_path / "steady.parquet", same, 600, seed=2)
    moved = _table(tmp_path / "moved.parquet", shifted, 600, seed=3)
    out = tmp_path / "drift"

    calm = monitor_drift(steady, str(out), reference=reference, methods=METHODS)
    assert not calm.drifted and [s.method for s in calm.scores] == METHODS
    assert (calm.n_reference, calm.n_current, calm.model, calm.version) == (1500, 600, "clip", "ViT-B-16")

    index = str(tmp_path / "index")
    update_index_from_table(reference, index)
    state = monitor_drift(moved, str(out), reference=index, methods=METHODS, return_state=True)
    drifted = state.result()
    assert drifted.drifted and all(s.drifted for s in drifted.scores) and drifted.n_reference == 1500

    history = pq.read_table(out / "drift.parquet").to_pylist()
    assert [(r["method"], r["drifted"]) for r in history] == [(m, False) for m in METHODS] + [
        (m, True) for m in METHODS
    ]
    assert {(r["n_reference"], r["n_current"], r["model"], r["version"]) for r in history} == {
        (1500, 600, "clip", "ViT-B-16")
    }
    assert [r["threshold"] for r in history[:4]] == [0.55, 0.2, 0.2, 0.015]
    assert (out / "drift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    events = [e for e in _events(DRIFT_EVENT) if e.payload.get("current") == moved]
    assert len(events) == 1
    assert events[0].payload["drifted"] is True and {s["method"] for s in events[0].payload["scores"]} == set(METHODS)
    assert events[0].resource.id == "prefect_roboflow.drift.clip.ViT-B-16"
    assert not [e for e in _events(DRIFT_EVENT) if e.payload.get("current") == steady]


def test_pinned_baseline_is_used_and_another_model_refused(tmp_path: Path) -> None:
    same, shifted = _directions(1)
    out = tmp_path / "drift"
    first = monitor_drift(_table(tmp_path / "week1.parquet", same, 800, seed=4), str(out), save_baseline=True)
    assert first.baseline_path and first.scores == [] and first.drift_path is None
    assert Path(first.baseline_path).parent == out / "baselines" / "clip" / "ViT-B-16"
    assert not (out / "drift.parquet").exists()

    later = monitor_drift(_table(tmp_path / "week2.parquet", shifted, 400, seed=5), str(out))
    assert later.reference == first.baseline_path and later.drifted and later.n_reference == 800

    rows = pq.read_table(out / "drift.parquet").num_rows
    other = _table(tmp_path / "pe.parquet", same, 400, seed=6, model="perception_encoder", version="PE-Core-B16-224")
    with pytest.raises(InvalidInputError) as refused:
        monitor_drift(other, str(out), reference=first.baseline_path)
    assert refused.value.field == "reference" and "perception_encoder" in refused.value.reason
    with pytest.raises(InvalidInputError) as no_baseline:
        monitor_drift(other, str(out))  # no baseline pinned for that model
    assert no_baseline.value.field == "reference"
    narrow = _table(tmp_path / "narrow.parquet", same[:256] / np.linalg.norm(same[:256]), 400, seed=7)
    with pytest.raises(InvalidInputError) as dimension:
        monitor_drift(narrow, str(out))
    assert dimension.value.field == "reference" and "256-d" in dimension.value.reason
    assert pq.read_table(out / "drift.parquet").num_rows == rows  # nothing written by a refused run


def test_bad_windows_are_refused_naming_the_parameter(tmp_path: Path) -> None:
    same, _ = _directions(2)
    reference = _table(tmp_path / "reference.parquet", same, 200, seed=8)
    one_row = _table(tmp_path / "one.parquet", same, 1, seed=9)
    failed = pa.Table.from_pylist(
        [{"image_ref": "a.jpg", "image_sha256": None, "model": "clip", "version": "ViT-B-16", "embedding": None,
          "status": "failed", "error": "image is empty (0 bytes)"}],
        schema=EMBEDDINGS_SCHEMA,
    )  # fmt: skip
    pq.write_table(failed, tmp_path / "empty.parquet")
    nan = pq.read_table(reference).to_pylist()
    nan[3]["embedding"][7] = float("nan")
    pq.write_table(pa.Table.from_pylist(nan, schema=EMBEDDINGS_SCHEMA), tmp_path / "nan.parquet")
    out = tmp_path / "drift"
    cases = [
        ({"current": str(tmp_path / "empty.parquet"), "reference": reference}, "current", "empty window"),
        ({"current": reference, "reference": one_row}, "reference", "1 row(s)"),
        ({"current": str(tmp_path / "nan.parquet"), "reference": reference}, "current", "NaN"),
        ({"current": reference, "reference": reference, "methods": ["kl"]}, "methods", "expected some of"),
        ({"current": reference, "reference": reference, "thresholds": {"mmd": 0.1}}, "thresholds", "does not use"),
    ]
    for kwargs, field, words in cases:
        with pytest.raises(InvalidInputError) as refused:
            monitor_drift(out_dir=str(out), **kwargs)
        assert refused.value.field == field and words in refused.value.reason, kwargs
    assert not (out / "drift.parquet").exists() and not (out / "baselines").exists()


@pytest.mark.server
def test_image_windows_embedded_through_the_cache(proxy: FaultProxy, tmp_path: Path) -> None:
    for name, seeds in {"last_week": range(0, 8), "today": range(100, 108)}.items():
        (tmp_path / name).mkdir()
        for seed in seeds:
            (tmp_path / name / f"{seed:03d}.png").write_bytes(make_image(seed))
    cache, out = str(tmp_path / "cache"), str(tmp_path / "drift")
    first = monitor_drift(
        str(tmp_path / "today"), out, reference=str(tmp_path / "last_week"), server=proxy.url, cache_storage=cache
    )
    assert (first.n_reference, first.n_current, first.model) == (8, 8, "clip")
    sent = proxy.count("/clip/embed_image")
    assert sent == 16
    again = monitor_drift(
        str(tmp_path / "today"), out, reference=str(tmp_path / "last_week"), server=proxy.url, cache_storage=cache
    )
    assert proxy.count("/clip/embed_image") == sent and again.scores == first.scores  # all from the cache

    # another model than the reference table's: refused before any image is sent
    pe = _table(tmp_path / "pe.parquet", _directions(3)[0], 50, seed=10, model="perception_encoder", version="x")
    with pytest.raises(InvalidInputError) as refused:
        monitor_drift(str(tmp_path / "today"), out, reference=pe, server=proxy.url, cache_storage=cache)
    assert refused.value.field == "reference" and proxy.count() == sent
