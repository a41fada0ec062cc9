"""`detect_crop_classify`: few-shot detection → crops → embeddings → zero-shot labels.

For each batch of images: OWLv2 finds objects like the example boxes (`detect`), each detection
is cropped with supervision (`crop`) and embedded with CLIP or Perception Encoder (`embed`), and
each crop gets the label prompt it is most similar to (`classify`). Label prompts are embedded
once per run, and cached; annotated copies of the images are drawn as the batches arrive.
"""

from __future__ import annotations

import asyncio
from typing import Any

from prefect.futures import PrefectFuture
from pydantic import Field

from . import steps
from ._outputs.annotated import AnnotatedImageSink
from ._outputs.files import ParquetSink
from ._outputs.tables import DETECTIONS_SCHEMA, detection_rows, video_schema
from ._run import fanout
from ._run.artifacts import markdown_table
from ._run.batch import BatchRun
from ._run.fanout import FanOut, Shard
from ._run.flow import roboflow_flow
from ._run.parameters import check_video, resolve_out_dir
from ._run.stats import RequestFigures
from ._run.totals import RunTotals
from ._steps.cache import resolve_cache
from ._steps.models import EmbeddingFamily, detector_model, embedding_model, resolve_server
from ._steps.sources import ImageSource
from ._storage.access import join
from ._video.sink import AnnotatedVideoSink
from ._video.track import VideoTracks
from .steps import ExampleSpec

__all__ = ["DETECTIONS_SCHEMA", "DetectCropClassifyResult", "ExampleSpec", "detect_crop_classify"]

FLOW_KEY = "detect-crop-classify"
SAMPLE_COLUMNS = ["image_ref", "detector_class", "detector_confidence", "label", "label_score", "status", "error"]


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
    object_counts: dict[str, int] = Field(default_factory=dict)  # videos: distinct tracked objects per label
    annotated_videos: list[str] = Field(default_factory=list)


@roboflow_flow(name="detect-crop-classify", flow_run_name="detect-crop-classify[{model}]", validate_parameters=True)
async def detect_crop_classify(
    images: ImageSource,
    examples: list[ExampleSpec],
    labels: list[str],
    out_dir: str,
    server: str | list[str] | None = None,
    model: EmbeddingFamily = "clip",
    version: str | None = None,
    detector_version: str | None = None,
    confidence: float = 0.99,
    padding: int = 0,
    min_score: float | None = None,
    batch_size: int = 32,
    cache_storage: str | None = None,
    max_failure_rate: float = 0.5,
    video_fps: float | None = 1.0,
    video_sample: str = "fps",
    fan_out: FanOut | None = None,
    shard: Shard | None = None,
) -> DetectCropClassifyResult:
    """Find objects like the examples, crop them, embed the crops, and label each crop.

    Args:
        images: A folder, a glob, or a list of paths and https URLs.
        examples: Reference images with example boxes (centre ``x, y``, size ``w, h`` in
            pixels, ``cls``, optional ``negative``).
        labels: Label prompts to sort the crops into, e.g. ``["a photo of an apple", ...]``.
        out_dir: Folder or bucket location (``s3://bucket/prefix/``, any fsspec URL,
            ``block://s3-bucket/<name>/<prefix>``) for ``detections.parquet`` and ``annotated/``.
        server: A saved `InferenceServer` block name, a URL or a list of URLs; defaults to ``INFERENCE_SERVER_URL``,
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
        video_fps: For videos among ``images`` (``.mp4 .mov .avi .mkv .webm .m4v``): frames taken
            per second of video time; None takes every frame.
        video_sample: ``"fps"`` (a fixed rate), ``"keyframes"`` (the container's keyframes) or
            ``"scene"`` (a frame when the picture changes; see `_video.sample`).
        fan_out: Split the job into shards that run as sub-runs of this flow's deployment (see
            `embed_images`): each shard draws its images into ``annotated/`` and writes its part of
            the folder ``detections/``; the counts are the shards' summed.
        shard: Set by a fanned-out run on its sub-runs: the part of the job this run does.

    Returns:
        Counts, label counts and output paths. One row per detection, one per image without any
        (``status="no_detections"``), and one per failed image: every image has a row. On video,
        each sampled frame is an image; its detections are tracked across the video's frames
        (``tracker_id``), ``object_counts`` counts distinct objects per label, and ``annotated/``
        also holds one annotated MP4 per video.
    """
    video = check_video(video_fps, video_sample)
    srv = resolve_server(server)
    detector, embedder = detector_model(detector_version, srv), embedding_model(model, version, srv)
    reference = steps.reference_examples(examples)
    cache = resolve_cache(cache_storage)
    out = resolve_out_dir(out_dir)
    # each example box looked for in its own image, once the source and deployment are known good (a
    # typed error comes before any request): with the first batch, or after the fan-out; never in a shard
    check: list[PrefectFuture[list[str]]] = []

    def check_examples() -> None:
        if shard is None and not check:
            check.append(steps.check_example_boxes.submit(detector, reference, confidence, cache))

    run: RunTotals
    if fan_out is not None:
        settings = {"video_fps": video.fps, "video_sample": video.mode}
        tables, video_tables = {"detections": DETECTIONS_SCHEMA}, {"detections": video_schema(DETECTIONS_SCHEMA, True)}
        fanned = await fanout.fan_out(FLOW_KEY, images, out, fan_out, tables, settings, video_tables)
        check_examples()
        for note in await asyncio.to_thread(check[0].result):
            fanned.warn(note)
        fanned.videos = sum(int(extra.get("videos", 0)) for extra in fanned.extras)
        videos_written = [str(v) for extra in fanned.extras for v in extra.get("annotated_videos", [])]
        outcome = _outcome(
            fanned, fanned.folder("detections"), join(out, "annotated"), fanned.summed("object_counts"), videos_written
        )
        return await fanned.finish(*outcome, max_failure_rate)
    annotated = AnnotatedImageSink(join(out, "annotated"))
    description = f"Detecting with {detector.label}, labelling with {embedder.label}"
    run = await BatchRun.listed(FLOW_KEY, images, batch_size, description, video=video, shard=shard)
    label_set = await asyncio.to_thread(steps.embed_labels, embedder, labels, cache)

    def submit(batch: steps.Batch) -> PrefectFuture[steps.Batch]:  # each step gets its input as a future
        check_examples()
        found: Any = steps.detect.submit(detector, batch, reference, confidence, cache)
        cropped: Any = steps.crop.submit(found, padding)
        embedded: Any = steps.embed.submit(embedder, cropped, cache)
        return steps.classify.submit(embedded, label_set, min_score)

    videos_in_job = run.videos or (shard is not None and shard.videos)  # one schema for every part of a job
    schema = video_schema(DETECTIONS_SCHEMA, tracked=True) if videos_in_job else DETECTIONS_SCHEMA
    tracks, videos = VideoTracks(), AnnotatedVideoSink(annotated.folder) if run.videos else None
    table = shard.table(out, "detections") if shard else join(out, "detections.parquet")
    try:
        async with ParquetSink(table, schema) as sink:
            async for batch in run.process(submit):
                batch = tracks.track(batch)  # video frames: tracker ids across each video's frames
                await run.write(sink, detection_rows(batch, embedder, schema))
                await annotated.write(batch)
                if videos is not None:  # H.264 encoding: on a worker thread, off the flow's event loop
                    await asyncio.to_thread(videos.write, batch)
    except BaseException:
        if videos is not None:  # an error mid-run publishes no video and leaves no encoder open
            videos.abort()
        raise
    written = await asyncio.to_thread(videos.close) if videos is not None else []
    for note in await asyncio.to_thread(check[0].result) if check else []:
        run.warn(note)
    counts = tracks.object_counts()
    if shard is not None:  # the parent adds up the shards' objects (a video is in one shard)
        extras = {"object_counts": counts, "annotated_videos": written, "videos": run.videos}
        await asyncio.to_thread(shard.save, out, run, extras)
    return await run.finish(*_outcome(run, str(sink.path), annotated.folder, counts, written), max_failure_rate)


def _outcome(
    run: RunTotals, table: str, annotated: str, object_counts: dict[str, int], videos: list[str]
) -> tuple[DetectCropClassifyResult, str, list[str]]:
    """The run's result, summary title and summary sections."""
    result = DetectCropClassifyResult(
        images=run.images,
        images_failed=run.images_failed,
        images_without_detections=run.statuses["no_detections"],
        detections=run.statuses["ok"],
        detections_failed=run.statuses["failed"] - run.images_failed,
        label_counts=dict(run.labels.most_common()),
        **run.figures(),
        detections_path=table,
        annotated_dir=annotated,
        object_counts=object_counts,
        annotated_videos=videos,
    )
    sample = [{**r, "label_score": "" if r["label_score"] is None else f"{r['label_score']:.3f}"} for r in run.sample]
    counts = [{"label": k, "count": v} for k, v in run.labels.most_common()]
    sections = [
        "## Labels\n\n" + markdown_table(counts, ["label", "count"]),
        "## Example rows\n\n" + markdown_table(sample, SAMPLE_COLUMNS),
        f"## Outputs\n\n- table: `{table}`\n- annotated images: `{annotated}`",
    ]
    if run.videos:
        objects = [{"label": k, "objects": v} for k, v in result.object_counts.items()]
        sections.insert(1, "## Objects in videos (tracked)\n\n" + markdown_table(objects, ["label", "objects"]))
        sections[-1] += "".join(f"\n- annotated video: `{v}`" for v in videos)
    title = (
        f"{result.detections} objects found in {result.images} images ({result.images_without_detections} without any)"
    )
    return result, title, sections
