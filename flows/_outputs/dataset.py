"""A labelled detection dataset out of crop batches: COCO and YOLO through supervision's
`DetectionDataset`, and an HTML review gallery. Every output appears whole or not at all.

In a local ``out_dir`` each format's folder is built beside its final name and renamed into
place. In a bucket, it is built in a local temp folder and uploaded file by file, each one whole
object, the index last (``coco/annotations.json``; ``yolo/data.yaml``), then the objects the new
dataset no longer holds are deleted (`_storage.publish.publish_folder`). Image files are named by their
content (``<stem>-<sha256 prefix>``), so a rewrite replaces an image only with the same bytes:
during a rewrite a COCO reader sees the old ``annotations.json`` with all its images, then the new
one with all of its; a YOLO reader listing ``labels/`` may meet a mix of old and new label files
until ``data.yaml`` is replaced, so read a YOLO export once its run has finished.
"""

from __future__ import annotations

import html
import io
import logging
import os
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._steps.operations import decode_rgb
from .._steps.sources import load
from .._storage.access import is_remote, join
from .._storage.publish import publish_folder, write_output
from ..records import ImageRecord
from .annotated import annotated_name
from .handoff import CVAT_ZIP, HANDOFF_FORMATS, LABEL_STUDIO_TASKS, write_cvat, write_label_studio

if TYPE_CHECKING:
    import supervision as sv

__all__ = [
    "DEFAULT_FORMATS",
    "EXPORT_FORMATS",
    "INDEX_FILES",
    "GallerySink",
    "LabelledImage",
    "ReviewItem",
    "write_datasets",
]

EXPORT_FORMATS = ("coco", "yolo", *HANDOFF_FORMATS)
#: What `auto_label` writes unless ``formats`` says otherwise.
DEFAULT_FORMATS = ("coco", "yolo")
#: Each format's index, uploaded after the files it names.
INDEX_FILES = {
    "coco": ("annotations.json",),
    "yolo": ("data.yaml",),
    "label_studio": (LABEL_STUDIO_TASKS,),
    "cvat": (CVAT_ZIP,),
}
THUMBNAIL_WIDTH = 320
THUMBNAILS_PER_CLASS = 24
logger = logging.getLogger(__name__)


@dataclass
class LabelledImage:
    """An image and its kept detections (boxes clipped to it, class ids into the class list)."""

    image: ImageRecord
    xyxy: list[list[float]] = field(default_factory=list)
    class_ids: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)

    def detections(self) -> sv.Detections:
        """The kept boxes as `sv.Detections`."""
        import supervision as sv

        if not self.xyxy:
            return sv.Detections.empty()
        return sv.Detections(
            xyxy=np.asarray(self.xyxy, dtype=np.float32),
            class_id=np.asarray(self.class_ids, dtype=int),
            confidence=np.asarray(self.scores, dtype=np.float32),
        )

    def dump(self) -> dict[str, Any]:
        """The image's reference and hash and its kept boxes, as JSON values (a shard's part of the dataset)."""
        return {
            "ref": self.image.ref,
            "sha256": self.image.sha256,
            "xyxy": self.xyxy,
            "class_ids": self.class_ids,
            "scores": self.scores,
        }

    @classmethod
    def restore(cls, dumped: Mapping[str, Any], classes: int) -> LabelledImage:
        """The labelled image `dump` wrote (its bytes unread), checked: a stored part is input too.

        Raises:
            ValueError: when ``dumped`` is not a labelled image with class ids below ``classes``.
        """
        try:
            image = ImageRecord(str(dumped["ref"]), None if dumped["sha256"] is None else str(dumped["sha256"]))
            xyxy = [[float(v) for v in box] for box in dumped["xyxy"]]
            class_ids, scores = [int(c) for c in dumped["class_ids"]], [float(s) for s in dumped["scores"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a labelled image: {exc!r}") from None
        if any(len(b) != 4 for b in xyxy) or not len(xyxy) == len(class_ids) == len(scores):
            raise ValueError(f"{image.ref}: boxes, class ids and scores do not match")
        if any(not 0 <= c < classes for c in class_ids):
            raise ValueError(f"{image.ref}: a class id is not one of the {classes} classes")
        return cls(image, xyxy, class_ids, scores)


@dataclass(frozen=True)
class ReviewItem:
    """A detection left unlabelled: its image, box and best guesses, best first."""

    image_ref: str
    detection_index: int
    guesses: tuple[tuple[str, float], ...]

    def dump(self) -> dict[str, Any]:
        """As JSON values (a shard's part of the review list)."""
        return {"image_ref": self.image_ref, "detection_index": self.detection_index, "guesses": self.guesses}

    @classmethod
    def restore(cls, dumped: Mapping[str, Any]) -> ReviewItem:
        """The item `dump` wrote, checked.

        Raises:
            ValueError: when ``dumped`` is not a review item.
        """
        try:
            guesses = tuple((str(name), float(score)) for name, score in dumped["guesses"])
            return cls(str(dumped["image_ref"]), int(dumped["detection_index"]), guesses)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a review item: {exc!r}") from None


def _replace_dir(staged: Path, final: Path) -> None:
    """Move a finished folder into place, replacing an older one (kept aside until the move is done)."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    staged.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _stage_images(images: Sequence[LabelledImage], folder: Path) -> dict[str, str]:
    """Each image under a unique file name in ``folder`` (linked where it is a local file, else
    written), as supervision reads images from paths; ref → staged path.

    An image whose bytes are not at hand (a fanned-out job's parent builds the dataset from its
    shards' parts: `LabelledImage.restore`) is read again here, one at a time, and must still have
    the bytes the shard labelled; one that cannot be read or changed is left out, with a warning.
    """
    folder.mkdir(parents=True)
    staged = {}
    for labelled in images:
        image = labelled.image
        suffix = ".jpg" if image.frame_index is not None else Path(image.ref.split("?")[0]).suffix.lower() or ".jpg"
        target = folder / f"{Path(annotated_name(image)).stem}{suffix}"
        source = Path(image.ref)
        if "://" not in image.ref and source.is_file():
            target.symlink_to(source.resolve())
        else:
            loaded = image if image.data is not None else load(image)
            if loaded.data is None:
                logger.warning("%s left out of the dataset: %s", image.ref, loaded.failure)
                continue
            target.write_bytes(loaded.data)
        staged[image.ref] = str(target)
    return staged


def write_datasets(
    images: Sequence[LabelledImage],
    classes: Sequence[str],
    formats: Sequence[str],
    out: str,
    *,
    model_version: str = "",
    image_prefix: str | None = None,
) -> dict[str, str]:
    """Export the images and their kept boxes in each format to ``out/<format>/`` (a local folder
    or a bucket prefix: see the module docs); the locations written. ``model_version`` and
    ``image_prefix`` are for the Label Studio tasks (see `handoff`)."""
    remote = is_remote(out)
    work = Path(tempfile.mkdtemp(dir=None if remote else out, prefix=".auto-label-"))
    try:
        import supervision as sv

        staged = _stage_images(images, work / "staged")
        images = [i for i in images if i.image.ref in staged]
        dataset = sv.DetectionDataset(
            classes=list(classes),
            images=[staged[i.image.ref] for i in images],
            annotations={staged[i.image.ref]: i.detections() for i in images},
        )
        written = {}
        for fmt in formats:
            target = work / fmt
            if fmt == "coco":
                dataset.as_coco(str(target / "images"), str(target / "annotations.json"))
            elif fmt == "label_studio":
                write_label_studio(images, classes, staged, target, model_version, image_prefix)
            elif fmt == "cvat":
                write_cvat(dataset, target)
            else:
                dataset.as_yolo(str(target / "images"), str(target / "labels"), str(target / "data.yaml"))
            written[fmt] = join(out, fmt)
            if remote:
                publish_folder(target, written[fmt], INDEX_FILES[fmt])
            else:
                _replace_dir(target, Path(written[fmt]))
        return written
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _thumbnail(labelled: LabelledImage, classes: Sequence[str]) -> bytes:
    import supervision as sv
    from PIL import Image

    assert labelled.image.data is not None
    scene = decode_rgb(labelled.image.data)[:, :, ::-1].copy()
    found = labelled.detections()
    captions = [f"{classes[c]} {s:.2f}" for c, s in zip(labelled.class_ids, labelled.scores, strict=True)]
    scene = sv.BoxAnnotator(thickness=2).annotate(scene, found)
    scene = sv.LabelAnnotator(text_scale=0.4).annotate(scene, found, labels=captions)
    image = Image.fromarray(np.ascontiguousarray(scene[:, :, ::-1]))
    image.thumbnail((THUMBNAIL_WIDTH, THUMBNAIL_WIDTH * 4))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


class GallerySink:
    """The review gallery, filled as batches arrive: an annotated thumbnail per labelled image,
    then ``index.html`` with per-class counts, a thumbnail grid per class and the review list.
    ``folder`` is a local folder or a bucket prefix; every file is written whole, the page last."""

    def __init__(self, folder: str, classes: Sequence[str]) -> None:
        self.folder, self.classes = folder, list(classes)
        self.counts: dict[str, int] = defaultdict(int)
        self.per_class: dict[str, list[str]] = defaultdict(list)

    def add(self, labelled: LabelledImage) -> None:
        """Draw an image's kept boxes into its thumbnail (the first few images of each class)."""
        if not labelled.class_ids:
            return
        names = sorted({self.classes[c] for c in labelled.class_ids})
        self._count(labelled)
        if all(len(self.per_class[n]) >= THUMBNAILS_PER_CLASS for n in names):
            return
        name = f"thumbs/{annotated_name(labelled.image)}"
        write_output(join(self.folder, name), _thumbnail(labelled, self.classes))
        for class_name in names:
            self.per_class[class_name].append(name)

    def _count(self, labelled: LabelledImage) -> None:
        for class_id in set(labelled.class_ids):
            self.counts[self.classes[class_id]] += labelled.class_ids.count(class_id)

    def add_part(self, images: Sequence[LabelledImage], thumbs: Mapping[str, Sequence[str]]) -> None:
        """Fold in a shard's part: its images' kept boxes, counted, and the thumbnails it drew into
        this folder (``thumbs``: class name → names, as `per_class` holds them), the first few kept."""
        for labelled in images:
            self._count(labelled)
        for class_name, names in thumbs.items():
            if class_name in self.classes:
                kept = self.per_class[class_name]
                kept.extend(str(n) for n in list(names)[: max(0, THUMBNAILS_PER_CLASS - len(kept))])

    def finish(self, review: Sequence[ReviewItem]) -> str:
        """Write the page; its location."""
        page = _page(self.classes, self.counts, self.per_class, review)
        write_output(join(self.folder, "index.html"), page.encode())
        return join(self.folder, "index.html")


def _page(
    classes: Sequence[str], counts: dict[str, int], per_class: dict[str, list[str]], review: Sequence[ReviewItem]
) -> str:
    esc = html.escape
    rows = "".join(f"<tr><td>{esc(c)}</td><td>{counts.get(c, 0)}</td></tr>" for c in classes)
    grids = "".join(
        f'<h2 id="class-{i}">{esc(c)} ({counts.get(c, 0)})</h2><div class="grid">'
        + "".join(f'<img src="{esc(src)}" alt="{esc(c)}">' for src in per_class.get(c, [])[:THUMBNAILS_PER_CLASS])
        + "</div>"
        for i, c in enumerate(classes)
    )
    review_rows = "".join(
        f"<tr><td>{esc(item.image_ref)}</td><td>{item.detection_index}</td><td>"
        + ", ".join(f"{esc(name)} {score:.2f}" for name, score in item.guesses)
        + "</td></tr>"
        for item in review
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>auto_label review</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px}} .grid{{display:flex;flex-wrap:wrap;gap:8px}}
.grid img{{width:{THUMBNAIL_WIDTH}px;border:1px solid #999}}</style></head>
<body><h1>auto_label review</h1>
<h2>Detections per class</h2><table><tr><th>class</th><th>detections</th></tr>{rows}</table>
{grids}
<h2 id="review">Low confidence: left for review ({len(review)})</h2>
<table><tr><th>image</th><th>detection</th><th>best guesses</th></tr>{review_rows}</table>
</body></html>
"""
