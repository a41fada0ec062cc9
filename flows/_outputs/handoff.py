"""Hand-off to annotation tools: `auto_label`'s kept boxes as Label Studio tasks with predictions,
and as a COCO 1.0 zip that CVAT imports. Each is built in a local folder that `write_datasets`
then publishes whole (see `dataset`).

Label Studio (``label_studio/tasks.json``; import it in a project whose labelling config has an
``<Image name="image" value="$image"/>`` and a ``<RectangleLabels name="label" toName="image">``
holding the classes): one task per image, ``{"data": {"image": ...}, "predictions": [{"model_version",
"score", "result": [...]}]}``, each result a ``rectanglelabels`` region whose ``x, y, width, height``
are percentages (0–100) of the image from its top-left corner, with ``original_width``/``_height``
and the region's ``score``; the prediction's ``score`` is the mean of its regions'. ``data.image``
is ``image_prefix`` + the image's file name when a prefix is given (the images are then written
beside ``tasks.json`` under ``images/``, to be served or synced where the prefix points, e.g.
``/data/local-files/?d=labels/label_studio/images/``, ``s3://bucket/run/label_studio/images/``);
without one it is the image's own reference (a path, an https URL, or an ``s3://`` URL that Label
Studio reads through its cloud storage).

CVAT (``cvat/coco-1.0.zip``): ``annotations/instances_default.json`` and ``images/``, the layout
CVAT's "COCO 1.0" import reads; category ids start at 1 (supervision's COCO writer).
"""

from __future__ import annotations

import json
import shutil
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from prefect_roboflow.blocks.images import upright_size

from ..records import ImageRecord

if TYPE_CHECKING:
    import supervision as sv


class LabelledImage(Protocol):
    """What the writers read of `dataset.LabelledImage` (a protocol: `dataset` imports this module)."""

    image: ImageRecord
    xyxy: list[list[float]]
    class_ids: list[int]
    scores: list[float]


__all__ = [
    "CVAT_ZIP",
    "HANDOFF_FORMATS",
    "LABEL_STUDIO_TASKS",
    "label_studio_tasks",
    "write_cvat",
    "write_label_studio",
]

HANDOFF_FORMATS = ("label_studio", "cvat")
LABEL_STUDIO_TASKS = "tasks.json"
CVAT_ZIP = "coco-1.0.zip"
#: The labelling config's names the regions refer to.
FROM_NAME, TO_NAME = "label", "image"


def _size(path: str) -> tuple[int, int]:
    """The image's size as shown: turned as the server turned it for the boxes (`upright_size`), as
    Label Studio's regions and ``original_width``/``original_height`` are of the displayed image."""
    from PIL import Image

    with Image.open(path) as image:
        return upright_size(image)


def label_studio_tasks(
    images: Sequence[LabelledImage],
    classes: Sequence[str],
    staged: dict[str, str],
    model_version: str,
    image_prefix: str | None,
) -> list[dict[str, Any]]:
    """One Label Studio task per image, its kept boxes as one prediction (see the module docs)."""
    tasks = []
    for number, labelled in enumerate(images):
        path = staged[labelled.image.ref]
        width, height = _size(path)
        results: list[dict[str, Any]] = []
        for k, (box, class_id, score) in enumerate(
            zip(labelled.xyxy, labelled.class_ids, labelled.scores, strict=True)
        ):
            x0, y0, x1, y1 = (float(v) for v in box)
            results.append(
                {
                    "id": f"{number}-{k}",
                    "from_name": FROM_NAME,
                    "to_name": TO_NAME,
                    "type": "rectanglelabels",
                    "original_width": width,
                    "original_height": height,
                    "image_rotation": 0,
                    "value": {
                        "x": 100.0 * x0 / width,
                        "y": 100.0 * y0 / height,
                        "width": 100.0 * (x1 - x0) / width,
                        "height": 100.0 * (y1 - y0) / height,
                        "rotation": 0,
                        "rectanglelabels": [classes[class_id]],
                    },
                    "score": float(score),
                }
            )
        image = labelled.image.ref if image_prefix is None else image_prefix + Path(path).name
        score = sum(r["score"] for r in results) / len(results) if results else 0.0
        tasks.append(
            {
                "data": {"image": image},
                "predictions": [{"model_version": model_version, "score": score, "result": results}],
            }
        )
    return tasks


def write_label_studio(
    images: Sequence[LabelledImage],
    classes: Sequence[str],
    staged: dict[str, str],
    target: Path,
    model_version: str,
    image_prefix: str | None,
) -> None:
    """``target/tasks.json`` (and ``target/images/`` when ``image_prefix`` is given)."""
    target.mkdir(parents=True)
    tasks = label_studio_tasks(images, classes, staged, model_version, image_prefix)
    if image_prefix is not None:
        (target / "images").mkdir()
        for path in staged.values():
            shutil.copyfile(path, target / "images" / Path(path).name)
    (target / LABEL_STUDIO_TASKS).write_text(json.dumps(tasks, indent=1))


def write_cvat(dataset: sv.DetectionDataset, target: Path) -> None:
    """``target/coco-1.0.zip``: the dataset in CVAT's COCO 1.0 import layout."""
    work = target.with_name(f".{target.name}.work")
    dataset.as_coco(str(work / "images"), str(work / "annotations" / "instances_default.json"))
    target.mkdir(parents=True)
    with zipfile.ZipFile(target / CVAT_ZIP, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(p for p in work.rglob("*") if p.is_file()):
            archive.write(file, file.relative_to(work).as_posix())
    shutil.rmtree(work, ignore_errors=True)
