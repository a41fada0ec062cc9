"""Box label issues: cleanlab's object-detection label quality for reviewed boxes read back from COCO.

The reviewed labels are a COCO ``annotations.json`` (what `auto_label` exports, and Label Studio or
CVAT export after review: boxes as ``[x, y, w, h]`` with a category); the predictions are the
detections of a labelled table (`auto_label`'s or `detect_crop_classify`'s: ``box_xyxy`` and
``label_scores``, the class probabilities, per detection) — each detection counts for every
class with that class's probability, in MMDetection's per-class layout cleanlab takes.
`cleanlab.object_detection.rank.get_label_quality_scores` scores each image's boxes (0: surely
mislabelled, 1: surely right: overlooked objects, swapped classes and badly placed boxes all lower
it) and `cleanlab.object_detection.filter.find_label_issues` flags images. A COCO image is matched
to the table's image by its exported name (``<stem>-<sha256 prefix>``, as `auto_label` names
them) or by its file name.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from prefect_roboflow.blocks.exceptions import InvalidInputError

from .._outputs.annotated import annotated_name
from .._storage.access import read_bytes
from ..records import ImageRecord

__all__ = ["BOX_ISSUES_SCHEMA", "BoxIssues", "box_issues"]

BOX_ISSUES_SCHEMA = pa.schema(
    [
        ("image_ref", pa.string()),
        ("image_sha256", pa.string()),
        ("boxes_reviewed", pa.int32()),
        ("boxes_predicted", pa.int32()),
        ("label_quality", pa.float32()),
        ("label_issue", pa.bool_()),
    ]
)


@dataclass
class BoxIssues:
    """One row per reviewed image found in the table (`BOX_ISSUES_SCHEMA`)."""

    table: pa.Table

    @property
    def issues(self) -> int:
        """How many images cleanlab flags."""
        return int(np.asarray(self.table.column("label_issue").to_numpy(zero_copy_only=False), dtype=bool).sum())


def _coco(path: str, classes: list[str]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per COCO image stem: its boxes (xyxy) and class indices into ``classes``."""
    try:
        coco = json.loads(read_bytes(path, field="reviewed"))
        names = {int(c["id"]): str(c["name"]) for c in coco["categories"]}
        files = {int(i["id"]): str(i["file_name"]) for i in coco["images"]}
        boxes: dict[str, list[list[float]]] = defaultdict(list)
        labels: dict[str, list[int]] = defaultdict(list)
        for annotation in coco["annotations"]:
            name = names[int(annotation["category_id"])]
            if name not in classes:
                raise InvalidInputError("reviewed", f"category {name!r} is not one of the classes {classes}")
            x, y, w, h = (float(v) for v in annotation["bbox"])
            stem = Path(files[int(annotation["image_id"])]).stem
            boxes[stem].append([x, y, x + w, y + h])
            labels[stem].append(classes.index(name))
        stems = [Path(f).stem for f in files.values()]
    except (KeyError, TypeError, ValueError) as error:
        raise InvalidInputError("reviewed", f"{path} is not a COCO annotations file: {error!r}") from None
    return (
        {s: np.asarray(boxes.get(s, []), dtype=np.float32).reshape(-1, 4) for s in stems},
        {s: np.asarray(labels.get(s, []), dtype=np.int64) for s in stems},
    )


def box_issues(table: pa.Table, reviewed: str, classes: list[str]) -> BoxIssues:
    """cleanlab's verdict on each reviewed image (see the module docs).

    Raises:
        InvalidInputError: naming ``reviewed`` (not COCO, a category that is not a class, no image
            of the table) or ``labels`` (no ``box_xyxy`` column).
    """
    from cleanlab.object_detection.filter import find_label_issues
    from cleanlab.object_detection.rank import get_label_quality_scores

    if "box_xyxy" not in table.column_names:
        raise InvalidInputError("labels", "has no box_xyxy column: box labels need a detections table")
    boxes, labels = _coco(reviewed, classes)
    predicted: dict[str, list[Any]] = {}
    shas: dict[str, str | None] = {}
    for ref, sha, box, scores in zip(
        table.column("image_ref").to_pylist(),
        table.column("image_sha256").to_pylist(),
        table.column("box_xyxy").to_pylist(),
        table.column("label_scores").to_pylist(),
        strict=True,
    ):
        shas.setdefault(ref, sha)
        rows = predicted.setdefault(ref, [])
        if box is not None and scores is not None and len(scores) == len(classes):
            rows.append((box, scores))
    found: list[tuple[str, str]] = []  # (ref, stem)
    for ref, sha in shas.items():
        named = Path(annotated_name(ImageRecord(ref, sha))).stem
        stem = named if named in boxes else Path(ref.split("?")[0]).stem
        if stem in boxes:
            found.append((ref, stem))
    if not found:
        raise InvalidInputError("reviewed", f"{reviewed} names none of the labelled table's images")
    given = [{"bboxes": boxes[stem], "labels": labels[stem]} for _, stem in found]
    predictions = [_per_class(predicted[ref], len(classes)) for ref, _ in found]
    quality = get_label_quality_scores(given, predictions, verbose=False)
    flagged = find_label_issues(given, predictions)
    rows = pa.table(
        {
            "image_ref": [ref for ref, _ in found],
            "image_sha256": [shas[ref] for ref, _ in found],
            "boxes_reviewed": [len(g["labels"]) for g in given],
            "boxes_predicted": [len(predicted[ref]) for ref, _ in found],
            "label_quality": np.asarray(quality, dtype=np.float32),
            "label_issue": np.asarray(flagged, dtype=bool),
        },
        schema=BOX_ISSUES_SCHEMA,
    )
    return BoxIssues(rows)


def _per_class(detections: list[Any], classes: int) -> np.ndarray:
    """One image's detections as cleanlab takes them: per class, ``(M, 5)`` of box and probability."""
    out = np.empty(classes, dtype=object)
    for k in range(classes):
        out[k] = np.asarray([[*box, scores[k]] for box, scores in detections], dtype=np.float32).reshape(-1, 5)
    return out
