"""`embed_images`: a folder, glob or list of images → a parquet table of embeddings."""

from __future__ import annotations

import asyncio

from . import steps
from ._outputs.files import ParquetSink
from ._outputs.tables import EMBEDDINGS_SCHEMA, record_rows, video_schema
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

__all__ = ["EMBEDDINGS_SCHEMA", "EmbedImagesResult", "embed_images"]

FLOW_KEY = "embed-images"


class EmbedImagesResult(ImageCounts):
    """What an `embed_images` run did and where its table is."""

    embeddings_path: str


@roboflow_flow(name="embed-images", flow_run_name="embed-images[{model}]", validate_parameters=True)
async def embed_images(
    images: ImageSource,
    out_dir: str,
    server: str | list[str] | None = None,
    model: EmbeddingFamily = "clip",
    version: str | None = None,
    batch_size: int = 128,
    cache_storage: str | None = None,
    max_failure_rate: float = 0.5,
    index_path: str | None = None,
    fan_out: FanOut | None = None,
    shard: Shard | None = None,
    video_fps: float | None = 1.0,
    video_sample: str = "fps",
) -> EmbedImagesResult:
    """Embed every image and write ``embeddings.parquet`` to ``out_dir``.

    Args:
        images: A folder, a glob (``"photos/**/*.jpg"``), or a list of paths and https URLs.
        out_dir: Folder or bucket location (``s3://bucket/prefix/``, any fsspec URL,
            ``block://s3-bucket/<name>/<prefix>``) for the output table.
        server: A saved `InferenceServer` block name, a URL, or a list of URLs; defaults to the
            ``INFERENCE_SERVER_URL`` environment variable, then ``http://localhost:9001``.
        model: ``"clip"`` or ``"perception_encoder"``.
        version: Model version; the block's default when omitted.
        batch_size: Images per task run (each task fans its batch out concurrently; two batches'
            files are in memory at once). Over cached images the batches grow (see `BatchRun`).
        cache_storage: Where per-image results are kept: a folder, or a saved file-system block
            as ``"block-type/name"``; ``$PREFECT_HOME/prefect-roboflow-cache`` by default.
        max_failure_rate: The run fails (after writing its table) when a larger share of images fails.
        index_path: A vector index (folder, object-storage URL or ``block://`` path) to add this run's new rows to,
            for `search_images` and `VectorIndex` at millions of rows.
        fan_out: Split the job into shards of ``fan_out.shard_size`` images that run as sub-runs of
            this flow's deployment on the workers of its pool (see `FanOut`); the table is then a
            folder ``embeddings/`` of one part per shard, read as one table by pyarrow, pandas, duckdb.
        shard: Set by a fanned-out run on its sub-runs: the part of the job this run does.
        video_fps: For videos among ``images`` (``.mp4 .mov .avi .mkv .webm .m4v``): frames taken
            per second of video time; None takes every frame.
        video_sample: ``"fps"`` (a fixed rate), ``"keyframes"`` (the container's keyframes) or
            ``"scene"`` (a frame when the picture changes; see `_video.sample`).

    Returns:
        Counts and the table's path. Rows: ``image_ref, image_sha256, model, version,
        embedding, status ("ok" | "failed"), error``.
    """
    video = check_video(video_fps, video_sample)
    embedder = embedding_model(model, version, resolve_server(server))
    cache = resolve_cache(cache_storage)
    out = resolve_out_dir(out_dir)
    check_index(index_path, embedder)
    run: RunTotals
    if fan_out is not None:  # the shards write the parts; the parent adds them to the index, one by one
        run = fanned = await fanout.fan_out(FLOW_KEY, images, out, fan_out, {"embeddings": EMBEDDINGS_SCHEMA})
        table, parts = fanned.folder("embeddings"), fanned.parts("embeddings")
    else:
        description = f"Embedding images with {embedder.label}"
        run = await BatchRun.listed(FLOW_KEY, images, batch_size, description, video=video, shard=shard)
        path = shard.table(out, "embeddings") if shard else join(out, "embeddings.parquet")
        schema = video_schema(EMBEDDINGS_SCHEMA) if run.videos else EMBEDDINGS_SCHEMA
        async with ParquetSink(path, schema) as sink:
            async for batch in run.process(lambda batch: steps.embed.submit(embedder, batch, cache)):
                await run.write(sink, record_rows(batch.records, embedder, schema))
        table, parts = str(sink.path), [sink.path]
    indexed = 0 if index_path is None else await asyncio.to_thread(_add_to_index, parts, index_path)
    result = EmbedImagesResult(**run.counts(), embeddings_path=table, indexed=indexed)
    if shard is not None:
        await asyncio.to_thread(shard.save, out, run)
    summary = [markdown_table([result.model_dump()], list(EmbedImagesResult.model_fields)), f"Table: `{table}`"]
    title = f"Embedded {result.succeeded} of {result.images} images with {embedder.label}"
    return await run.finish(result, title, summary, max_failure_rate)


def _add_to_index(parts: list[str], index_path: str) -> int:
    """The table's parts added to the vector index, one by one: the rows added (on a worker thread)."""
    return sum(update_index_from_table(part, index_path).added for part in parts)
