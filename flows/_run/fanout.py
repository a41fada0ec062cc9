"""Fan-out over a work pool: one large job split into shards that run as sub-runs of a deployment.

The parent run lists its source once, lazily, and writes every ``shard_size`` references to a
manifest (``<out_dir>/_shards/part-00003.json``, one whole object). Each shard is a
`run_deployment` of the flow's own deployment (or the one `FanOut.deployment` names) with
``shard=`` set and its manifest as ``images`` (Prefect stores a run's parameters: a shard's do not
hold the job's references, so they do not grow with the job), so whichever worker of the pool is
free picks it up; it reads its manifest, runs
the flow's usual batches and writes one part of each of its *dataset folders*
(``<out_dir>/embeddings/part-00003.parquet``) and its totals (``_shards/part-00003.result.json``:
the `RunTotals` and what else the flow keeps for its parent, e.g. `auto_label`'s labelled boxes).
pyarrow, pandas and duckdb read a folder as one table (they skip ``_``-prefixed names). The parent
sums the shards' totals into a `FannedOut`, a `RunTotals` like a plain run's, so each flow builds
its result, and ends its run, the same way for both.

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
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import pyarrow as pa
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import arun_deployment
from prefect.runtime import deployment as this_deployment
from prefect.runtime import flow_run as this_run
from pydantic import BaseModel, Field

from prefect_roboflow.blocks.exceptions import InvalidInputError

from .._outputs.files import ParquetSink
from .._steps.sources import ImageSource, iter_image_refs
from .._storage.access import delete, join, list_files, read_bytes, write_bytes
from .._storage.listing import is_video
from .artifacts import markdown_table
from .totals import RunTotals

__all__ = ["FanOut", "FannedOut", "Shard", "fan_out"]

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
    videos: bool = False  # the job has a video: every shard writes the video columns, its part has one or not

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

    def save(self, out: str, run: RunTotals, extra: dict[str, Any] | None = None) -> None:
        """Keep the shard's totals, and what else the flow's parent needs (JSON values), for the parent run."""
        saved = {"totals": run.dump(), "extra": extra or {}}
        write_bytes(_result_path(out, self.index), json.dumps(saved).encode())


@dataclass
class _Job:
    """What every shard of one fan-out needs."""

    deployment: str
    parameters: dict[str, Any]  # every shard's (`_job_parameters`)
    out: str
    tables: dict[str, pa.Schema]  # stem → schema; a lost shard's failed rows go to the first
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


class FannedOut(RunTotals):
    """A fanned-out job, once its shards are done: their totals summed (a `RunTotals`), where its
    dataset folders are, and what else each shard kept for the parent.

    Attributes:
        deployment: The deployment the shards ran on.
        extras: What each shard kept besides its totals (`Shard.save`), in shard order.
    """

    def __init__(self, flow_key: str, job: _Job, outcomes: list[_Outcome]) -> None:
        super().__init__(flow_key)
        self.deployment, self._out, self._outcomes = job.deployment, job.out, outcomes
        self.extras: list[dict[str, Any]] = []
        for outcome in outcomes:
            saved = _read_result(job.out, outcome.shard.index)
            try:
                self.add(saved["totals"])
            except ValueError as exc:
                raise InvalidInputError("out_dir", f"shard {outcome.shard.name}'s result: {exc}") from None
            self.extras.append(saved["extra"])

    def summed(self, key: str) -> dict[str, int]:
        """The shards' ``key`` counts (``extra[key]``: name → count) added up, most first.

        Raises:
            InvalidInputError: naming ``out_dir``, when a shard's counts are not name → count.
        """
        total: Counter[str] = Counter()
        for index, extra in enumerate(self.extras):
            try:
                total.update({str(k): int(v) for k, v in dict(extra.get(key) or {}).items()})
            except (TypeError, ValueError) as exc:
                raise InvalidInputError("out_dir", f"shard part-{index:05d}'s {key}: {exc}") from None
        return dict(total.most_common())

    def folder(self, stem: str) -> str:
        """The dataset folder ``<out_dir>/<stem>/``."""
        return join(self._out, stem) + "/"

    def parts(self, stem: str) -> list[str]:
        """The folder's part files, one per shard."""
        return [o.shard.table(self._out, stem) for o in self._outcomes]

    def sections(self) -> list[str]:
        """The shards and their states."""
        rows = [o.row() for o in self._outcomes]
        done = sum(o.completed for o in self._outcomes)
        return [
            f"{done} of {len(rows)} shards completed on deployment `{self.deployment}` "
            "(each table a dataset folder: one part per shard)",
            markdown_table(rows, ["shard", "flow_run", "state", "attempts", "images"]),
        ]

    def tables(self) -> list[tuple[str, str, list[dict[str, Any]]]]:
        """The shards table."""
        return [("shards", f"Shards of this {self.flow_key} run.", [o.row() for o in self._outcomes])]


async def fan_out(
    flow_key: str,
    images: ImageSource,
    out: str,
    plan: FanOut,
    tables: dict[str, pa.Schema],
    settings: dict[str, Any] | None = None,
    video_tables: dict[str, pa.Schema] | None = None,
) -> FannedOut:
    """Run a flow's job as shards of ``plan.shard_size`` images on a deployment; wait for all.

    ``tables`` names the dataset folders a shard writes a part of (stem → schema), its main table
    first; ``video_tables`` their schemas when the job names a video: every part has the job's one
    schema. ``settings`` are parameters every shard gets as the parent checked them (e.g. the video
    sampling), over this run's own.

    The source is listed once. Each shard starts once its manifest is written and the job's schema
    is known: at once without ``video_tables``; else from the first manifest that names a video,
    or, when none does, once the listing has ended (the shards written before wait until then).

    Raises:
        InvalidInputError: naming ``fan_out``, when there is no deployment to run the shards on.
    """
    deployment = await _deployment(plan)
    parameters = {**_job_parameters(), **(settings or {})}
    schemas = {False: tables, True: video_tables or tables}  # the job's, by whether it has a video
    jobs = {v: _Job(deployment, parameters, out, schemas[v], plan.retries) for v in (False, True)}
    videos: bool | None = None if video_tables is not None else False  # None: not known yet
    held: list[tuple[Shard, int]] = []  # manifests written while it is not known
    shards: list[asyncio.Task[_Outcome]] = []

    def start(videos: bool) -> None:  # the shards held
        for shard, count in held:
            shards.append(asyncio.create_task(_run(jobs[videos], shard.model_copy(update={"videos": videos}), count)))
        held.clear()

    try:
        async for shard, count, video in _manifests(images, out, plan):
            held.append((shard, count))
            videos = True if videos is None and video else videos
            if videos is not None:
                start(videos)
        videos = bool(videos)  # still None: listed to the end without a video
        start(videos)
        outcomes = list(await asyncio.gather(*shards))
    except BaseException:
        for task in shards:  # stop waiting on the others; their sub-runs finish on their workers
            task.cancel()
        raise
    job = jobs[videos]
    for stem in job.tables:
        _remove_stale_parts(join(out, stem), len(outcomes))
    fanned = FannedOut(flow_key, job, outcomes)
    fanned.source = images  # the assets' upstream
    return fanned


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


def _job_parameters() -> dict[str, Any]:
    """This run's parameters, as every shard gets them: no fan-out, no vector index (the parent
    updates it), and no ``images`` (each shard gets its own: `_shard_parameters`)."""
    parameters = {**this_run.parameters, "fan_out": None}
    parameters.pop("images", None)
    if "index_path" in parameters:
        parameters["index_path"] = None
    return parameters


def _shard_parameters(job: dict[str, Any], shard: Shard) -> dict[str, Any]:
    """One shard run's parameters: the job's, ``shard``, and as ``images`` its manifest (the
    references it reads), never the job's source: what Prefect stores per shard run does not grow
    with the job (a list source of N references would be stored once per shard)."""
    return {**job, "images": shard.manifest, "shard": shard.model_dump()}


async def _manifests(images: ImageSource, out: str, plan: FanOut) -> AsyncIterator[tuple[Shard, int, bool]]:
    """Each shard, its number of references and whether one is a video, once its manifest is
    written (the source listed once, in a thread)."""
    refs = iter_image_refs(images)
    index = 0
    while chunk := await asyncio.to_thread(_take, refs, plan.shard_size):
        shard = Shard(index=index, manifest=_shards_file(out, index, "json"))
        await asyncio.to_thread(write_bytes, shard.manifest, json.dumps(chunk).encode())
        await asyncio.to_thread(_forget_result, out, index)
        yield shard, len(chunk), any(is_video(ref) for ref in chunk)
        index += 1


def _take(refs: Iterator[str], n: int) -> list[str]:
    return list(islice(refs, n))


async def _run(job: _Job, shard: Shard, images: int) -> _Outcome:
    """One shard as a sub-run, run again alone while it does not complete."""
    for attempt in range(1, job.retries + 2):
        shard = shard.model_copy(update={"attempt": attempt})
        run = await arun_deployment(
            job.deployment,
            parameters=_shard_parameters(job.parameters, shard),
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
    """Failed rows for every image of a shard that never completed, and totals saying so; its
    parts of the other tables (from an earlier job) are removed.

    A shard that failed its own failure rule wrote its parts and totals already: they are kept.
    """
    try:
        _read_result(job.out, outcome.shard.index)
        return
    except InvalidInputError:
        pass
    state = outcome.run.state
    reason = f"shard {outcome.shard.name} did not complete after {outcome.attempts} attempt(s): " + (
        (state.message or state.type.value) if state else "no state"
    )
    refs = outcome.shard.refs()
    (stem, schema), *others = job.tables.items()
    with ParquetSink(outcome.shard.table(job.out, stem), schema) as sink:
        sink.write([{"image_ref": ref, "status": "failed", "error": reason} for ref in refs])
    for other, _ in others:
        with contextlib.suppress(NotImplementedError, InvalidInputError):
            delete(outcome.shard.table(job.out, other))
    totals = {"images": len(refs), "images_failed": len(refs), "statuses": {"failed": len(refs)}}
    saved = {"totals": totals, "extra": {}}
    write_bytes(_result_path(job.out, outcome.shard.index), json.dumps(saved).encode())


def _forget_result(out: str, index: int) -> None:
    """Delete the counts an earlier job left for this shard number (a store that cannot delete keeps them)."""
    with contextlib.suppress(NotImplementedError):
        delete(_result_path(out, index))


def _result_path(out: str, index: int) -> str:
    return _shards_file(out, index, "result.json")


def _shards_file(out: str, index: int, suffix: str) -> str:
    """A file of shard ``index`` in ``<out>/_shards/``: its manifest (``json``) or counts (``result.json``)."""
    return join(join(out, SHARDS_FOLDER), f"part-{index:05d}.{suffix}")


def _read_result(out: str, index: int) -> dict[str, Any]:
    """What shard ``index`` kept for the parent (`Shard.save`), checked.

    Raises:
        InvalidInputError: naming ``out_dir``, when there is none or it is not a shard's result.
    """
    path = _result_path(out, index)
    try:
        saved = json.loads(read_bytes(path, field="out_dir"))
    except ValueError:
        saved = None
    if not isinstance(saved, dict) or not isinstance(saved.get("totals"), dict):
        raise InvalidInputError("out_dir", f"{path} is not a shard's result")
    if not isinstance(saved.get("extra"), dict):
        saved["extra"] = {}
    return saved


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
