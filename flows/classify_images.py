"""`classify_images`: whole-image zero-shot classification against label prompts."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np
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
from ._steps import embed_labels, embed_submitter, zero_shot

FLOW_KEY = "classify-images"

CLASSIFICATIONS_SCHEMA = pa.schema(
    [
        ("image_ref", pa.string()),
        ("image_sha256", pa.string()),
        ("label", pa.string()),
        ("label_score", pa.float32()),
        ("label_scores", pa.list_(pa.float32())),
        ("model", pa.string()),
        ("version", pa.string()),
        ("embedding", embedding_type()),
        ("status", pa.string()),
        ("error", pa.string()),
    ]
)


class ClassifyImagesResult(RequestFigures):
    """What a `classify_images` run did and where its table is."""

    images: int
    succeeded: int
    failed: int
    label_counts: dict[str, int]
    classifications_path: str


@flow(name="classify-images", flow_run_name="classify-images[{model}]", validate_parameters=True)
def classify_images(
    images: ImageSource,
    labels: list[str],
    out_dir: str,
    server: str | None = None,
    model: EmbeddingFamily = "clip",
    version: str | None = None,
    min_score: float | None = None,
    batch_size: int = 64,
    cache_storage: str | None = None,
    max_failure_rate: float = 0.5,
) -> ClassifyImagesResult:
    """Label each image with the prompt it is most similar to; write ``classifications.parquet``.

    Image embeddings share the cache with `embed_images`, so classifying images that were
    already embedded with the same model sends only the label prompts (once, cached too).

    Args:
        images: A folder, a glob, or a list of paths and https URLs.
        labels: Label prompts, e.g. ``["a photo of a cat", "a photo of a dog"]``.
        out_dir: Folder for the output table.
        server: A saved `InferenceServer` block name or a URL (default: ``INFERENCE_SERVER_URL``,
            then ``http://localhost:9001``).
        model: ``"clip"`` or ``"perception_encoder"``.
        version: Model version; its default when omitted.
        min_score: Images whose best similarity is below this are labelled ``"unknown"``.
        batch_size: Images per task run.
        cache_storage: Folder or saved file-system block (``"type/name"``) for per-item results.
        max_failure_rate: The run fails (after writing its table) above this share of failed images.
    """
    embedder = embedding_model(model, version, resolve_server(server))
    cache, result_storage = resolve_cache(cache_storage)
    out = ensure_out_dir(out_dir)
    label_vectors = embed_labels.with_options(result_storage=result_storage)(embedder, labels)
    total_batches = math.ceil(count_images(images) / batch_size)
    progress = Progress(total_batches, f"Classifying images with {model_label(embedder)}")
    stats = StepStats("embed", model_label(embedder))
    statuses: Counter[str] = Counter()
    labels_found: Counter[str] = Counter()
    model_fields = {"model": type(embedder).__name__, "version": embedder.version}
    with ParquetSink(out / "classifications.parquet", CLASSIFICATIONS_SCHEMA) as sink:
        submit = embed_submitter(embedder, cache, total_batches)
        for _, (items, future) in pipelined(enumerate(iter_batches(images, batch_size)), submit):
            outcomes, report = future.result()
            readable = [item for item in items if item.ok]
            report.failed += len(items) - len(readable)
            report.into(stats)
            results = iter(outcomes)
            per_item = {id(item): next(results) for item in readable}
            vectors = [(item, v) for item, v in per_item.items() if not isinstance(v, str)]
            labelled = {}
            if vectors:
                names, best, scores = zero_shot(np.vstack([v for _, v in vectors]), label_vectors, labels, min_score)
                labelled = {key: (names[j], float(best[j]), scores[j], v) for j, (key, v) in enumerate(vectors)}
            rows: list[dict[str, Any]] = []
            for item in items:
                base = {**model_fields, "image_ref": item.ref, "image_sha256": item.sha256}
                if id(item) in labelled:
                    label, score, all_scores, vector = labelled[id(item)]
                    labels_found[label] += 1
                    rows.append(
                        {
                            **base,
                            "label": label,
                            "label_score": score,
                            "label_scores": all_scores.tolist(),
                            "embedding": vector.tolist(),
                            "status": "ok",
                            "error": None,
                        }
                    )
                else:
                    rows.append({**base, "status": "failed", "error": item.error or per_item.get(id(item))})
            statuses.update(r["status"] for r in rows)
            sink.write(rows)
            progress.advance()
        path = sink.path
    result = ClassifyImagesResult(
        images=sum(statuses.values()),
        succeeded=statuses["ok"],
        failed=statuses["failed"],
        label_counts=dict(labels_found.most_common()),
        **RequestFigures.of(stats),
        classifications_path=str(path),
    )
    publish_step_table(FLOW_KEY, [stats])
    publish_summary(
        FLOW_KEY,
        f"Classified {result.succeeded} of {result.images} images with {model_label(embedder)}",
        [
            markdown_table([{"label": k, "count": v} for k, v in labels_found.most_common()], ["label", "count"]),
            f"Table: `{path}`",
        ],
    )
    emit_completed(FLOW_KEY, result.model_dump())
    check_failure_rate(result.failed, result.images, max_failure_rate)
    return result
