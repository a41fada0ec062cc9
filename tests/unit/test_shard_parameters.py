"""What a fanned-out job stores per shard run: its own part, never the job's references.

Prefect keeps every flow run's parameters in its database; a shard run that copied the parent's
``images`` would store a list source of N references once per shard. Measured here at 100,000
references: a shard run's parameters are the same size as at 10."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from prefect_roboflow.flows._run import fanout

OUT = "s3://results/2024/"


def _shard_run_parameters(
    monkeypatch: pytest.MonkeyPatch, references: int, index: int | None = None, shard_size: int = 5_000
) -> dict:
    """The parameters of shard ``index`` (the last by default) of a job over a list of ``references``."""
    refs = [f"s3://photos/2024/{i:07d}.jpg" for i in range(references)]
    parent = {
        "images": refs,
        "out_dir": OUT,
        "model": "clip",
        "batch_size": 128,
        "index_path": "s3://results/index",
        "fan_out": {"shard_size": shard_size, "deployment": None, "retries": 2},
        "shard": None,
    }
    monkeypatch.setattr(fanout, "this_run", SimpleNamespace(parameters=parent))
    index = (references - 1) // shard_size if index is None else index
    shard = fanout.Shard(index=index, manifest=fanout._shards_file(OUT, index, "json"))
    return fanout._shard_parameters(fanout._job_parameters(), shard)


def test_a_shard_run_s_parameters_do_not_grow_with_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    first = {n: len(json.dumps(_shard_run_parameters(monkeypatch, n, index=0))) for n in (10, 1_000, 100_000)}
    assert len(set(first.values())) == 1, first  # the first shard's: the same bytes, whatever the job's size
    last = len(json.dumps(_shard_run_parameters(monkeypatch, 100_000)))
    assert last < 1_024, last  # and the 20th shard's of 100,000 references (its number one digit longer)


def test_a_shard_run_gets_its_manifest_as_images_and_neither_fan_out_nor_index(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parameters = _shard_run_parameters(monkeypatch, 12_000)
    assert parameters["images"] == "s3://results/2024/_shards/part-00002.json" == parameters["shard"]["manifest"]
    assert parameters["shard"] == {"index": 2, "manifest": parameters["images"], "attempt": 1}
    assert (parameters["fan_out"], parameters["index_path"]) == (None, None)
    assert {k: parameters[k] for k in ("out_dir", "model", "batch_size")} == {
        "out_dir": OUT,
        "model": "clip",
        "batch_size": 128,
    }
