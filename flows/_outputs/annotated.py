"""Annotated copies of the images: boxes and labels drawn with supervision, each written whole
(a local file renamed into place, or one object in a bucket)."""

from __future__ import annotations

from pathlib import Path

from .._steps.operations import decode_rgb, encode_jpeg
from .._steps.sources import load
from .._storage.access import is_remote, join
from .._storage.publish import write_output
from ..records import Batch, ImageRecord

__all__ = ["AnnotatedImageSink", "annotated_name"]


def annotated_name(image: ImageRecord) -> str:
    """File name of an image's annotated copy: its stem plus a content prefix (refs may clash)."""
    return f"{Path(image.ref.split('?')[0]).stem}-{(image.sha256 or '')[:10]}.jpg"


class AnnotatedImageSink:
    """Draws each image's detections, captioned with their crops' labels, into ``folder`` (a local
    folder or a bucket prefix).

    Examples:
        ```python
        sink = AnnotatedImageSink(join(out, "annotated"))  # out: "/data/run" or "s3://results/run/"
        sink.write(labelled_crops)  # a batch from `classify` after `crop`
        ```
    """

    def __init__(self, folder: str) -> None:
        self.folder = folder
        if not is_remote(folder):
            Path(folder).mkdir(parents=True, exist_ok=True)
        import supervision as sv  # imported when a run draws, not when a flow module loads

        self._boxes = sv.BoxAnnotator(thickness=2)
        self._labels = sv.LabelAnnotator(text_scale=0.4)

    def write(self, batch: Batch) -> None:
        """One annotated JPEG per parent image of a crop batch that has detections."""
        for parent, crops in batch.by_parent():
            if not crops or parent.detections is None:
                continue
            parent = load(parent)  # from a Dask worker the bytes did not travel (see ImageRecord)
            if parent.data is None or parent.detections is None:
                continue
            captions = [f"{c.label.name} {c.label.score:.2f}" if c.ok and c.label else "failed" for c in crops]
            scene = decode_rgb(parent.data)[:, :, ::-1].copy()
            scene = self._boxes.annotate(scene, parent.detections)
            scene = self._labels.annotate(scene, parent.detections, labels=captions)
            write_output(join(self.folder, annotated_name(parent)), encode_jpeg(scene[:, :, ::-1].copy()))
