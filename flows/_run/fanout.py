"""Fan-out over a work pool: one large job split into shards that run as sub-runs of a deployment.

The parent run lists its source once, lazily, and writes every ``shard_size`` references to a
manifest (``<out_dir>/_shards/part-00003.json``, one whole object). Each shard is a
`run_deployment` of the flow's own deployment (or the one `FanOut.deployment` names) with
``shard=`` set, so whichever worker of the pool is free picks it up; it reads its manifest, runs
the flow's usual batches and writes one part of a *dataset folder*
(``<out_dir>/embeddings/part-00003.parquet``) and its counts (``_shards/part-00003.result.json``).
pyarrow, pandas and duckdb read the folder as one table (they skip ``_``-prefixed names).

A shard that ends in any state but Completed is run again alone, up to `FanOut.retries` times;
one that never completes leaves failed rows for its images (nothing is lost), and the parent then
applies the flow's failure rule to the whole job. Parts of an earlier run with more shards are
removed at the end, so every image is in the folder exactly once. A rerun of the job sends
nothing already in the content cache.

Examples:
    From a deployment of `embed_images` on a process, Docker or Kubernetes work pool:

    ```python
    from prefect.deployments import run_deployment

    run_deployment(
        "embed-images/process-pool",
        parameters={"images": "s3://photos/2024/", "out_dir": "s3://results/2024/",
                    "cache_storage": "s3-bucket/roboflow-cache", "fan_out": {"shard_size": 5000}},
    )
    ```
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any, TypeVar

import pyarrow as pa
from prefect.artifacts import acreate_table_artifact
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import arun_deployment
from prefect.runtime import deployment as this_deployment
from prefect.runtime import flow_run as this_run
from pydantic import BaseModel, Field

from prefect_roboflow.blocks.exceptions import InvalidInputError

from .._outputs.files import ParquetSink
from .._steps.sources import ImageSource, iter_image_refs
from .._storage.access import delete, join, list_files, read_bytes, write_bytes
from .batch import ImageCounts, check_failure_rate, emit_completed, markdown_table, publish_summary

__all__ = ["FanOut", "FannedOut", "Shard", "fan_out", "finish_fanned_out"]

SHARDS_FOLDER = "_shards"
POLL_SECONDS = 2.0
_PART = re.compile(r"part-(\d{5,})\.parquet")


class FanOut(BaseModel):
    """How a flow splits its images into shards that run as sub-runs of a deployment.

    Attributes:
        shard_size: Images per shard (one sub-run each).
        deployment: ``"flow-name/deployment-name"`` of the deployment that runs the shards; by
            default the deployment this run came from.
        retries: How many times a shard that did not complete is run again, alone.
    """

    shard_size: int = Field(ge=1, le=1_000_000)
    deployment: str | None = None
    retries: int = Field(default=2, ge=0, le=10)


class Shard(BaseModel):
    """The part of a fanned-out job one sub-run does; set by the parent run, not by users.

    Attributes:
        index: The shard's number, from 0.
        manifest: Where its image references are (a JSON list).
        attempt: 1, then 2… when the parent runs it again.
    """

    index: int = Field(ge=0)
    manifest: str
    attempt: int = Field(default=1, ge=1)

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}"

    @property
    def label(self) -> str:
        """What the shard's run name ends with, e.g. ``part-00003 attempt 2``."""
        return f"{self.name} attempt {self.attempt}"

    def refs(self) -> list[str]:
        """The shard's image references, read from its manifest."""
        refs = json.loads(read_bytes(self.manifest, field="shard"))
        if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
            raise InvalidInputError("shard", f"{self.manifest} is not a JSON list of image references")
        return refs

    def table(self, out: str, stem: str) -> str:
        """Where the shard's part of the ``stem`` table goes."""
        return join(join(out, stem), f"{self.name}.parquet")

    def save_result(self, out: str, result: BaseModel) -> None:
        """Keep the shard's counts for the parent run."""
        write_bytes(_result_path(out, self.index), result.model_dump_json().encode())


@dataclass
class _Job:
    """What every shard of one fan-out needs."""

    deployment: str
    parameters: dict[str, Any]
    out: str
    stem: str
    schema: pa.Schema
    retries: int


@dataclass
class _Outcome:
    shard: Shard
    run: FlowRun
    attempts: int
    images: int  # how many images its manifest names

    @property
    def completed(self) -> bool:
        return self.run.state is not None and self.run.state.is_completed()

    def row(self) -> dict[str, Any]:
        state = self.run.state
        return {
            "shard": self.shard.name,
            "flow_run": self.run.name,
            "state": state.name if state else "unknown",
            "attempts": self.attempts,
            "images": self.images,
        }


@dataclass
class FannedOut:
    """What a fanned-out job did: its counts added up over the shards, and where its table is.

    Attributes:
        counts: The `ImageCounts` fields, summed over the shards, as keyword arguments.
        table: The dataset folder (``<out_dir>/<stem>/``).
        parts: Its part files, one per shard.
        sections: Markdown for the run's summary: the shards and their states.
    """

    counts: dict[str, Any]
    table: str
    parts: list[str]
    sections: list[str]


async def fan_out(
    flow_key: str, images: ImageSource, out: str, plan: FanOut, stem: str, schema: pa.Schema
) -> FannedOut:
    """Run a flow's job as shards of ``plan.shard_size`` images on a deployment; wait for all.

    Raises:
        InvalidInputError: naming ``fan_out``, when there is no deployment to run the shards on.
    """
    job = _Job(await _deployment(plan), _shard_parameters(), out, stem, schema, plan.retries)
    shards: list[asyncio.Task[_Outcome]] = []
    try:
        async for shard, count in _manifests(images, out, plan):  # each shard starts once its manifest is up
            shards.append(asyncio.create_task(_run(job, shard, count)))
        outcomes = list(await asyncio.gather(*shards))
    except BaseException:
        for task in shards:  # stop waiting on the others; their sub-runs finish on their workers
            task.cancel()
        raise
    table = join(out, stem)
    _remove_stale_parts(table, len(outcomes))
    rows = [o.row() for o in outcomes]
    await acreate_table_artifact(rows, key=f"{flow_key}-shards", description=f"Shards of this {flow_key} run.")
    done = sum(o.completed for o in outcomes)
    sections = [
        f"{done} of {len(outcomes)} shards completed on deployment `{job.deployment}`; "
        f"table: `{table}/` (a dataset folder: one part per shard)",
        markdown_table(rows, ["shard", "flow_run", "state", "attempts", "images"]),
    ]
    parts = [o.shard.table(out, stem) for o in outcomes]
    return FannedOut(_sum_results(out, outcomes), table + "/", parts, sections)


R = TypeVar("R", bound=ImageCounts)


async def finish_fanned_out(flow_key: str, result: R, title: str, sections: list[str], max_failure_rate: float) -> R:
    """Publish the job's summary, emit its completion event, then apply the failure rule to the whole job."""
    await publish_summary(flow_key, title, sections)
    emit_completed(flow_key, result.model_dump())
    check_failure_rate(result.failed, result.images, max_failure_rate)
    return result


async def _deployment(plan: FanOut) -> str:
    """The deployment the shards run on, checked to exist, before anything is listed or sent."""
    if plan.deployment is None:
        found = this_deployment.id
        if not found:
            raise InvalidInputError(
                "fan_out", "shards run as sub-runs of a deployment: run this flow from one, or name one in deployment"
            )
        return str(found)
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    async with get_client() as client:
        try:
            return str((await client.read_deployment_by_name(plan.deployment)).id)
        except (ObjectNotFound, ValueError):
            raise InvalidInputError("fan_out", f"no deployment named {plan.deployment!r}") from None


def _shard_parameters() -> dict[str, Any]:
    """This run's parameters, as each shard gets them (its vector index is updated by the parent)."""
    return {**this_run.parameters, "fan_out": None, "index_path": None}


async def _manifests(images: ImageSource, out: str, plan: FanOut) -> AsyncIterator[tuple[Shard, int]]:
    """Each shard and its number of references, once its manifest is written (listing in a thread)."""
    refs = iter_image_refs(images)
    index = 0
    while chunk := await asyncio.to_thread(_take, refs, plan.shard_size):
        shard = Shard(index=index, manifest=_shards_file(out, index, "json"))
        await asyncio.to_thread(write_bytes, shard.manifest, json.dumps(chunk).encode())
        await asyncio.to_thread(_forget_result, out, index)
        yield shard, len(chunk)
        index += 1


def _take(refs: Iterator[str], n: int) -> list[str]:
    return list(islice(refs, n))


async def _run(job: _Job, shard: Shard, images: int) -> _Outcome:
    """One shard as a sub-run, run again alone while it does not complete."""
    for attempt in range(1, job.retries + 2):
        shard = shard.model_copy(update={"attempt": attempt})
        run = await arun_deployment(
            job.deployment,
            parameters={**job.parameters, "shard": shard.model_dump()},
            timeout=None,
            poll_interval=POLL_SECONDS,
            as_subflow=True,
        )
        outcome = _Outcome(shard, run, attempt, images)
        if outcome.completed:
            break
    if not outcome.completed:
        await asyncio.to_thread(_write_lost_shard, job, outcome)
    return outcome


def _write_lost_shard(job: _Job, outcome: _Outcome) -> None:
    """Failed rows for every image of a shard that never completed, and counts saying so.

    A shard that failed its own failure rule wrote its part and counts already: they are kept.
    """
    try:
        read_bytes(_result_path(job.out, outcome.shard.index), field="out_dir")
        return
    except InvalidInputError:
        pass
    state = outcome.run.state
    reason = f"shard {outcome.shard.name} did not complete after {outcome.attempts} attempt(s): " + (
        (state.message or state.type.value) if state else "no state"
    )
    refs = outcome.shard.refs()
    with ParquetSink(outcome.shard.table(job.out, job.stem), job.schema) as sink:
        sink.write([{"image_ref": ref, "status": "failed", "error": reason} for ref in refs])
    counts = {"images": len(refs), "succeeded": 0, "failed": len(refs)}
    write_bytes(_result_path(job.out, outcome.shard.index), json.dumps(counts).encode())


def _forget_result(out: str, index: int) -> None:
    """Delete the counts an earlier job left for this shard number (a store that cannot delete keeps them)."""
    with contextlib.suppress(NotImplementedError):
        delete(_result_path(out, index))


def _result_path(out: str, index: int) -> str:
    return _shards_file(out, index, "result.json")


def _shards_file(out: str, index: int, suffix: str) -> str:
    """A file of shard ``index`` in ``<out>/_shards/``: its manifest (``json``) or counts (``result.json``)."""
    return join(join(out, SHARDS_FOLDER), f"part-{index:05d}.{suffix}")


def _sum_results(out: str, outcomes: list[_Outcome]) -> dict[str, Any]:
    """The shards' `ImageCounts` added up."""
    numeric = list(ImageCounts.model_fields)
    totals: dict[str, Any] = dict.fromkeys(numeric, 0)
    for outcome in outcomes:
        counts = json.loads(read_bytes(_result_path(out, outcome.shard.index), field="out_dir"))
        for name in numeric:
            totals[name] += counts.get(name, 0)
    return totals


def _remove_stale_parts(folder: str, shards: int) -> None:
    """Delete parts numbered ``shards`` and above: an earlier run of the job had more shards.

    A store that cannot list (a generic file-system block) keeps them: its readers should read the
    parts the run's result names.
    """
    try:
        refs = list(list_files(folder))
    except NotImplementedError:
        return
    for ref in refs:
        match = _PART.fullmatch(ref.rsplit("/", 1)[-1])
        if match and int(match.group(1)) >= shards:
            delete(ref)
