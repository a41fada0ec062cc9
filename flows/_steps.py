"""The batch tasks the flows chain: embed, detect, embed label texts.

Each task takes a whole batch (a task costs ~90 ms to run and record here, so never one per
image), looks every item up in the content cache, sends only the misses — concurrently, through
the block's engine — and stores each answer as it arrives. A failing item comes back as its
error message; the rest of the batch completes.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import supervision as sv
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture
from prefect_roboflow.blocks import Clip, InferenceError, OwlV2, PerceptionEncoder, ReferenceExample, record_responses
from prefect_roboflow.blocks.tasks import model_label, retry_if_retryable

from ._cache import ContentCache, TextContentPolicy, content_key
from ._common import BatchReport, batch_label, model_identity
from ._sources import ImageItem, read_items

#: One item to process: the sha256 of its content, and the content (encoded bytes or URL).
Content = tuple[str, bytes]
#: A result, or why there is none.
Outcome = Any


def _run_name(step: str) -> Any:
    def name() -> str:
        from prefect.runtime import task_run

        params = task_run.parameters
        model = params.get("model") or params.get("detector")
        return f"{step}[{model_label(model)}] batch {params.get('batch', '?')}"

    return name


BATCH_TASK_OPTIONS: dict[str, Any] = {
    "retries": 1,
    "retry_delay_seconds": 5,
    "retry_condition_fn": retry_if_retryable,
    # The per-item content cache does the caching: inputs hold the server block (and its key).
    "cache_policy": NO_CACHE,
}


def through_cache(
    cache: ContentCache,
    keys: Sequence[str],
    decode: Callable[[bytes], Any],
    encode: Callable[[Any], bytes],
    compute: Callable[[list[int]], Sequence[Any]],
) -> tuple[list[Outcome], BatchReport]:
    """Results for ``keys``: stored ones decoded, the rest computed (``compute(indexes)`` answers
    a result or an `InferenceError` per index) and stored. Errors come back as their message."""
    found = cache.get_many(keys)
    outcomes: list[Outcome] = [decode(found[key]) if key in found else None for key in keys]
    misses = [i for i, key in enumerate(keys) if key not in found]
    report = BatchReport(items=len(keys), cached=len(keys) - len(misses), sent=len(misses))
    if misses:
        with record_responses() as infos:
            answers = compute(misses)
        report.infos = infos
        for i, answer in zip(misses, answers, strict=True):
            if isinstance(answer, InferenceError):
                outcomes[i] = f"{type(answer).__name__}: {answer}"
            else:
                cache.put(keys[i], encode(answer))
                outcomes[i] = answer
    report.failed = sum(isinstance(o, str) for o in outcomes)
    return outcomes, report


def cached_embeddings(
    model: Clip | PerceptionEncoder, contents: Sequence[Content], cache: ContentCache
) -> tuple[list[Outcome], BatchReport]:
    """Embeddings for each content (a float32 vector, or an error message), sending only cache misses."""
    identity = model_identity(model)
    return through_cache(
        cache,
        [content_key("embed", sha, identity, {}) for sha, _ in contents],
        lambda stored: np.frombuffer(stored, dtype=np.float32),
        lambda vector: np.asarray(vector, dtype=np.float32).tobytes(),
        lambda misses: model.embed_images_outcomes([contents[i][1] for i in misses]),
    )


@task(name="embed", task_run_name=_run_name("embed"), **BATCH_TASK_OPTIONS)
def embed_batch(
    model: Clip | PerceptionEncoder, contents: Sequence[Content], cache: ContentCache, batch: str
) -> tuple[list[Outcome], BatchReport]:
    """Embed a batch of images (or crops), cached per item by content."""
    started = time.monotonic()
    outcomes, report = cached_embeddings(model, contents, cache)
    report.seconds = time.monotonic() - started
    report.log(f"embed batch {batch}")
    return outcomes, report


def embed_submitter(
    model: Clip | PerceptionEncoder, cache: ContentCache, total_batches: int
) -> Callable[[tuple[int, list[str]]], tuple[list[ImageItem], PrefectFuture[Any]]]:
    """For `pipelined`: read batch ``index`` of image references and submit its embed task."""

    def submit(batch: tuple[int, list[str]]) -> tuple[list[ImageItem], PrefectFuture[Any]]:
        index, refs = batch
        items = read_items(refs)
        contents = [item.content for item in items if item.ok]
        return items, embed_batch.submit(model, contents, cache, batch=batch_label(index, total_batches))

    return submit


def examples_digest(examples: Sequence[ReferenceExample]) -> str:
    """sha256 over the reference examples' image contents and boxes: part of detection cache keys."""
    from prefect_roboflow.blocks.images import to_request_image

    parts = []
    for i, example in enumerate(examples):
        image = to_request_image(example.image, f"examples[{i}].image")
        parts.append(
            {
                "image": hashlib.sha256(image["value"].encode()).hexdigest(),
                "boxes": [b.to_request() for b in example.boxes],
            }
        )
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def detections_to_bytes(detections: sv.Detections) -> bytes:
    """A detection result as compact JSON, for the cache."""
    return json.dumps(
        {
            "xyxy": detections.xyxy.tolist(),
            "confidence": [] if detections.confidence is None else detections.confidence.tolist(),
            "class_id": [] if detections.class_id is None else detections.class_id.tolist(),
            "class_name": np.asarray(detections.data.get("class_name", [])).tolist(),
        }
    ).encode()


def detections_from_bytes(data: bytes) -> sv.Detections:
    """The inverse of `detections_to_bytes`."""
    stored = json.loads(data)
    return sv.Detections(
        xyxy=np.asarray(stored["xyxy"], dtype=np.float32).reshape(-1, 4),
        confidence=np.asarray(stored["confidence"], dtype=np.float32),
        class_id=np.asarray(stored["class_id"], dtype=int),
        data={"class_name": np.asarray(stored["class_name"], dtype=str)},
    )


@task(name="detect", task_run_name=_run_name("detect"), **BATCH_TASK_OPTIONS)
def detect_batch(
    detector: OwlV2,
    contents: Sequence[Content],
    examples: Sequence[ReferenceExample],
    examples_sha256: str,
    confidence: float,
    cache: ContentCache,
    batch: str,
) -> tuple[list[Outcome], BatchReport]:
    """Few-shot detection over a batch of images, cached per image by content, examples and confidence."""
    started = time.monotonic()
    params = {"examples": examples_sha256, "confidence": confidence}
    outcomes, report = through_cache(
        cache,
        [content_key("detect", sha, model_identity(detector), params) for sha, _ in contents],
        detections_from_bytes,
        detections_to_bytes,
        lambda misses: detector.detect_outcomes([contents[i][1] for i in misses], examples, confidence),
    )
    report.seconds = time.monotonic() - started
    report.log(f"detect batch {batch} ({report.seconds:.2f}s)")
    return outcomes, report


@task(
    name="embed_labels",
    task_run_name=_run_name("embed_labels"),
    cache_policy=TextContentPolicy(texts_arg="labels", model_arg="model"),
    result_serializer="compressed/pickle",
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=retry_if_retryable,
)
def embed_labels(model: Clip | PerceptionEncoder, labels: Sequence[str], batch: str = "1/1") -> np.ndarray:
    """Embed the label prompts once per run; Prefect's cache serves them on later runs."""
    with record_responses() as infos:
        vectors = model.embed_texts(list(labels))
    BatchReport(items=len(labels), sent=len(labels), infos=infos).log("embed_labels")
    return vectors


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.where(norms == 0, 1.0, norms)


def zero_shot(
    embeddings: np.ndarray, label_vectors: np.ndarray, labels: Sequence[str], min_score: float | None
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Top label, its score and all scores (cosine similarity) for each embedding row.

    A top score under ``min_score`` gives the label ``"unknown"``.
    """
    scores = normalise(embeddings) @ normalise(label_vectors).T
    best = scores.argmax(axis=1)
    best_scores = scores[np.arange(len(scores)), best]
    names = [
        "unknown" if min_score is not None and s < min_score else labels[b]
        for b, s in zip(best.tolist(), best_scores.tolist(), strict=True)
    ]
    return names, best_scores.astype(np.float32), scores.astype(np.float32)


def encode_jpeg(pixels: np.ndarray) -> bytes:
    """RGB pixels as JPEG bytes (crops are encoded once, then hashed and sent as they are)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()
