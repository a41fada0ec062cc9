"""The batch run: one flow run over the batches of an image source.

A flow says what to do with one batch (a chain of steps) and what rows it makes; `BatchRun`
does the rest the same way for every flow, from the modules beside it: the batches (`growth`),
their tasks pipelined (`pipeline`), progress (`progress`), per-step figures (`stats`), and the end
every run shares (`totals`: artifacts, assets, event, failure rule)::

    run = await BatchRun.listed("embed-images", images, batch_size, f"Embedding images with {model.label}")
    async with ParquetSink(path, EMBEDDINGS_SCHEMA) as sink:
        async for batch in run.process(lambda b: steps.embed.submit(model, b, cache)):
            await run.write(sink, rows_of(batch))
    return await run.finish(result, title, sections, max_failure_rate)

Nothing in it holds the flow's event loop: the listing, each next batch (a video's frames
decoded), the waits on the tasks and the table's writes run on worker threads.

A fanned-out job's parent has no batches: it sums its shards' `RunTotals` (`_run.fanout.FannedOut`),
and the flow builds its result from those and ends with the same `RunTotals.finish`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from prefect.futures import PrefectFuture

from .._outputs.files import ParquetSink
from .._steps.sources import ImageSource, SourceListing
from .._video.sample import VideoSampling
from ..records import Batch
from .growth import BatchSizes
from .pipeline import finished
from .progress import Progress
from .stats import StepFigures
from .totals import RunTotals

if TYPE_CHECKING:
    from .fanout import Shard

__all__ = ["BatchRun"]


class BatchRun(RunTotals):
    """One flow run over the batches of an image source (batches grow over a cached rerun: `growth`).

    Attributes:
        steps: Per-step figures, in the order the steps first reported.
    """

    def __init__(
        self, flow_key: str, images: ImageSource, batch_size: int, description: str, video: VideoSampling | None = None
    ) -> None:
        super().__init__(flow_key)
        self.sizes = BatchSizes(batch_size)
        self.source = images
        self.video = video
        self.listing = SourceListing(images, video)  # the one listing of the run
        self.expected, self.videos = self.listing.expected, self.listing.videos
        self.progress = Progress(self.expected, description)
        self.steps = StepFigures()

    @classmethod
    async def listed(
        cls,
        flow_key: str,
        images: ImageSource,
        batch_size: int,
        description: str,
        video: VideoSampling | None = None,
        shard: Shard | None = None,
    ) -> BatchRun:
        """A run over ``images`` (a shard's run: over its manifest's references instead), its source
        listed on a worker thread (a manifest's or a bucket's reads, a video's header): the flow's
        event loop does not wait on storage."""

        def make() -> BatchRun:
            return cls(flow_key, shard.refs() if shard else images, batch_size, description, video)

        return await asyncio.to_thread(make)

    def batches(self) -> Iterator[Batch]:
        """The source's records in batches labelled ``"i/n"``, photos not read yet, a video's
        sampled frames decoded as the batches are made."""
        return self.sizes.cut(self.listing.records(), self.expected)

    async def process(self, submit: Callable[[Batch], PrefectFuture[Batch]], window: int = 2) -> AsyncIterator[Batch]:
        """Each batch after the steps ``submit`` chains for it, pipelined ``window`` batches deep.

        The step reports of each batch are accounted; progress advances once the caller is done with it.
        """
        # The progress artifact is created while the first batches already run.
        started = asyncio.ensure_future(self.progress.start())
        try:
            async with aclosing(finished(self.batches(), submit, window)) as batches:
                async for batch in batches:
                    self.account(batch)
                    yield batch
                    await started
                    await self.progress.advance(len(batch.parents or batch.records))
            await started  # also when there was no batch
            await self.progress.end()
        finally:
            if not started.done():
                started.cancel()
            self.listing.close()

    def account(self, batch: Batch) -> None:
        """Fold a finished batch's step reports and image counts into the run's figures, and size the next batches."""
        self.steps.add(batch.reports)
        images = batch.parents or batch.records
        self.images += len(images)
        self.images_failed += sum(not r.ok for r in images)
        self.sizes.after(sent=any(report.sent for report in batch.reports))

    async def write(self, sink: ParquetSink, rows: list[dict[str, Any]]) -> None:
        """Write rows to the run's table (on a worker thread: parquet encoding, a part's upload),
        counting their statuses and labels."""
        self.tally(rows)
        await asyncio.to_thread(sink.write, rows)

    def figures(self) -> dict[str, Any]:
        """The run's `RequestFigures`, summed over its steps."""
        return self.steps.figures()

    def models(self) -> list[str]:
        """The models the run's steps used."""
        return self.steps.models()

    def tables(self) -> list[tuple[str, str, list[dict[str, Any]]]]:
        """The per-step table."""
        return [("steps", f"Per-step figures of this {self.flow_key} run.", self.steps.rows())]
