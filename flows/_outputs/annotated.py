"""Annotated copies of the images: boxes and labels drawn with supervision, each written whole
(a local file renamed into place, or one object in a bucket)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from .._steps.operations import decode_rgb, encode_jpeg
from .._steps.sources import load
from .._storage.access import is_remote, join
from .._storage.publish import write_output
from ..records import Batch, ImageRecord

__all__ = ["AnnotatedImageSink", "annotated_name"]


def annotated_name(image: ImageRecord) -> str:
    """File name of an image's annotated copy: its stem (and a video frame's index) plus a content
    prefix (refs may clash)."""
    stem = Path(image.ref.split("?")[0].split("#frame=")[0]).stem
    frame = "" if image.frame_index is None else f"-frame{image.frame_index}"
    return f"{stem}{frame}-{(image.sha256 or '')[:10]}.jpg"


class AnnotatedImageSink:
    """Draws each image's detections, captioned with their crops' labels, into ``folder`` (a local
    folder or a bucket prefix).

    Examples:
        ```python
        sink = AnnotatedImageSink(join(out, "annotated"))  # out: "/data/run" or "s3://results/run/"
        await sink.write(labelled_crops)  # a batch from `classify` after `crop`
        ```
    """

    def __init__(self, folder: str) -> None:
        self.folder = folder
        if not is_remote(folder):
            Path(folder).mkdir(parents=True, exist_ok=True)
        import supervision as sv  # imported when a run draws, not when a flow module loads

        self._boxes = sv.BoxAnnotator(thickness=2)
        self._labels = sv.LabelAnnotator(text_scale=0.4)

    async def write(self, batch: Batch) -> None:
        """One annotated JPEG per parent image of a crop batch that has detections: decoded, drawn,
        encoded and written on a worker thread (a 12 MP image takes ~0.3 s), off the flow's event loop."""
        await asyncio.to_thread(self.draw, batch)

    def draw(self, batch: Batch) -> None:
        """`write`, on the calling thread."""
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
