"""The output tables: their columns, defined once, and the row of a record.

Every table starts with the image's reference and hash and ends with the model, the embedding
and the outcome; detection and label columns sit between, where a flow has them.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from prefect_roboflow.blocks._model import ModelBlock

from ..records import Batch, ImageRecord
from .files import embedding_type

__all__ = [
    "CLASSIFICATIONS_SCHEMA",
    "DETECTIONS_SCHEMA",
    "EMBEDDINGS_SCHEMA",
    "REVIEW_SCHEMA",
    "detection_rows",
    "record_rows",
    "video_schema",
]

Columns = list[tuple[str, pa.DataType]]

IMAGE: Columns = [("image_ref", pa.string()), ("image_sha256", pa.string())]
DETECTION: Columns = [
    ("detection_index", pa.int32()),
    ("box_xyxy", pa.list_(pa.float32(), 4)),
    ("detector_class", pa.string()),
    ("detector_confidence", pa.float32()),
]
LABEL: Columns = [("label", pa.string()), ("label_score", pa.float32()), ("label_scores", pa.list_(pa.float32()))]
#: ``model`` holds the model block's ``family`` ("clip", "perception_encoder").
OUTCOME: Columns = [
    ("model", pa.string()),
    ("version", pa.string()),
    ("embedding", embedding_type()),
    ("status", pa.string()),
    ("error", pa.string()),
]

#: Added after the image columns when a run saw a video: null for photos.
FRAME: Columns = [("frame_index", pa.int64()), ("frame_time_s", pa.float64())]
#: Added after the detection columns on video: the tracked object a detection shows (null for photos).
TRACK: Columns = [("tracker_id", pa.int64())]

EMBEDDINGS_SCHEMA = pa.schema(IMAGE + OUTCOME)
CLASSIFICATIONS_SCHEMA = pa.schema(IMAGE + LABEL + OUTCOME)
DETECTIONS_SCHEMA = pa.schema(IMAGE + DETECTION + LABEL + OUTCOME)
#: `auto_label`'s detections left unlabelled, with their best guesses, best first.
REVIEW_SCHEMA = pa.schema(
    IMAGE + DETECTION[:2] + [("guesses", pa.list_(pa.string())), ("guess_scores", pa.list_(pa.float32()))]
)


def video_schema(schema: pa.Schema, tracked: bool = False) -> pa.Schema:
    """``schema`` with the frame columns after the image ones (and ``tracker_id`` after the
    detection ones when ``tracked``): the table of a run that saw a video."""
    fields = list(schema)
    at = len(IMAGE)
    fields[at:at] = [pa.field(name, kind) for name, kind in FRAME]
    if tracked and "detector_confidence" in schema.names:
        after = fields.index(schema.field("detector_confidence")) + 1
        fields[after:after] = [pa.field(name, kind) for name, kind in TRACK]
    return pa.schema(fields)


def _values(record: ImageRecord, model: ModelBlock, status: str | None) -> dict[str, Any]:
    values: dict[str, Any] = {
        "image_ref": record.ref,
        "image_sha256": record.crop.parent_sha256 if record.crop else record.sha256,
        "model": model.family,
        "version": model.version,
        "status": status or ("ok" if record.ok else "failed"),
        "error": record.failure.reason if record.failure else None,
        "frame_index": record.frame_index,
        "frame_time_s": record.frame_time_s,
    }
    if record.crop is not None:
        values["detection_index"] = record.crop.detection_index
        values["box_xyxy"] = list(record.crop.xyxy)
        values["detector_class"] = record.crop.detector_class
        values["detector_confidence"] = record.crop.detector_confidence
        values["tracker_id"] = record.crop.tracker_id
    if record.ok and record.label is not None:
        values.update(label=record.label.name, label_score=record.label.score, label_scores=list(record.label.scores))
    if record.ok and record.embedding is not None:
        # The float32 array itself: pyarrow converts it in one copy, where a list of 512 Python
        # floats costs it ~3 ms a row.
        values["embedding"] = record.embedding
    return values


def record_rows(records: list[ImageRecord], model: ModelBlock, schema: pa.Schema) -> list[dict[str, Any]]:
    """One row per record, with exactly the schema's columns."""
    return [{name: values.get(name) for name in schema.names} for values in (_values(r, model, None) for r in records)]


def detection_rows(batch: Batch, model: ModelBlock, schema: pa.Schema = DETECTIONS_SCHEMA) -> list[dict[str, Any]]:
    """A crop batch's rows: one per detection, one per image without any (``"no_detections"``) and
    one per failed image, so every image has a row."""
    rows = []
    for parent, crops in batch.by_parent():
        if not crops:
            status = "no_detections" if parent.ok else None
            rows.append({k: _values(parent, model, status).get(k) for k in schema.names})
        rows.extend(record_rows(crops, model, schema))
    return rows
