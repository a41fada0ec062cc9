"""`classify_images`: whole-image zero-shot classification against label prompts."""

from __future__ import annotations

import asyncio
from typing import Any

from prefect.futures import PrefectFuture

from . import steps
from ._outputs.files import ParquetSink
from ._outputs.tables import CLASSIFICATIONS_SCHEMA, record_rows, video_schema
from ._run import fanout
from ._run.artifacts import markdown_table
from ._run.batch import BatchRun
from ._run.fanout import FanOut, Shard
from ._run.flow import roboflow_flow
from ._run.parameters import check_index, check_video, resolve_out_dir
from ._run.totals import ImageCounts, RunTotals
from ._steps.cache import resolve_cache
from ._steps.models import EmbeddingFamily, embedding_model, resolve_server
from ._steps.sources import ImageSource
from ._storage.access import join
from .vector_index import update_index_from_table

__all__ = ["CLASSIFICATIONS_SCHEMA", "ClassifyImagesResult", "classify_images"]

FLOW_KEY = "classify-images"


class ClassifyImagesResult(ImageCounts):
    """What a `classify_images` run did and where its table is."""

    label_counts: dict[str, int]
    classifications_path: str


@roboflow_flow(name="classify-images", flow_run_name="classify-images[{model}]", validate_parameters=True)
async def classify_images(
    images: ImageSource,
    labels: list[str],
    out_dir: str,
    server: str | list[str] | None = None,
    model: EmbeddingFamily = "clip",
    version: str | None = None,
    min_score: float | None = None,
    batch_size: int = 128,
    cache_storage: str | None = None,
    max_failure_rate: float = 0.5,
    index_path: str | None = None,
    video_fps: float | None = 1.0,
    video_sample: str = "fps",
    fan_out: FanOut | None = None,
    shard: Shard | None = None,
) -> ClassifyImagesResult:
    """Label each image with the prompt it is most similar to; write ``classifications.parquet``.

    Image embeddings share the cache with `embed_images`, so classifying images that were
    already embedded with the same model sends only the label prompts (once, cached too).

    Args:
        images: A folder, a glob, or a list of paths and https URLs.
        labels: Label prompts, e.g. ``["a photo of a cat", "a photo of a dog"]``.
        out_dir: Folder or bucket location (``s3://bucket/prefix/``, any fsspec URL,
            ``block://s3-bucket/<name>/<prefix>``) for the output table.
        server: A saved `InferenceServer` block name, a URL or a list of URLs (default: ``INFERENCE_SERVER_URL``,
            then ``http://localhost:9001``).
        model: ``"clip"`` or ``"perception_encoder"``.
        version: Model version; its default when omitted.
        min_score: Images whose best similarity is below this are labelled ``"unknown"``.
        batch_size: Images per task run.
        cache_storage: Folder or saved file-system block (``"type/name"``) for per-item results.
        max_failure_rate: The run fails (after writing its table) above this share of failed images.
        index_path: A vector index (folder, object-storage URL or ``block://`` path) to add this run's new rows to.
        video_fps: For videos among ``images`` (``.mp4 .mov .avi .mkv .webm .m4v``): frames taken
            per second of video time; None takes every frame.
        video_sample: ``"fps"`` (a fixed rate), ``"keyframes"`` (the container's keyframes) or
            ``"scene"`` (a frame when the picture changes; see `_video.sample`).
        fan_out: Split the job into shards that run as sub-runs of this flow's deployment (see
            `embed_images`); the table is then a folder ``classifications/`` of one part per shard,
            and the label counts are the shards' summed.
        shard: Set by a fanned-out run on its sub-runs: the part of the job this run does.
    """
    video = check_video(video_fps, video_sample)
    embedder = embedding_model(model, version, resolve_server(server))
    cache = resolve_cache(cache_storage)
    out = resolve_out_dir(out_dir)
    check_index(index_path, embedder)
    run: RunTotals
    if fan_out is not None:
        run = fanned = await fanout.fan_out(FLOW_KEY, images, out, fan_out, {"classifications": CLASSIFICATIONS_SCHEMA})
        table, parts = fanned.folder("classifications"), fanned.parts("classifications")
    else:
        description = f"Classifying images with {embedder.label}"
        run = await BatchRun.listed(FLOW_KEY, images, batch_size, description, video=video, shard=shard)
        label_set = await asyncio.to_thread(steps.embed_labels, embedder, labels, cache)

        def submit(batch: steps.Batch) -> PrefectFuture[steps.Batch]:
            embedded: Any = steps.embed.submit(embedder, batch, cache)  # resolved by Prefect before classify runs
            return steps.classify.submit(embedded, label_set, min_score)

        path = shard.table(out, "classifications") if shard else join(out, "classifications.parquet")
        schema = video_schema(CLASSIFICATIONS_SCHEMA) if run.videos else CLASSIFICATIONS_SCHEMA
        async with ParquetSink(path, schema) as sink:
            async for batch in run.process(submit):
                await run.write(sink, record_rows(batch.records, embedder, schema))
        table, parts = str(sink.path), [sink.path]
    result = ClassifyImagesResult(
        **run.counts(),
        label_counts=dict(run.labels.most_common()),
        classifications_path=table,
        indexed=0 if index_path is None else await asyncio.to_thread(_add_to_index, parts, index_path),
    )
    if shard is not None:
        await asyncio.to_thread(shard.save, out, run)
    counts = [{"label": k, "count": v} for k, v in run.labels.most_common()]
    summary = [markdown_table(counts, ["label", "count"]), f"Table: `{table}`"]
    title = f"Classified {result.succeeded} of {result.images} images with {embedder.label}"
    return await run.finish(result, title, summary, max_failure_rate)


def _add_to_index(parts: list[str], index_path: str) -> int:
    """The table's parts added to the vector index, one by one: the rows added (on a worker thread)."""
    return sum(update_index_from_table(part, index_path).added for part in parts)
