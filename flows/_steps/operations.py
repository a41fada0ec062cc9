"""What the steps do, without Prefect: each takes records and returns records and a `StepReport`.

The tasks in `steps` wrap these one to one; plain functions can be read and tested on their own.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from prefect_roboflow.blocks import (
    EmbeddingModel,
    InferenceError,
    InvalidInputError,
    OwlV2,
    ReferenceExample,
)
from prefect_roboflow.blocks._model import ModelBlock
from prefect_roboflow.blocks.images import JPEG_QUALITY, to_request_image, upright
from prefect_roboflow.blocks.owlv2 import check_confidence, check_examples

from ..records import Crop, Failure, ImageRecord, Label, LabelSet, StepReport
from .cache import ContentCache, content_keys, through_cache
from .sources import load_all
from .vectors import normalise

if TYPE_CHECKING:
    import supervision as sv

__all__ = [
    "classify_records",
    "crop_records",
    "decode_rgb",
    "detect_records",
    "embed_label_texts",
    "embed_records",
    "encode_jpeg",
]

Codec = tuple[Callable[[Any], bytes], Callable[[bytes], Any]]

VECTORS: Codec = (
    lambda vector: np.asarray(vector, dtype=np.float32).tobytes(),
    lambda stored: np.frombuffer(stored, dtype=np.float32),
)


def _detections_to_bytes(detections: sv.Detections) -> bytes:
    return json.dumps(
        {
            "xyxy": detections.xyxy.tolist(),
            "confidence": [] if detections.confidence is None else detections.confidence.tolist(),
            "class_id": [] if detections.class_id is None else detections.class_id.tolist(),
            "class_name": np.asarray(detections.data.get("class_name", [])).tolist(),
            "raw_xyxy": np.asarray(detections.data.get("raw_xyxy", detections.xyxy)).tolist(),
        }
    ).encode()


def _detections_from_bytes(data: bytes) -> sv.Detections:
    import supervision as sv

    stored = json.loads(data)
    xyxy = np.asarray(stored["xyxy"], dtype=np.float32).reshape(-1, 4)
    return sv.Detections(
        xyxy=xyxy,
        confidence=np.asarray(stored["confidence"], dtype=np.float32),
        class_id=np.asarray(stored["class_id"], dtype=int),
        data={
            "class_name": np.asarray(stored["class_name"], dtype=str),
            # entries cached before the box policy hold the server's box as xyxy
            "raw_xyxy": np.asarray(stored.get("raw_xyxy", xyxy), dtype=np.float32).reshape(-1, 4),
        },
    )


DETECTIONS: Codec = (_detections_to_bytes, _detections_from_bytes)
#: The record field each cached step fills.
RESULT_FIELDS = {"embed": "embedding", "detect": "detections"}


def _report(step: str, model: str, records: list[ImageRecord], started: float, **figures: Any) -> StepReport:
    failed = sum(not r.ok for r in records)
    return StepReport(step, model, len(records), failed=failed, seconds=time.monotonic() - started, **figures)


def _cached_step(
    step: str,
    model: ModelBlock,
    records: Sequence[ImageRecord],
    cache: ContentCache,
    params: dict[str, Any],
    codec: Codec,
    compute: Callable[[list[bytes]], Sequence[Any]],
    accept: Callable[[Any], bool] | None = None,
) -> tuple[list[ImageRecord], StepReport]:
    """Read the records (if not yet), then fill ``step``'s result of every ok one from the cache
    (a stored result ``accept`` refuses is a miss), sending the misses' bytes to ``compute``; an
    error fails its record."""
    started = time.monotonic()
    loaded = load_all(records)
    todo = [i for i, r in enumerate(loaded) if r.ok]
    outcomes, sent, infos = through_cache(
        cache,
        content_keys(step, [loaded[i].sha256 or "" for i in todo], model.identity(), params),
        codec,
        lambda misses: compute([loaded[todo[m]].data or b"" for m in misses]),
        accept,
    )
    done = list(loaded)
    for i, outcome in zip(todo, outcomes, strict=True):
        failure = Failure.of(step, outcome) if isinstance(outcome, InferenceError) else None
        done[i] = loaded[i].failed(failure) if failure else loaded[i].with_result(**{RESULT_FIELDS[step]: outcome})
    return done, _report(step, model.label, done, started, cached=len(todo) - sent, sent=sent, infos=infos)


def embed_records(
    model: EmbeddingModel, records: Sequence[ImageRecord], cache: ContentCache
) -> tuple[list[ImageRecord], StepReport]:
    """Records read (if not yet) and embedded; each image sent only if its content is not cached.

    A cached vector of another size than the model's (`EmbeddingModel.dimension`; for a version of
    unknown size, the first size this process met, cached or answered) is sent again, never used.
    """
    return _cached_step(
        "embed", model, records, cache, {}, VECTORS, model.embed_images_outcomes, lambda v: fits_model(model, v)
    )


def fits_model(model: EmbeddingModel, vector: np.ndarray) -> bool:
    """Whether ``vector`` has the model's embedding size; for a version of unknown size the first
    vector met fixes it (for the answers too)."""
    size = int(vector.shape[0])
    expected = model.dimension
    if expected is None:
        expected = model.learn_dimension(size)
    return size == expected


def examples_digest(examples: Sequence[ReferenceExample]) -> str:
    """sha256 over the reference examples' image contents and boxes: part of detection cache keys."""
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


def detect_records(
    detector: OwlV2,
    records: Sequence[ImageRecord],
    examples: Sequence[ReferenceExample],
    confidence: float | None,
    cache: ContentCache,
) -> tuple[list[ImageRecord], StepReport]:
    """Records read (if not yet) with the objects OWLv2 finds like the examples; cached per image
    by content, examples and confidence."""
    checked = check_examples(examples)
    threshold = check_confidence(detector.confidence if confidence is None else confidence)
    params = {"examples": examples_digest(checked), "confidence": threshold}
    found, report = _cached_step(
        "detect",
        detector,
        records,
        cache,
        params,
        DETECTIONS,
        lambda images: detector.detect_outcomes(images, checked, threshold),
    )
    kept = [_inside(record) for record in found]
    report.dropped = sum(dropped for _, dropped in kept)
    return [record for record, _ in kept], report


def _inside(record: ImageRecord) -> tuple[ImageRecord, int]:
    """The record without the boxes that lie wholly outside its image, and how many there were.

    OWLv2 pads every image to a square and may find objects in the padding: such a box, clipped to
    the image (the box policy of `blocks.owlv2.to_detections`), has no area left. It is no object of
    the image: dropped here, counted in the step's report, never a failed detection.
    """
    found = record.detections
    if found is None or not len(found):
        return record, 0
    xyxy = found.xyxy
    inside = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
    if inside.all():
        return record, 0
    return record.with_result(detections=found[inside]), int((~inside).sum())


#: IoU at or above which a detection in an example's own reference image gives its box back.
EXAMPLE_MATCH_IOU = 0.5


def unfound_examples(
    detector: OwlV2, examples: Sequence[ReferenceExample], confidence: float | None, cache: ContentCache
) -> list[str]:
    """A warning for each positive example box that OWLv2, shown all the examples, does not find in
    its own reference image (no detection of its class with IoU ≥ `EXAMPLE_MATCH_IOU`): a box it
    cannot find there it will hardly find anywhere. One request per distinct reference image, cached
    as the detect step's are (a rerun sends nothing). Examples whose image is not bytes (as
    `steps.reference_examples` gives them) are not checked."""
    import supervision as sv

    checked = check_examples(examples)
    threshold = check_confidence(detector.confidence if confidence is None else confidence)
    images = {hashlib.sha256(e.image).hexdigest(): e.image for e in checked if isinstance(e.image, (bytes, bytearray))}
    records = [ImageRecord(f"reference image {sha[:10]}", sha, bytes(data)) for sha, data in images.items()]
    found, _ = detect_records(detector, records, checked, threshold, cache) if records else ([], None)
    by_sha = {record.sha256: record for record in found}
    notes = []
    for i, example in enumerate(checked):
        if not isinstance(example.image, (bytes, bytearray)):
            continue
        record = by_sha[hashlib.sha256(example.image).hexdigest()]
        if not record.ok or record.detections is None:
            reason = record.failure.reason if record.failure else "no answer"
            notes.append(f"examples[{i}]: its boxes could not be checked on their own image ({reason})")
            continue
        detections = record.detections
        names = detections.data.get("class_name", np.array([], dtype=str))
        for j, box in enumerate(example.boxes):
            if box.negative:
                continue
            same = detections.xyxy[names == box.cls]
            iou = sv.box_iou_batch(np.array([box.xyxy]), same).max() if len(same) else 0.0
            if iou < EXAMPLE_MATCH_IOU:
                notes.append(
                    f"examples[{i}].boxes[{j}] ({box.cls!r}) is not found in its own reference image at confidence "
                    f"{threshold:g} (best IoU {iou:.2f}): OWLv2 will hardly find it elsewhere; draw the box tight "
                    "around one object, add examples of the class, or lower confidence"
                )
    return notes


def decode_rgb(data: bytes) -> np.ndarray:
    """Encoded image bytes as an RGB array, turned as the server turns it (`blocks.images.upright`)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(upright(image).convert("RGB"))


def encode_jpeg(pixels: np.ndarray) -> bytes:
    """RGB pixels as JPEG bytes (crops are encoded once, then hashed and sent as they are)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _origins(parent: ImageRecord, found: sv.Detections, size: tuple[int, int] | None = None) -> list[Crop]:
    """Where each crop of ``parent`` comes from; its box clipped to the image when ``size`` is known
    (the box policy: boxes leave the library clipped, as the blocks' `OwlV2.detect` gives them)."""
    import supervision as sv

    xyxy = found.xyxy if size is None else sv.clip_boxes(found.xyxy, size)
    return [
        Crop(
            parent_sha256=parent.sha256 or "",
            detection_index=k,
            xyxy=tuple(float(v) for v in xyxy[k]),  # type: ignore[arg-type]
            detector_class=str(found.data["class_name"][k]),
            detector_confidence=None if found.confidence is None else float(found.confidence[k]),
        )
        for k in range(len(found))
    ]


def _crops_of(parent: ImageRecord, padding: int) -> list[ImageRecord]:
    """One crop record per detection of ``parent``: the padded, clipped box as JPEG, or why not."""
    import supervision as sv

    found = parent.detections
    assert parent.data is not None and parent.sha256 is not None and found is not None
    try:
        pixels = decode_rgb(parent.data)
    except (OSError, ValueError) as exc:
        failure = Failure("crop", f"cannot decode the image: {exc}", type(exc).__name__)
        return [ImageRecord(parent.ref, crop=origin, failure=failure) for origin in _origins(parent, found)]
    height, width = pixels.shape[:2]
    origins = _origins(parent, found, (width, height))
    boxes = sv.clip_boxes(sv.pad_boxes(found.xyxy, px=padding, py=padding), (width, height))
    crops = []
    for origin, box in zip(origins, boxes, strict=True):
        x1, y1, x2, y2 = (round(float(v)) for v in box)
        if x2 - x1 < 1 or y2 - y1 < 1:
            failure = Failure("crop", "empty crop: the box lies outside the image", "EmptyCrop")
            crops.append(ImageRecord(parent.ref, crop=origin, failure=failure))
            continue
        data = encode_jpeg(sv.crop_image(pixels, (x1, y1, x2, y2)))
        crops.append(ImageRecord(parent.ref, hashlib.sha256(data).hexdigest(), data, crop=origin))
    if parent.frame_index is not None:  # a video frame's crops say which frame they come from
        crops = [c.with_result(frame_index=parent.frame_index, frame_time_s=parent.frame_time_s) for c in crops]
    return crops


def crop_records(
    records: Sequence[ImageRecord], padding: int
) -> tuple[list[ImageRecord], list[ImageRecord], StepReport]:
    """A crop record per detection of every ok image, in order (padded by ``padding`` pixels and
    clipped to the image), an empty crop failed; and the images, read."""
    started = time.monotonic()
    parents = load_all(records)
    crops = [
        crop
        for parent in parents
        if parent.ok and parent.detections is not None and len(parent.detections)
        for crop in _crops_of(parent, padding)
    ]
    return crops, parents, _report("crop", "", crops, started)


def embed_label_texts(model: EmbeddingModel, labels: Sequence[str], cache: ContentCache) -> tuple[LabelSet, StepReport]:
    """The label prompts embedded by ``model``, each cached by its text."""
    started = time.monotonic()
    keys = content_keys("embed_text", [hashlib.sha256(t.encode()).hexdigest() for t in labels], model.identity(), {})
    vectors, sent, infos = through_cache(
        cache,
        keys,
        VECTORS,
        lambda misses: list(model.embed_texts([labels[i] for i in misses])),
        lambda v: fits_model(model, v),
    )
    arrays = [v for v in vectors if not isinstance(v, InferenceError)]  # embed_texts raises rather than answer one
    label_set = LabelSet(model.label, tuple(labels), np.vstack(arrays).astype(np.float32))
    report = StepReport("embed_labels", model.label, len(labels), len(labels) - sent, sent, 0, 0.0, infos)
    report.seconds = time.monotonic() - started
    return label_set, report


def classify_records(
    records: Sequence[ImageRecord], labels: LabelSet, min_score: float | None
) -> tuple[list[ImageRecord], StepReport]:
    """Each embedded record labelled with the prompt it is most similar to (cosine similarity);
    a best score under ``min_score`` gives ``"unknown"``."""
    started = time.monotonic()
    done = list(records)
    missing = Failure("classify", "no embedding to classify: run the embed step first", "MissingEmbedding")
    for i, record in enumerate(done):
        if record.ok and record.embedding is None:
            done[i] = record.failed(missing)
    todo = [i for i, r in enumerate(done) if r.ok]
    if todo:
        embeddings = np.vstack([done[i].embedding for i in todo])  # type: ignore[misc]
        if embeddings.shape[1] != labels.vectors.shape[1]:
            raise InvalidInputError(
                "labels",
                f"{labels.vectors.shape[1]}-d label vectors ({labels.model}) cannot classify "
                f"{embeddings.shape[1]}-d embeddings: embed both with the same model",
            )
        scores = (normalise(embeddings) @ normalise(labels.vectors).T).astype(np.float32)
        best = scores.argmax(axis=1)
        for row, i in enumerate(todo):
            score = float(scores[row, best[row]])
            name = "unknown" if min_score is not None and score < min_score else labels.names[best[row]]
            done[i] = done[i].with_result(label=Label(name, score, tuple(scores[row].tolist())))
    return done, _report("classify", labels.model, done, started)
