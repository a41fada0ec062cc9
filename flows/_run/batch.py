"""The run skeleton every flow shares: batches, pipelining, progress, per-step figures, the
summary and table artifacts, the completion event and the failure-rate rule.

A flow says what to do with one batch (a chain of steps) and what rows it makes; `BatchRun`
does the rest the same way for every flow::

    run = BatchRun("embed-images", images, batch_size, f"Embedding images with {model.label}")
    with ParquetSink(path, EMBEDDINGS_SCHEMA) as sink:
        async for batch in run.process(lambda b: steps.embed.submit(model, b, cache)):
            run.write(sink, rows_of(batch))
    return await run.finish(result, title, sections, max_failure_rate)

A fanned-out job's parent has no batches: it sums its shards' `RunTotals` (`_run.fanout.FannedOut`),
and the flow builds its result from those and ends with the same `RunTotals.finish`.

The artifacts go through the flow run's own async client (a sync call inside an async flow would
build a new client each time: ~50 ms apiece).
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import math
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from uuid import UUID

from prefect.artifacts import (
    acreate_markdown_artifact,
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)
from prefect.context import SyncClientContext
from prefect.events import emit_event
from prefect.futures import PrefectFuture
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from pydantic import BaseModel

from prefect_roboflow.blocks.exceptions import InvalidInputError

from .._outputs.assets import assets_section, materialize_outputs, output_locations
from .._outputs.files import ParquetSink
from .._steps.sources import ImageSource, count_records, iter_records
from .._storage.access import local_size
from .._video.sample import VideoSampling
from ..records import Batch, ImageRecord, StepReport

__all__ = [
    "BatchRun",
    "RunTotals",
    "ImageCounts",
    "RequestFigures",
    "TooManyFailuresError",
    "check_failure_rate",
    "emit_completed",
    "markdown_table",
    "publish_summary",
]

T = TypeVar("T")
F = TypeVar("F")
R = TypeVar("R", bound=BaseModel)
EVENT_PREFIX = "prefect_roboflow"
SAMPLE_ROWS = 5
#: A cached rerun's batches grow (see `BatchRun`): by this factor after each batch that sent nothing,
BATCH_GROWTH = 4
#: up to this many times ``batch_size`` images,
MAX_BATCH_GROWTH = 16
#: and this many bytes of files (a batch's files are in memory while its task runs).
GROWN_BATCH_BYTES = 64 * 2**20


@dataclass
class StepStats(StepReport):
    """What one step did over a run: its batches' reports added up, for the step table artifact."""

    batches: int = 0
    requests: int = 0
    retries: int = 0
    server_seconds: float = 0.0
    concurrency_limit: int = 0  # the server's adaptive limit at the step's last answer
    concurrency_peak: int = 0
    per_server: Counter[str] = field(default_factory=Counter)  # answers by server base URL

    def add(self, report: StepReport) -> None:
        """Fold one batch's report in."""
        self.batches += 1
        self.items += report.items
        self.cached += report.cached
        self.sent += report.sent
        self.failed += report.failed
        self.seconds += report.seconds
        self.requests += len(report.infos)
        self.retries += sum(i.attempts - 1 for i in report.infos)
        self.server_seconds += sum(i.server_time or 0.0 for i in report.infos)
        self.per_server.update(i.server for i in report.infos)
        if report.infos:
            self.concurrency_limit = report.infos[-1].concurrency_limit
            self.concurrency_peak = max(self.concurrency_peak, *(i.concurrency_limit for i in report.infos))

    def row(self) -> dict[str, Any]:
        """The step's row of the table artifact."""
        counts = ("batches", "items", "cached", "sent", "failed", "requests", "retries", "concurrency_limit")
        return {
            "step": self.step,
            "model": self.model,
            **{name: getattr(self, name) for name in counts},
            "server_seconds": round(self.server_seconds, 3),
            "wall_seconds": round(self.seconds, 3),
            "concurrency_peak": self.concurrency_peak,
            "requests_per_server": ", ".join(f"{url}: {n}" for url, n in sorted(self.per_server.items())),
        }


class RequestFigures(BaseModel):
    """What a flow run asked of the server, summed over its steps."""

    requests: int
    retries: int
    server_seconds: float
    from_cache: int


class ImageCounts(RequestFigures):
    """A flow result's image counts: taken, with a result, failed."""

    images: int
    succeeded: int
    failed: int
    indexed: int = 0  # rows this run added to its vector index (``index_path``)


class TooManyFailuresError(RuntimeError):
    """More images failed than the flow's ``max_failure_rate`` allows (outputs are still written)."""


class Progress:
    """A progress artifact on the flow run, advanced by the images of each finished batch.

    Updates go to the API at most once per ``interval`` seconds (and always at the end): a
    cached rerun finishes a batch in milliseconds, and an API call per batch would dominate it.
    """

    def __init__(self, total: int, description: str, interval: float = 1.0) -> None:
        self.total = max(1, total)
        self.description = description
        self.done = 0
        self.interval = interval
        self._sent_at = time.monotonic()
        self._percent = 0.0
        self._id: UUID | None = None

    async def start(self) -> None:
        """Create the artifact, at 0%."""
        self._id = await acreate_progress_artifact(0.0, description=self.description)

    async def advance(self, count: int) -> None:
        """``count`` more images done."""
        self.done += count
        now = time.monotonic()
        if self._id is not None and (self.done >= self.total or now - self._sent_at >= self.interval):
            await self._send(min(100.0, 100.0 * self.done / self.total))

    async def end(self) -> None:
        """Every image done: 100% (a video's frames were estimated from its header)."""
        if self._id is not None and self._percent < 100.0:
            await self._send(100.0)

    async def _send(self, percent: float) -> None:
        assert self._id is not None
        await aupdate_progress_artifact(self._id, percent)
        self._sent_at, self._percent = time.monotonic(), percent


def pipelined(batches: Iterable[T], submit: Callable[[T], F], window: int = 2) -> Iterator[tuple[T, F]]:
    """Submit work for up to ``window`` batches ahead, yielding ``(batch, future)`` in order.

    While one batch's tasks finish (their last requests, then ~0.1 s of Prefect bookkeeping),
    the next is already reading its images and sending requests, so the server never idles
    between batches. The engine's concurrency limit still bounds the requests in flight.
    """
    pending: deque[tuple[T, F]] = deque()
    for batch in batches:
        pending.append((batch, submit(batch)))
        if len(pending) >= window:
            yield pending.popleft()
    while pending:
        yield pending.popleft()


def _known_size(record: ImageRecord) -> int | None:
    """A record's bytes without reading them: a video frame's, or a local file's size; None for a remote image."""
    return len(record.data) if record.data is not None else local_size(record.ref)


def _enter_sync_client() -> SyncClientContext:
    """The current sync client context entered (a new one when there is none)."""
    context = SyncClientContext.get() or SyncClientContext()
    return context.__enter__()


class RunTotals:
    """What a run's images and rows added up to, and the end of the run: the same for a plain run,
    a shard of a fanned-out job (which keeps them for its parent: `save`) and the parent (the
    shards' totals summed: `_run.fanout.FannedOut`). A flow builds its result from these alone,
    so one result builder and one `finish` serve all three.

    Attributes:
        images: How many images (a crop batch's parents, else its records) the run took.
        images_failed: How many of them some step failed.
        videos: How many of the source's references are videos (their frames are the run's images).
        statuses: Rows written, by ``status``.
        labels: Rows written, by ``label``.
        sample: The first rows written, for the summary.
    """

    def __init__(self, flow_key: str) -> None:
        self.flow_key = flow_key
        self.images = self.images_failed = self.videos = 0
        #: The run's image source, the assets' upstream (None where the run does not know it).
        self.source: Any = None
        self.statuses: Counter[str] = Counter()
        self.labels: Counter[str] = Counter()
        self.sample: list[dict[str, Any]] = []
        #: What the run warns its user of: logged as it happens, listed first in the summary.
        self.warnings: list[str] = []
        self._figures: dict[str, Any] = {"requests": 0, "retries": 0, "server_seconds": 0.0, "from_cache": 0}

    def warn(self, message: str) -> None:
        """Warn the run's user: a warning in the run's log now, and at the top of its summary."""
        get_run_logger().warning(message)
        self.warnings.append(message)

    def figures(self) -> dict[str, Any]:
        """The run's `RequestFigures`, as keyword arguments for a result model."""
        return dict(self._figures)

    def counts(self) -> dict[str, Any]:
        """The run's `ImageCounts` (with its `RequestFigures`), as keyword arguments for a result model."""
        return {
            "images": self.images,
            "succeeded": self.statuses["ok"],
            "failed": self.statuses["failed"],
            **self.figures(),
        }

    def sections(self) -> list[str]:
        """Markdown the run adds to its summary after the flow's own sections."""
        return []

    def tables(self) -> list[tuple[str, str, list[dict[str, Any]]]]:
        """The run's table artifacts: ``(key suffix, description, rows)``."""
        return []

    def dump(self) -> dict[str, Any]:
        """The totals as JSON values (the sample keeps its scalar columns only)."""
        scalar = (str, int, float, bool, type(None))
        return {
            "images": self.images,
            "images_failed": self.images_failed,
            "statuses": dict(self.statuses),
            "labels": dict(self.labels),
            "figures": self.figures(),
            "sample": [{k: v for k, v in row.items() if isinstance(v, scalar)} for row in self.sample],
        }

    def add(self, dumped: dict[str, Any]) -> None:
        """Fold in totals `dump` made (a shard's), checked: a stored file is input too.

        Raises:
            ValueError: when ``dumped`` does not hold totals.
        """
        try:
            images, failed = int(dumped.get("images", 0)), int(dumped.get("images_failed", 0))
            statuses = Counter({str(k): int(v) for k, v in dict(dumped.get("statuses", {})).items()})
            labels = Counter({str(k): int(v) for k, v in dict(dumped.get("labels", {})).items()})
            figures = {k: dict(dumped.get("figures", {})).get(k, 0) for k in self._figures}
            sample = [dict(row) for row in dumped.get("sample", [])]
        except (TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a run's totals: {exc}") from None
        self.images += images
        self.images_failed += failed
        self.statuses.update(statuses)
        self.labels.update(labels)
        for name, value in figures.items():
            self._figures[name] += value
        self.sample.extend(sample[: max(0, SAMPLE_ROWS - len(self.sample))])

    def models(self) -> list[str]:
        """The models the run's steps used (for its assets' metadata)."""
        return []

    async def finish(self, result: R, title: str, sections: Sequence[str], max_failure_rate: float) -> R:
        """The end of every run: its table artifacts, its outputs as assets, its summary, the
        completion event, then the failure rule over all the images it took."""
        figures = {"images": self.images, "rows": sum(self.statuses.values()), "failed": self.statuses["failed"]}
        locations = output_locations(result.model_dump(), flow_run.parameters or {})
        # The table artifacts and the assets task are independent requests: sent together.
        tables = [
            acreate_table_artifact(rows, key=f"{self.flow_key}-{name}", description=description)
            for name, description, rows in self.tables()
        ]
        assets = materialize_outputs(self.flow_key, locations, self.source, figures, self.models())
        keys, _ = await asyncio.gather(assets, asyncio.gather(*tables))
        extra = [assets_section(keys)] if keys else []
        warned = ["## Warnings\n\n" + "".join(f"- {w}\n" for w in self.warnings)] if self.warnings else []
        await publish_summary(self.flow_key, title, [*warned, *sections, *self.sections(), *extra])
        emit_completed(self.flow_key, result.model_dump())
        check_failure_rate(self.images_failed, self.images, max_failure_rate)
        return result


class BatchRun(RunTotals):
    """One flow run over the batches of an image source.

    Batches hold ``batch_size`` images, except on a cached rerun: after a batch that sent the
    server nothing (every result came from the cache), the next batches take `BATCH_GROWTH` times
    as many, up to `MAX_BATCH_GROWTH` × ``batch_size`` images and `GROWN_BATCH_BYTES` of files;
    the first batch that sends anything brings them back to ``batch_size``. A task run costs
    Prefect ~20 ms in the flow's process and ~70 ms on its server whatever its size, and a cached
    image ~0.1 ms, so a rerun over 2,400 cached images is 4 task runs instead of 19. A batch grows
    only over images whose size is known without reading them (local files, video frames), so the
    bytes a batch holds stay bounded; remote images keep ``batch_size``.

    Attributes:
        steps: Per-step figures, in the order the steps first reported.
    """

    def __init__(
        self, flow_key: str, images: ImageSource, batch_size: int, description: str, video: VideoSampling | None = None
    ) -> None:
        super().__init__(flow_key)
        if batch_size < 1:
            raise InvalidInputError("batch_size", f"must be at least 1, got {batch_size}")
        self.source = images
        self.batch_size = batch_size
        self.video = video
        self.expected, self.videos = count_records(images, video)  # a video's frames estimated from its header
        self.progress = Progress(self.expected, description)
        self.steps: dict[str, StepStats] = {}
        self._size = batch_size  # the next batch's size: grows over cached batches (`account`)

    def batches(self) -> Iterator[Batch]:
        """The source's records in batches labelled ``"i/n"`` (``n`` estimated: from the source's
        count and the current batch size), photos not read yet, a video's sampled frames decoded as
        the batches are made."""
        records = iter_records(self.source, self.video)
        held: list[ImageRecord] = []  # a record that did not fit the last batch
        taken = 0
        for index in itertools.count():
            size, batch, held = self._size, held, []
            grows = size > self.batch_size  # only then are the files' sizes looked at
            used = sum(_known_size(r) or 0 for r in batch) if grows else 0
            for record in records:
                known = _known_size(record) if grows else None
                if len(batch) >= self.batch_size and (
                    known is None or len(batch) >= size or used + known > GROWN_BATCH_BYTES
                ):
                    held = [record]
                    break
                used += known or 0
                batch.append(record)
            if not batch:
                return
            taken += len(batch)
            left = math.ceil(max(0, self.expected - taken) / self._size) if held else 0
            yield Batch(batch, f"{index + 1}/{index + 1 + left}")
            if not held:
                return

    async def process(self, submit: Callable[[Batch], PrefectFuture[Batch]], window: int = 2) -> AsyncIterator[Batch]:
        """Each batch after the steps ``submit`` chains for it, pipelined ``window`` batches deep.

        The step reports of each batch are accounted; progress advances once the caller is done with it.
        """
        # The progress artifact is created while the first batches already run.
        started = asyncio.ensure_future(self.progress.start())
        # One sync API client for every task of the run: a task run in a worker thread otherwise
        # opens its own (~20 ms of CPU each, mostly its TLS context: the warm run's largest cost).
        # The tasks are submitted from a context that holds it (Prefect's sync flows do the same),
        # entered and left inside that context, wherever this generator is closed.
        shared = contextvars.copy_context()
        client = shared.run(_enter_sync_client)
        try:
            for _, future in pipelined(self.batches(), lambda batch: shared.run(submit, batch), window):
                # The steps run in the task runner's threads meanwhile; the loop stays free for
                # the run's own requests (the progress artifact) while this waits.
                await asyncio.to_thread(future.wait)
                batch = future.result()
                self.account(batch)
                yield batch
                await started
                await self.progress.advance(len(batch.parents or batch.records))
            await started  # also when there was no batch
            await self.progress.end()
        finally:
            if not started.done():
                started.cancel()
            shared.run(client.__exit__, None, None, None)

    def account(self, batch: Batch) -> None:
        """Fold a finished batch's step reports and image counts into the run's figures; the next
        batches grow when it sent nothing, and are ``batch_size`` again when it sent anything."""
        for report in batch.reports:
            self.steps.setdefault(report.step, StepStats(report.step, report.model)).add(report)
        images = batch.parents or batch.records
        self.images += len(images)
        self.images_failed += sum(not r.ok for r in images)
        if any(report.sent for report in batch.reports):
            self._size = self.batch_size
        else:
            self._size = min(self._size * BATCH_GROWTH, self.batch_size * MAX_BATCH_GROWTH)

    def write(self, sink: ParquetSink, rows: list[dict[str, Any]]) -> None:
        """Write rows to the run's table, counting their statuses and labels."""
        self.statuses.update(row["status"] for row in rows)
        self.labels.update(row["label"] for row in rows if row.get("label") is not None)
        self.sample.extend(rows[: max(0, SAMPLE_ROWS - len(self.sample))])
        sink.write(rows)

    def figures(self) -> dict[str, Any]:
        """The run's `RequestFigures`, summed over its steps."""
        steps = self.steps.values()
        return {
            "requests": sum(s.requests for s in steps),
            "retries": sum(s.retries for s in steps),
            "server_seconds": round(sum(s.server_seconds for s in steps), 6),
            "from_cache": sum(s.cached for s in steps),
        }

    def models(self) -> list[str]:
        """The models the run's steps used."""
        return [s.model for s in self.steps.values()]

    def tables(self) -> list[tuple[str, str, list[dict[str, Any]]]]:
        """The per-step table."""
        return [("steps", f"Per-step figures of this {self.flow_key} run.", [s.row() for s in self.steps.values()])]


def check_failure_rate(failed: int, images: int, max_failure_rate: float) -> None:
    """The flows' failure rule: raise `TooManyFailuresError` when more than the allowed share failed."""
    if images and failed / images > max_failure_rate:
        raise TooManyFailuresError(
            f"{failed} of {images} images failed ({failed / images:.0%}), above max_failure_rate={max_failure_rate:.0%}"
        )


async def publish_summary(flow_key: str, title: str, sections: Sequence[str]) -> None:
    """The run's markdown summary artifact."""
    text = "\n\n".join([f"# {title}", *sections])
    await acreate_markdown_artifact(text, key=f"{flow_key}-summary", description=title)


def emit_completed(flow_key: str, summary: dict[str, Any]) -> None:
    """``prefect_roboflow.<flow>.completed``, for automations to match."""
    run_id = flow_run.get_id() or "unknown"
    emit_event(
        event=f"{EVENT_PREFIX}.{flow_key.replace('-', '_')}.completed",
        resource={"prefect.resource.id": f"{EVENT_PREFIX}.flow-run.{run_id}", "prefect.resource.name": flow_key},
        payload=summary,
    )


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A small markdown table."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)
