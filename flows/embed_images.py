"""`embed_images`: a folder, glob or list of images → a parquet table of embeddings."""

from __future__ import annotations

from . import steps
from ._outputs.files import ParquetSink
from ._outputs.tables import EMBEDDINGS_SCHEMA, record_rows
from ._run.batch import BatchRun, ImageCounts, markdown_table
from ._run.fanout import FanOut, Shard, fan_out, finish_fanned_out
from ._run.flow import roboflow_flow
from ._run.parameters import EmbedImagesParameters, check_index, resolve_out_dir
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
    batch_size: int = 64,
    cache_storage: str | None = None,
    max_failure_rate: float = 0.5,
    index_path: str | None = None,
    fan_out: FanOut | None = None,
    shard: Shard | None = None,
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
        batch_size: Images per task run (each task fans its batch out concurrently).
        cache_storage: Where per-image results are kept: a folder, or a saved file-system block
            as ``"block-type/name"``; ``$PREFECT_HOME/prefect-roboflow-cache`` by default.
        max_failure_rate: The run fails (after writing its table) when a larger share of images fails.
        index_path: A vector index (folder, object-storage URL or ``block://`` path) to add this run's new rows to,
            for `search_images` and `VectorIndex` at millions of rows.
        fan_out: Split the job into shards of ``fan_out.shard_size`` images that run as sub-runs of
            this flow's deployment on the workers of its pool (see `FanOut`); the table is then a
            folder ``embeddings/`` of one part per shard, read as one table by pyarrow, pandas, duckdb.
        shard: Set by a fanned-out run on its sub-runs: the part of the job this run does.

    Returns:
        Counts and the table's path. Rows: ``image_ref, image_sha256, model, version,
        embedding, status ("ok" | "failed"), error``.
    """
    EmbedImagesParameters.check(locals())
    embedder = embedding_model(model, version, resolve_server(server))
    cache = resolve_cache(cache_storage)
    out = resolve_out_dir(out_dir)
    check_index(index_path, embedder)
    if fan_out is not None:
        return await _fanned_out(images, out, fan_out, embedder.label, index_path, max_failure_rate)
    run = BatchRun(FLOW_KEY, shard.refs() if shard else images, batch_size, f"Embedding images with {embedder.label}")
    table = shard.table(out, "embeddings") if shard else join(out, "embeddings.parquet")
    with ParquetSink(table, EMBEDDINGS_SCHEMA) as sink:
        async for batch in run.process(lambda batch: steps.embed.submit(embedder, batch, cache)):
            run.write(sink, record_rows(batch.records, embedder, EMBEDDINGS_SCHEMA))
    result = EmbedImagesResult(
        **run.counts(),
        embeddings_path=str(sink.path),
        indexed=0 if index_path is None else update_index_from_table(sink.path, index_path).added,
    )
    if shard is not None:
        shard.save_result(out, result)
    summary = [markdown_table([result.model_dump()], list(EmbedImagesResult.model_fields)), f"Table: `{sink.path}`"]
    title = f"Embedded {result.succeeded} of {result.images} images with {embedder.label}"
    return await run.finish(result, title, summary, max_failure_rate)


async def _fanned_out(
    images: ImageSource, out: str, plan: FanOut, label: str, index_path: str | None, max_failure_rate: float
) -> EmbedImagesResult:
    """The job as shards on the flow's deployment; the parts then go into the index, one by one."""
    done = await fan_out(FLOW_KEY, images, out, plan, "embeddings", EMBEDDINGS_SCHEMA)
    indexed = 0 if index_path is None else sum(update_index_from_table(p, index_path).added for p in done.parts)
    result = EmbedImagesResult(**{**done.counts, "indexed": indexed}, embeddings_path=done.table)
    title = f"Embedded {result.succeeded} of {result.images} images with {label} in {len(done.parts)} shards"
    summary = [markdown_table([result.model_dump()], list(EmbedImagesResult.model_fields)), *done.sections]
    return await finish_fanned_out(FLOW_KEY, result, title, summary, max_failure_rate)
