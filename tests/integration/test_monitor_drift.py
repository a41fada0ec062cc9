"""`monitor_drift` on the Prefect test harness: planted embeddings tables and indexes (the verdicts
are known), pinned baselines, the history and plot, the drift event read back from the API (and
none for a window too small for a verdict), images embedded through the real server, and bad
input refused before anything is written or sent."""

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
from prefect_roboflow.flows._drift.methods import MIN_ROWS
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


def _events(name: str, awaited: str) -> list[Any]:
    """Events of this name as the Prefect API stored them, once the one about the ``awaited``
    current window is among them (they arrive asynchronously, and earlier tests' events of the
    same name are there already: any event is not yet the one this test emitted)."""
    EventsWorker.drain_all()

    async def read() -> list[Any]:
        async with get_client() as client:
            return (await client.read_events(filter=EventFilter(event=EventNameFilter(name=[name])), limit=50)).events

    found: list[Any] = []
    for _ in range(60):
        found = asyncio.run(read())
        if any(e.payload.get("current") == awaited for e in found):
            return found
        time.sleep(0.5)
    return found


def test_tables_and_index_history_plot_and_drift_event(tmp_path: Path) -> None:
    same, shifted = _directions()
    reference = _table(tmp_path / "reference.parquet", same, 1500, seed=1)
    steady = _table(tmp_path / "steady.parquet", same, 600, seed=2)
    moved = _table(tmp_path / "moved.parquet", shifted, 600, seed=3)
    out = tmp_path / "drift"

    calm = monitor_drift(steady, str(out), reference=reference, methods=METHODS)
    assert calm.status == "no drift" and not calm.drifted and [s.method for s in calm.scores] == METHODS
    assert all(s.p_value is not None and s.p_value > 0.0125 and s.alpha == 0.0125 for s in calm.scores)
    assert (calm.n_reference, calm.n_current, calm.model, calm.version) == (1500, 600, "clip", "ViT-B-16")

    index = str(tmp_path / "index")
    update_index_from_table(reference, index)
    floors = {"mean_cosine": 0.9}  # an effect-size floor far above this drift's 0.5: no verdict from it
    state = monitor_drift(moved, str(out), reference=index, methods=METHODS, thresholds=floors, return_state=True)
    drifted = state.result()
    assert drifted.status == "drifted" and drifted.n_reference == 1500
    assert [(s.method, s.drifted, s.p_value) for s in drifted.scores] == [
        (m, m != "mean_cosine", 1 / 200) for m in METHODS
    ]

    history = pq.read_table(out / "drift.parquet").to_pylist()
    assert [(r["method"], r["status"]) for r in history] == [(m, "no drift") for m in METHODS] + [
        (m, "no drift" if m == "mean_cosine" else "drifted") for m in METHODS
    ]
    assert {(r["n_reference"], r["n_current"], r["model"], r["version"]) for r in history} == {
        (1500, 600, "clip", "ViT-B-16")
    }
    assert [r["threshold"] for r in history] == [None] * 5 + [0.9, None, None]
    assert (out / "drift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    stored = _events(DRIFT_EVENT, awaited=moved)  # the steady window ran first: its event would be here too
    events = [e for e in stored if e.payload.get("current") == moved]
    assert len(events) == 1
    assert events[0].payload["status"] == "drifted"
    assert {s["method"] for s in events[0].payload["scores"]} == set(METHODS)
    assert events[0].resource.id == "prefect_roboflow.drift.clip.ViT-B-16"
    assert not [e for e in stored if e.payload.get("current") == steady]


def test_pinned_baseline_is_used_and_another_model_refused(tmp_path: Path) -> None:
    same, shifted = _directions(1)
    out = tmp_path / "drift"
    first = monitor_drift(_table(tmp_path / "week1.parquet", same, 800, seed=4), str(out), save_baseline=True)
    assert first.status == "baseline pinned" and not first.drifted
    assert first.baseline_path and first.scores == [] and first.drift_path is None
    assert Path(first.baseline_path).parent == out / "baselines" / "clip" / "ViT-B-16"
    assert not (out / "drift.parquet").exists()

    later = monitor_drift(_table(tmp_path / "week2.parquet", shifted, 400, seed=5), str(out))
    assert later.reference == first.baseline_path and later.status == "drifted" and later.n_reference == 800
    assert [s.method for s in later.scores] == ["domain_classifier", "mean_cosine"]  # the default pair

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
        ({"current": str(tmp_path / "nan.parquet"), "reference": reference}, "current", "NaN"),
        ({"current": reference, "reference": reference, "methods": ["kl"]}, "methods[0]", "domain_classifier"),
        ({"current": reference, "reference": reference, "thresholds": {"mmd": 0.1}}, "thresholds", "does not use"),
        ({"current": reference, "reference": reference, "alpha": 0.0}, "alpha", "greater than 0"),
        ({"current": reference, "reference": reference, "permutations": 30}, "permutations", "at least 39"),
    ]
    for kwargs, field, words in cases:
        with pytest.raises(InvalidInputError) as refused:
            monitor_drift(out_dir=str(out), **kwargs)
        assert refused.value.field == field and words in refused.value.reason, kwargs
    assert not (out / "drift.parquet").exists() and not (out / "baselines").exists()


def test_small_windows_get_insufficient_data_and_no_event(tmp_path: Path) -> None:
    same, shifted = _directions(4)
    reference = _table(tmp_path / "reference.parquet", same, 300, seed=11)
    tiny = _table(tmp_path / "tiny.parquet", shifted, MIN_ROWS - 1, seed=12)  # drifted, but too few rows
    out = tmp_path / "drift"
    result = monitor_drift(tiny, str(out), reference=reference)
    assert result.status == "insufficient data" and not result.drifted and result.min_rows == MIN_ROWS
    assert [(s.status, s.score, s.p_value) for s in result.scores] == [("insufficient data", None, None)] * 2
    history = pq.read_table(out / "drift.parquet").to_pylist()
    assert [r["status"] for r in history] == ["insufficient data"] * 2 and history[0]["n_current"] == MIN_ROWS - 1
    one_row = _table(tmp_path / "one.parquet", same, 1, seed=13)  # a 1-row reference: the same
    assert monitor_drift(reference, str(out), reference=one_row).status == "insufficient data"
    enough = _table(tmp_path / "enough.parquet", shifted, MIN_ROWS, seed=14)
    assert monitor_drift(enough, str(out), reference=reference).status == "drifted"
    events = [e for e in _events(DRIFT_EVENT, awaited=enough) if e.payload.get("current") in (tiny, enough)]
    assert [e.payload["current"] for e in events] == [enough]  # the small window emitted none


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


def test_a_window_too_small_for_a_verdict_is_not_pinned_as_the_baseline(tmp_path: Path) -> None:
    """One quiet day of 3 images must not replace the baseline every later run compares with."""
    same, shifted = _directions(5)
    out = tmp_path / "drift"
    first = monitor_drift(_table(tmp_path / "big.parquet", same, 500, seed=21), str(out), save_baseline=True)
    small = monitor_drift(_table(tmp_path / "small.parquet", same, 3, seed=22), str(out), save_baseline=True)
    assert small.baseline_path is None and small.status == "insufficient data"
    assert small.warnings and "not pinned" in small.warnings[0] and str(MIN_ROWS) in small.warnings[0]
    later = monitor_drift(_table(tmp_path / "later.parquet", shifted, 300, seed=23), str(out))
    assert later.reference == first.baseline_path and later.n_reference == 500 and later.status == "drifted"
    assert len(list((out / "baselines" / "clip" / "ViT-B-16").iterdir())) == 1


def test_a_window_of_video_frames_is_warned_that_its_rows_are_not_independent(tmp_path: Path) -> None:
    from prefect_roboflow.flows._outputs.tables import video_schema

    same, _ = _directions(6)
    reference = _table(tmp_path / "reference.parquet", same, 200, seed=31)
    rows = pq.read_table(_table(tmp_path / "photos.parquet", same, 40, seed=32)).to_pylist()
    schema = video_schema(EMBEDDINGS_SCHEMA)
    frames = [
        {**r, "image_ref": f"cam.mp4#frame={i}", "frame_index": i, "frame_time_s": i / 2} if i < 30 else
        {**r, "frame_index": None, "frame_time_s": None}
        for i, r in enumerate(rows)
    ]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(frames, schema=schema), tmp_path / "frames.parquet")
    result = monitor_drift(str(tmp_path / "frames.parquet"), str(tmp_path / "drift"), reference=reference)
    assert result.status in {"no drift", "drifted"}  # a verdict, with the warning beside it
    (warning,) = result.warnings
    assert "30 of the current window's 40 rows are video frames" in warning and "independent" in warning
    photos = monitor_drift(str(tmp_path / "photos.parquet"), str(tmp_path / "drift"), reference=reference)
    assert photos.warnings == []
