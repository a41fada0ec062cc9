"""`embed_images`: a folder, glob or list of images → a parquet table of embeddings."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pyarrow as pa
from prefect import flow
from prefect_roboflow.blocks.tasks import model_label

from ._common import (
    EmbeddingFamily,
    Progress,
    RequestFigures,
    StepStats,
    check_failure_rate,
    embedding_model,
    emit_completed,
    ensure_out_dir,
    markdown_table,
    pipelined,
    publish_step_table,
    publish_summary,
    resolve_cache,
    resolve_server,
)
from ._output import ParquetSink, embedding_type
from ._sources import ImageSource, count_images, iter_batches
from ._steps import embed_submitter

FLOW_KEY = "embed-images"

EMBEDDINGS_SCHEMA = pa.schema(
    [
        ("image_ref", pa.string()),
        ("image_sha256", pa.string()),
        ("model", pa.string()),
        ("version", pa.string()),
        ("embedding", embedding_type()),
        ("status", pa.string()),
        ("error", pa.string()),
    ]
)


class EmbedImagesResult(RequestFigures):
    """What an `embed_images` run did and where its table is."""

    images: int
    succeeded: int
    failed: int
    embeddings_path: str


@flow(name="embed-images", flow_run_name="embed-images[{model}]", validate_parameters=True)
def embed_images(
    images: ImageSource,
    out_dir: str,
    server: str | None = None,
    model: EmbeddingFamily = "clip",
    version: str | None = None,
    batch_size: int = 64,
    cache_storage: str | None = None,
    max_failure_rate: float = 0.5,
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

    Returns:
        Counts and the table's path. Rows: ``image_ref, image_sha256, model, version,
        embedding, status ("ok" | "failed"), error``.
    """
    embedder = embedding_model(model, version, resolve_server(server))
    cache, _ = resolve_cache(cache_storage)
    out = ensure_out_dir(out_dir)
    total_batches = math.ceil(count_images(images) / batch_size)
    progress = Progress(total_batches, f"Embedding images with {model_label(embedder)}")
    stats = StepStats("embed", model_label(embedder))
    statuses: Counter[str] = Counter()
    submit = embed_submitter(embedder, cache, total_batches)
    with ParquetSink(out / "embeddings.parquet", EMBEDDINGS_SCHEMA) as sink:
        for _, (items, future) in pipelined(enumerate(iter_batches(images, batch_size)), submit):
            outcomes, report = future.result()
            results = iter(outcomes)
            rows = [_row(item, next(results) if item.ok else None, embedder) for item in items]
            report.failed += sum(not item.ok for item in items)
            report.into(stats)
            statuses.update(row["status"] for row in rows)
            sink.write(rows)
            progress.advance()
        path = sink.path
    result = EmbedImagesResult(
        images=sum(statuses.values()),
        succeeded=statuses["ok"],
        failed=statuses["failed"],
        **RequestFigures.of(stats),
        embeddings_path=str(path),
    )
    publish_step_table(FLOW_KEY, [stats])
    publish_summary(
        FLOW_KEY,
        f"Embedded {result.succeeded} of {result.images} images with {model_label(embedder)}",
        [
            markdown_table([result.model_dump()], list(EmbedImagesResult.model_fields)),
            f"Table: `{path}`",
        ],
    )
    emit_completed(FLOW_KEY, result.model_dump())
    check_failure_rate(result.failed, result.images, max_failure_rate)
    return result


def _row(item: Any, outcome: Any, embedder: Any) -> dict[str, Any]:
    if not item.ok or isinstance(outcome, str):
        return {
            "image_ref": item.ref,
            "image_sha256": item.sha256,
            "model": type(embedder).__name__,
            "version": embedder.version,
            "embedding": None,
            "status": "failed",
            "error": item.error or outcome,
        }
    return {
        "image_ref": item.ref,
        "image_sha256": item.sha256,
        "model": type(embedder).__name__,
        "version": embedder.version,
        "embedding": outcome.tolist(),
        "status": "ok",
        "error": None,
    }
