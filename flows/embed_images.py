"""`embed_images`: a folder, glob or list of images → a parquet table of embeddings."""

from __future__ import annotations

from . import steps
from ._config import EmbeddingFamily, check_index, embedding_model, ensure_out_dir, resolve_cache, resolve_server
from ._flow import roboflow_flow
from ._output import ParquetSink
from ._run import BatchRun, ImageCounts, markdown_table
from ._sources import ImageSource
from ._tables import EMBEDDINGS_SCHEMA, record_rows
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
) -> EmbedImagesResult:
    """Embed every image and write ``embeddings.parquet`` to ``out_dir``.

    Args:
        images: A folder, a glob (``"photos/**/*.jpg"``), or a list of paths and https URLs.
        out_dir: Folder for the output table.
        server: A saved `InferenceServer` block name, or a URL; defaults to the
            ``INFERENCE_SERVER_URL`` environment variable, then ``http://localhost:9001``.
        model: ``"clip"`` or ``"perception_encoder"``.
        version: Model version; the block's default when omitted.
        batch_size: Images per task run (each task fans its batch out concurrently).
        cache_storage: Where per-image results are kept: a folder, or a saved file-system block
            as ``"block-type/name"``; ``$PREFECT_HOME/prefect-roboflow-cache`` by default.
        max_failure_rate: The run fails (after writing its table) when a larger share of images fails.
        index_path: A vector index (folder or object-storage URL) to add this run's new rows to,
            for `search_images` and `VectorIndex` at millions of rows.

    Returns:
        Counts and the table's path. Rows: ``image_ref, image_sha256, model, version,
        embedding, status ("ok" | "failed"), error``.
    """
    embedder = embedding_model(model, version, resolve_server(server))
    cache = resolve_cache(cache_storage)
    out = ensure_out_dir(out_dir)
    check_index(index_path, embedder)
    run = BatchRun(FLOW_KEY, images, batch_size, f"Embedding images with {embedder.label}")
    with ParquetSink(out / "embeddings.parquet", EMBEDDINGS_SCHEMA) as sink:
        async for batch in run.process(lambda batch: steps.embed.submit(embedder, batch, cache)):
            run.write(sink, record_rows(batch.records, embedder, EMBEDDINGS_SCHEMA))
    result = EmbedImagesResult(
        **run.counts(),
        embeddings_path=str(sink.path),
        indexed=0 if index_path is None else update_index_from_table(sink.path, index_path).added,
    )
    summary = [markdown_table([result.model_dump()], list(EmbedImagesResult.model_fields)), f"Table: `{sink.path}`"]
    title = f"Embedded {result.succeeded} of {result.images} images with {embedder.label}"
    return await run.finish(result, title, summary, max_failure_rate)
