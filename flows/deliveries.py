"""One webhook delivery through a flow's steps, its rows one part of a dataset folder.

The webhook receiver (``deployments/webhook.py --via task-worker``) hands each delivery it accepts to a
long-lived Prefect task worker (``deployments/serve.py --task-worker``), which calls `run_delivery`
in a background task run: the images go through the public steps of `embed_images` or
`detect_crop_classify` — the same content cache, the same failed rows with their reasons, the same
typed errors, checked by the same parameter contract — and the rows are published whole (a temp
file renamed into place, or one object) as one part of the flow's dataset folder under ``out_dir``::

    <out_dir>/embed-images/deliveries/embeddings/delivery-<id>.parquet
    <out_dir>/detect-crop-classify/deliveries/detections/delivery-<id>.parquet
    <out_dir>/detect-crop-classify/deliveries/annotated/<image>.jpg

A part is named after its delivery, so a delivery run twice (a sender's retry, or a delivery run
again after its worker died) replaces its own part: each (delivery, image) has its rows in the
folder once. Every part has the columns of the flow's table on video (``frame_index``,
``frame_time_s``, and ``tracker_id`` for detections; null for photos), so the folder reads as one
table::

    import pandas as pd
    pd.read_parquet("/data/roboflow/embed-images/deliveries/embeddings/")

Each step is a task run of its own inside the delivery's (``embed[clip ViT-B-16] batch 1/1``), as
in the flows; a delivery is a handful of images, not a job: a folder of thousands belongs to the
deployments (schedules, fan-out), whose runs add progress, summaries and assets.

Examples:
    ```python
    from prefect_roboflow.flows.deliveries import run_delivery

    result = run_delivery("d-42", "embed_images", ["/data/in/a.jpg", "/data/in/b.jpg"], "/data/roboflow")
    result.table  # '/data/roboflow/embed-images/deliveries/embeddings/delivery-d-42.parquet'
    ```
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from prefect_roboflow.blocks.exceptions import InvalidInputError

from . import steps
from ._outputs.annotated import AnnotatedImageSink
from ._outputs.files import ParquetSink
from ._outputs.tables import DETECTIONS_SCHEMA, EMBEDDINGS_SCHEMA, detection_rows, record_rows, video_schema
from ._run.parameters import CONTRACTS, check_video, resolve_out_dir
from ._run.totals import check_failure_rate
from ._steps.cache import resolve_cache
from ._steps.models import detector_model, embedding_model, resolve_server
from ._steps.sources import ImageSource, count_records, iter_record_batches
from ._storage.access import join
from ._video.track import VideoTracks
from .records import Batch, StepReport
from .steps import ExampleSpec

__all__ = [
    "DELIVERY_FLOWS",
    "DeliveryResult",
    "delivery_folder",
    "delivery_table",
    "run_delivery",
]

#: Each flow a delivery can name: its output key (as the flow's own runs) and its table's name.
DELIVERY_FLOWS: dict[str, tuple[str, str]] = {
    "embed_images": ("embed-images", "embeddings"),
    "detect_crop_classify": ("detect-crop-classify", "detections"),
}
#: A delivery id as the webhook takes it (no ``.`` or ``/``: it names a file).
DELIVERY_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
#: Images per step task run when the delivery does not say (the flows' defaults).
DEFAULT_BATCH_SIZE = {"embed_images": 128, "detect_crop_classify": 32}


class DeliveryResult(BaseModel):
    """What one delivery's run did and where its rows are."""

    delivery_id: str
    flow: str
    images: int
    images_failed: int
    rows: int
    requests: int
    from_cache: int
    table: str

    def check_failure_rate(self, max_failure_rate: float = 0.5) -> None:
        """The flows' failure rule over the delivery's images.

        Raises:
            TooManyFailuresError: more than ``max_failure_rate`` of them failed (the rows are written).
        """
        check_failure_rate(self.images_failed, self.images, max_failure_rate)


def _flow(flow: str) -> tuple[str, str]:
    if flow not in DELIVERY_FLOWS:
        raise InvalidInputError("flow", f"expected one of {sorted(DELIVERY_FLOWS)}, got {flow!r}")
    return DELIVERY_FLOWS[flow]


def delivery_folder(out_dir: str, flow: str) -> str:
    """The dataset folder of a flow's delivery parts (``<out_dir>/embed-images/deliveries/embeddings``)."""
    key, table = _flow(flow)
    return join(join(join(out_dir, key), "deliveries"), table)


def delivery_table(out_dir: str, flow: str, delivery_id: str) -> str:
    """Where a delivery's rows are published: ``delivery-<id>.parquet`` in `delivery_folder`.

    Raises:
        InvalidInputError: naming ``delivery_id`` when it is not 1-128 of ``A-Z a-z 0-9 _ -``.
    """
    if not isinstance(delivery_id, str) or not DELIVERY_ID.fullmatch(delivery_id):
        raise InvalidInputError("delivery_id", f"expected 1-128 of A-Z a-z 0-9 _ -, got {delivery_id!r:.80}")
    return join(delivery_folder(out_dir, flow), f"delivery-{delivery_id}.parquet")


class _Tally:
    """A delivery's counts, batch by batch."""

    def __init__(self) -> None:
        self.images = self.images_failed = self.rows = self.requests = self.from_cache = 0

    def add(self, batch: Batch, rows: int) -> None:
        images = batch.parents or batch.records
        self.images += len(images)
        self.images_failed += sum(not r.ok for r in images)
        self.rows += rows
        reports: list[StepReport] = batch.reports
        self.requests += sum(len(r.infos) for r in reports)
        self.from_cache += sum(r.cached for r in reports)


def run_delivery(
    delivery_id: str,
    flow: str,
    images: ImageSource,
    out_dir: str,
    *,
    server: str | list[str] | None = None,
    model: str = "clip",
    version: str | None = None,
    batch_size: int | None = None,
    cache_storage: str | None = None,
    examples: Sequence[ExampleSpec | dict[str, Any]] | None = None,
    labels: Sequence[str] | None = None,
    detector_version: str | None = None,
    confidence: float = 0.99,
    padding: int = 0,
    min_score: float | None = None,
    video_fps: float | None = 1.0,
    video_sample: str = "fps",
    max_failure_rate: float = 0.5,
) -> DeliveryResult:
    """Run one delivery's images through ``flow``'s steps and publish its rows as one part.

    Call it inside a task run (the task worker's): each step is a task run of its own. The
    parameters are the flow's, checked by its contract before any request (``examples`` and
    ``labels`` only for ``detect_crop_classify``); ``max_failure_rate`` is checked by the caller
    with `DeliveryResult.check_failure_rate` once the rows are safe.

    Raises:
        InvalidInputError: naming the parameter, before any request (``flow``, ``delivery_id`` too).
    """
    table = delivery_table(out_dir, flow, delivery_id)  # checks flow and delivery_id
    size = batch_size if batch_size is not None else DEFAULT_BATCH_SIZE[flow]
    common: dict[str, Any] = {"images": images, "out_dir": out_dir, "model": model, "version": version}
    common.update(batch_size=size, max_failure_rate=max_failure_rate, video_fps=video_fps, video_sample=video_sample)
    if flow == "embed_images":
        CONTRACTS[flow].check({**common, "index_path": None})
    else:
        common.update(examples=examples, labels=labels, detector_version=detector_version, confidence=confidence)
        CONTRACTS[flow].check({**common, "padding": padding, "min_score": min_score})
    video = check_video(video_fps, video_sample)
    srv = resolve_server(server)
    embedder = embedding_model(model, version, srv)
    cache = resolve_cache(cache_storage)
    out = resolve_out_dir(out_dir)
    table = delivery_table(out, flow, delivery_id)
    expected, _ = count_records(images, video)
    batches = max(1, math.ceil(expected / size))
    tally = _Tally()
    if flow == "embed_images":
        schema = video_schema(EMBEDDINGS_SCHEMA)
        with ParquetSink(table, schema) as sink:
            for i, records in enumerate(iter_record_batches(images, size, video), 1):
                batch = steps.embed(embedder, Batch(records, f"{i}/{max(i, batches)}"), cache)
                rows = record_rows(batch.records, embedder, schema)
                sink.write(rows)
                tally.add(batch, len(rows))
    else:
        assert examples is not None and labels is not None  # the contract has checked them
        detector = detector_model(detector_version, srv)
        reference = steps.reference_examples(examples)
        label_set = steps.embed_labels(embedder, labels, cache)
        schema = video_schema(DETECTIONS_SCHEMA, tracked=True)
        key, _ = _flow(flow)
        annotated = AnnotatedImageSink(join(join(join(out, key), "deliveries"), "annotated"))
        tracks = VideoTracks()

        def write(sink: ParquetSink, labelled: Batch) -> None:
            rows = detection_rows(labelled, embedder, schema)
            sink.write(rows)
            annotated.draw(labelled)
            tally.add(labelled, len(rows))

        with ParquetSink(table, schema) as sink:
            for i, records in enumerate(iter_record_batches(images, size, video), 1):
                found = steps.detect(detector, Batch(records, f"{i}/{max(i, batches)}"), reference, confidence, cache)
                embedded = steps.embed(embedder, steps.crop(found, padding), cache)
                # a video frame whose new tracks are not settled yet comes with a later batch (or `finish`)
                write(sink, tracks.track(steps.classify(embedded, label_set, min_score)))
            write(sink, tracks.finish())
    return DeliveryResult(
        delivery_id=delivery_id,
        flow=flow,
        images=tally.images,
        images_failed=tally.images_failed,
        rows=tally.rows,
        requests=tally.requests,
        from_cache=tally.from_cache,
        table=str(sink.path),
    )
