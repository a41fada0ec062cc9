"""`detect_crop_classify`: few-shot detection → crops → embeddings → zero-shot labels.

For each batch of images: OWLv2 finds objects like the example boxes (`detect` task), each
detection is cropped with supervision and embedded with CLIP or Perception Encoder (`embed`
task), and each crop gets the label prompt it is most similar to (`classify` task, which also
draws the annotated images). Label prompts are embedded once per run, and cached.
"""

from __future__ import annotations

import io
import math
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import supervision as sv
from prefect import flow, task
from prefect_roboflow.blocks import Box, OwlV2, ReferenceExample
from prefect_roboflow.blocks.exceptions import InvalidInputError
from prefect_roboflow.blocks.tasks import model_label
from pydantic import BaseModel

from ._cache import atomic_write_bytes
from ._common import (
    BatchReport,
    EmbeddingFamily,
    Progress,
    RequestFigures,
    StepStats,
    batch_label,
    check_failure_rate,
    embedding_model,
    emit_completed,
    ensure_out_dir,
    markdown_table,
    publish_step_table,
    publish_summary,
    resolve_cache,
    resolve_server,
)
from ._output import ParquetSink, embedding_type
from ._sources import ImageItem, ImageSource, count_images, iter_batches, read_item, read_items
from ._steps import (
    BATCH_TASK_OPTIONS,
    _run_name,
    cached_embeddings,
    detect_batch,
    embed_labels,
    encode_jpeg,
    examples_digest,
    zero_shot,
)

FLOW_KEY = "detect-crop-classify"

DETECTIONS_SCHEMA = pa.schema(
    [
        ("image_ref", pa.string()),
        ("image_sha256", pa.string()),
        ("detection_index", pa.int32()),
        ("box_xyxy", pa.list_(pa.float32(), 4)),
        ("detector_class", pa.string()),
        ("detector_confidence", pa.float32()),
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


class ExampleSpec(BaseModel):
    """A reference example given as flow parameters: an image reference and its boxes."""

    image: str
    boxes: list[Box]


class DetectCropClassifyResult(RequestFigures):
    """What a `detect_crop_classify` run did and where its outputs are."""

    images: int
    images_failed: int
    images_without_detections: int
    detections: int
    detections_failed: int
    label_counts: dict[str, int]
    detections_path: str
    annotated_dir: str


def decode_rgb(data: bytes) -> np.ndarray:
    """Encoded image bytes as an RGB array, EXIF orientation applied as the server does."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def crop_boxes(pixels: np.ndarray, xyxy: np.ndarray, padding: int) -> list[bytes | str]:
    """Each box padded, clipped to the image and cropped, as JPEG bytes; or why it has no pixels."""
    height, width = pixels.shape[:2]
    boxes = sv.clip_boxes(sv.pad_boxes(xyxy, px=padding, py=padding), (width, height)) if len(xyxy) else xyxy
    crops: list[bytes | str] = []
    for box in boxes:
        x1, y1, x2, y2 = (round(float(v)) for v in box)
        if x2 - x1 < 1 or y2 - y1 < 1:
            crops.append("empty crop: the box lies outside the image")
            continue
        crops.append(encode_jpeg(sv.crop_image(pixels, (x1, y1, x2, y2))))
    return crops


@task(name="embed_crops", task_run_name=_run_name("embed"), **BATCH_TASK_OPTIONS)
def embed_crops(
    model: Any, images: Sequence[ImageItem], detections: Sequence[sv.Detections], padding: int, cache: Any, batch: str
) -> tuple[list[list[Any]], BatchReport]:
    """Crop every detection of a batch and embed the crops (cached by crop content)."""
    import hashlib

    started = time.monotonic()
    crops_per_image = [
        crop_boxes(decode_rgb(item.data), found.xyxy, padding) if len(found) else []  # type: ignore[arg-type]
        for item, found in zip(images, detections, strict=True)
    ]
    flat = [crop for crops in crops_per_image for crop in crops]
    sendable = [(hashlib.sha256(c).hexdigest(), c) for c in flat if isinstance(c, bytes)]
    embedded, report = cached_embeddings(model, sendable, cache)
    results = iter(embedded)
    outcomes = [next(results) if isinstance(c, bytes) else c for c in flat]
    report.failed = sum(isinstance(o, str) for o in outcomes)
    report.items = len(flat)
    report.seconds = time.monotonic() - started
    report.log(f"embed batch {batch}: {len(flat)} crop(s) from {len(images)} image(s)")
    per_image, start = [], 0
    for crops in crops_per_image:
        per_image.append(outcomes[start : start + len(crops)])
        start += len(crops)
    return per_image, report


@task(name="classify", task_run_name=_run_name("classify"), cache_policy=BATCH_TASK_OPTIONS["cache_policy"])
def classify_and_annotate(
    model: Any,
    images: Sequence[ImageItem],
    detections: Sequence[sv.Detections],
    embeddings: Sequence[Sequence[Any]],
    label_vectors: np.ndarray,
    labels: Sequence[str],
    min_score: float | None,
    annotated_dir: Path,
    batch: str,
) -> list[list[tuple[str, float, np.ndarray] | None]]:
    """Zero-shot label per crop (cosine similarity to ``model``'s label vectors), and annotated images."""
    box_annotator, label_annotator = sv.BoxAnnotator(thickness=2), sv.LabelAnnotator(text_scale=0.4)
    results: list[list[tuple[str, float, np.ndarray] | None]] = []
    for item, found, vectors in zip(images, detections, embeddings, strict=True):
        ok = [i for i, v in enumerate(vectors) if not isinstance(v, str)]
        per_box: list[tuple[str, float, np.ndarray] | None] = [None] * len(vectors)
        if ok:
            names, best, scores = zero_shot(np.vstack([vectors[i] for i in ok]), label_vectors, labels, min_score)
            for j, i in enumerate(ok):
                per_box[i] = (names[j], float(best[j]), scores[j])
        results.append(per_box)
        if len(found):
            captions = [f"{r[0]} {r[1]:.2f}" if r else "failed" for r in per_box]
            scene = decode_rgb(item.data)[:, :, ::-1].copy()  # type: ignore[arg-type]
            scene = box_annotator.annotate(scene, found)
            scene = label_annotator.annotate(scene, found, labels=captions)
            atomic_write_bytes(annotated_dir / annotated_name(item), encode_jpeg(scene[:, :, ::-1].copy()))
    return results


def annotated_name(item: ImageItem) -> str:
    """File name of an image's annotated copy: its stem plus a content prefix (refs may clash)."""
    return f"{Path(item.ref.split('?')[0]).stem}-{(item.sha256 or '')[:10]}.jpg"


def _examples(examples: Sequence[ExampleSpec | dict[str, Any]]) -> list[ReferenceExample]:
    if not examples:
        raise InvalidInputError("examples", "give at least one reference example")
    specs = [e if isinstance(e, ExampleSpec) else ExampleSpec.model_validate(e) for e in examples]
    built = []
    for i, spec in enumerate(specs):
        item = read_item(spec.image)
        if not item.ok:
            raise InvalidInputError(f"examples[{i}].image", f"{spec.image}: {item.error}")
        built.append(ReferenceExample(image=item.data, boxes=spec.boxes))
    return built


@flow(name="detect-crop-classify", flow_run_name="detect-crop-classify[{model}]", validate_parameters=True)
def detect_crop_classify(
    images: ImageSource,
    examples: list[ExampleSpec],
    labels: list[str],
    out_dir: str,
    server: str | None = None,
    model: EmbeddingFamily = "clip",
    version: str | None = None,
    detector_version: str | None = None,
    confidence: float = 0.99,
    padding: int = 0,
    min_score: float | None = None,
    batch_size: int = 32,
    cache_storage: str | None = None,
    max_failure_rate: float = 0.5,
) -> DetectCropClassifyResult:
    """Find objects like the examples, crop them, embed the crops, and label each crop.

    Args:
        images: A folder, a glob, or a list of paths and https URLs.
        examples: Reference images with example boxes (centre ``x, y``, size ``w, h`` in
            pixels, ``cls``, optional ``negative``).
        labels: Label prompts to sort the crops into, e.g. ``["a photo of an apple", ...]``.
        out_dir: Folder for ``detections.parquet`` and ``annotated/``.
        server: A saved `InferenceServer` block name or a URL; defaults to ``INFERENCE_SERVER_URL``,
            then ``http://localhost:9001``.
        model: ``"clip"`` or ``"perception_encoder"`` for the crops and labels.
        version: Version of that model; its default when omitted.
        detector_version: OWLv2 version; the block's default when omitted.
        confidence: OWLv2 score threshold (scores cluster near 1: 0.99 is typical).
        padding: Pixels added around each box before cropping.
        min_score: Crops whose best label similarity is below this are labelled ``"unknown"``.
        batch_size: Images per task run.
        cache_storage: Folder or saved file-system block (``"type/name"``) for per-item results.
        max_failure_rate: The run fails (after writing its outputs) above this share of failed images.

    Returns:
        Counts, label counts and output paths. One row per detection, one per image without any
        (``status="no_detections"``), and one per failed image: every image has a row.
    """
    srv = resolve_server(server)
    detector = OwlV2(server=srv) if detector_version is None else OwlV2(server=srv, version=detector_version)
    embedder = embedding_model(model, version, srv)
    reference = _examples(examples)
    references_sha = examples_digest(reference)
    cache, result_storage = resolve_cache(cache_storage)
    out = ensure_out_dir(out_dir)
    annotated_dir = out / "annotated"
    annotated_dir.mkdir(exist_ok=True)
    label_vectors = embed_labels.with_options(result_storage=result_storage)(embedder, labels)
    total_batches = math.ceil(count_images(images) / batch_size)
    progress = Progress(
        total_batches, f"Detecting with {model_label(detector)}, labelling with {model_label(embedder)}"
    )
    detect_stats = StepStats("detect", model_label(detector))
    embed_stats = StepStats("embed", model_label(embedder))
    classify_stats = StepStats("classify", model_label(embedder))
    counts: Counter[str] = Counter()
    labels_found: Counter[str] = Counter()
    examples_rows: list[dict[str, Any]] = []
    with ParquetSink(out / "detections.parquet", DETECTIONS_SCHEMA) as sink:
        for index, refs in enumerate(iter_batches(images, batch_size)):
            batch = batch_label(index, total_batches)
            items = read_items(refs)
            readable = [item for item in items if item.ok]
            found, report = detect_batch(
                detector, [i.content for i in readable], reference, references_sha, confidence, cache, batch
            )
            report.failed += len(items) - len(readable)
            report.items = len(items)
            report.into(detect_stats)
            detected = [(item, d) for item, d in zip(readable, found, strict=True) if not isinstance(d, str)]
            vectors, report = embed_crops(
                embedder, [i for i, _ in detected], [d for _, d in detected], padding, cache, batch
            )
            report.into(embed_stats)
            started = time.monotonic()
            labelled = classify_and_annotate(
                embedder,
                [i for i, _ in detected],
                [d for _, d in detected],
                vectors,
                label_vectors,
                labels,
                min_score,
                annotated_dir,
                batch,
            )
            classify_stats.batches += 1
            classify_stats.items += sum(len(v) for v in vectors)
            classify_stats.wall_seconds += time.monotonic() - started
            rows = _rows(items, found, readable, detected, vectors, labelled, embedder)
            for row in rows:
                counts[row["status"]] += 1
                if row["label"] is not None:
                    labels_found[row["label"]] += 1
            counts["images_failed"] += len(items) - len(detected)
            examples_rows.extend(rows[: max(0, 5 - len(examples_rows))])
            sink.write(rows)
            progress.advance()
        path = sink.path
    result = DetectCropClassifyResult(
        images=detect_stats.items,
        images_failed=counts["images_failed"],
        images_without_detections=counts["no_detections"],
        detections=counts["ok"],
        detections_failed=counts["failed"] - counts["images_failed"],
        label_counts=dict(labels_found.most_common()),
        **RequestFigures.of(detect_stats, embed_stats),
        detections_path=str(path),
        annotated_dir=str(annotated_dir),
    )
    publish_step_table(FLOW_KEY, [detect_stats, embed_stats, classify_stats])
    publish_summary(
        FLOW_KEY,
        f"{result.detections} objects found in {result.images} images ({result.images_without_detections} without any)",
        [
            "## Labels\n\n"
            + markdown_table([{"label": k, "count": v} for k, v in labels_found.most_common()], ["label", "count"]),
            "## Example rows\n\n"
            + markdown_table(
                [
                    {**r, "label_score": f"{r['label_score']:.3f}" if r["label_score"] is not None else ""}
                    for r in examples_rows
                ],
                ["image_ref", "detector_class", "detector_confidence", "label", "label_score", "status", "error"],
            ),
            f"## Outputs\n\n- table: `{path}`\n- annotated images: `{annotated_dir}`",
        ],
    )
    emit_completed(FLOW_KEY, result.model_dump())
    check_failure_rate(result.images_failed, result.images, max_failure_rate)
    return result


def _rows(
    items: Sequence[ImageItem],
    found: Sequence[Any],
    readable: Sequence[ImageItem],
    detected: Sequence[tuple[ImageItem, sv.Detections]],
    vectors: Sequence[Sequence[Any]],
    labelled: Sequence[Sequence[Any]],
    embedder: Any,
) -> list[dict[str, Any]]:
    empty = {k: None for k in DETECTIONS_SCHEMA.names}
    model_fields = {"model": type(embedder).__name__, "version": embedder.version}
    errors = {id(item): item.error for item in items if not item.ok}
    errors.update({id(item): d for item, d in zip(readable, found, strict=True) if isinstance(d, str)})
    per_image = {id(item): (d, v, lab) for (item, d), v, lab in zip(detected, vectors, labelled, strict=True)}
    rows: list[dict[str, Any]] = []
    for item in items:
        base = {**empty, **model_fields, "image_ref": item.ref, "image_sha256": item.sha256}
        if id(item) in errors:
            rows.append({**base, "status": "failed", "error": errors[id(item)]})
            continue
        detections, crop_vectors, labels = per_image[id(item)]
        if not len(detections):
            rows.append({**base, "status": "no_detections"})
        for k in range(len(detections)):
            row = {
                **base,
                "detection_index": k,
                "box_xyxy": detections.xyxy[k].tolist(),
                "detector_class": str(detections.data["class_name"][k]),
                "detector_confidence": None if detections.confidence is None else float(detections.confidence[k]),
            }
            if isinstance(crop_vectors[k], str):
                rows.append({**row, "status": "failed", "error": crop_vectors[k]})
                continue
            label, score, scores = labels[k]
            rows.append(
                {
                    **row,
                    "label": label,
                    "label_score": score,
                    "label_scores": scores.tolist(),
                    "embedding": crop_vectors[k].tolist(),
                    "status": "ok",
                }
            )
    return rows
