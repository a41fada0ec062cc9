"""`auto_label`: images + OWLv2 reference examples + class prompts → a labelled detection dataset.

OWLv2 finds objects like the examples (`detect`), each is cropped (`crop`) and embedded (`embed`),
and gets the class whose prompts it is most similar to (`classify` against each class's prompt
ensemble: several prompts per class are averaged in embedding space). A detection's score is the
zero-shot probability of its class (softmax of 100 × cosine similarity over the classes, as CLIP
computes it). It is not labelled but listed for review with its best guesses when that probability
is under ``min_probability`` (the classes disagree) or its cosine similarity to the class is under
``min_score`` (it is like none of them; ``min_score`` means the same in every flow). With one class
every probability is 1.0: only ``min_score`` can send a box to review, and a run without it says so.
The kept boxes, clipped to their images, are exported as COCO and/or YOLO through supervision.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, Literal

import numpy as np
from prefect.futures import PrefectFuture
from pydantic import Field

from prefect_roboflow.blocks.exceptions import InvalidInputError

from . import steps
from ._outputs.dataset import DEFAULT_FORMATS, GallerySink, LabelledImage, ReviewItem, write_datasets
from ._outputs.files import ParquetSink, show_location
from ._outputs.tables import DETECTIONS_SCHEMA, REVIEW_SCHEMA, record_rows, video_schema
from ._run import fanout
from ._run.artifacts import markdown_table
from ._run.batch import BatchRun
from ._run.fanout import FanOut, Shard
from ._run.flow import roboflow_flow
from ._run.parameters import check_video, resolve_out_dir
from ._run.totals import ImageCounts, RunTotals
from ._steps.cache import resolve_cache
from ._steps.models import EmbeddingFamily, detector_model, embedding_model, resolve_server
from ._steps.sources import ImageSource, load
from ._steps.vectors import normalise
from ._storage.access import join
from ._video.track import VideoTracks
from .records import Batch, ImageRecord, LabelSet
from .steps import ExampleSpec

__all__ = ["AutoLabelResult", "auto_label", "class_prompts"]

FLOW_KEY = "auto-label"
#: CLIP's logit scale: zero-shot probabilities are softmax(100 × cosine similarity).
LOGIT_SCALE = 100.0
ExportFormat = Literal["coco", "yolo", "label_studio", "cvat"]
Classes = list[str] | dict[str, str | list[str]]


class AutoLabelResult(ImageCounts):
    """What an `auto_label` run labelled and where the dataset is."""

    detections: int
    labelled: int
    review: int
    class_counts: dict[str, int]
    datasets: dict[str, str]
    labels_path: str
    review_path: str
    gallery_path: str
    object_counts: dict[str, int] = Field(default_factory=dict)  # videos: distinct tracked objects per class


def class_prompts(classes: Classes | Mapping[str, Any]) -> dict[str, list[str]]:
    """Class name → its prompts, from a list of prompts (each its own class) or a mapping.

    Raises:
        InvalidInputError: naming ``classes``: empty, a class without a prompt, a duplicate name.
    """
    if isinstance(classes, str) or not classes:
        raise InvalidInputError("classes", "give a list of prompts or a mapping of class name to prompts")
    if not isinstance(classes, Mapping):
        names = list(classes)
        if len(set(names)) != len(names):
            duplicated = sorted({n for n in names if names.count(n) > 1})
            raise InvalidInputError("classes", f"duplicate class names: {duplicated}")
        classes = {name: [name] for name in names}
    prompts = {}
    for name, given in classes.items():
        listed = [given] if isinstance(given, str) else list(given)
        if not str(name).strip() or not listed or any(not isinstance(p, str) or not p.strip() for p in listed):
            raise InvalidInputError(f"classes[{name!r}]", "each class needs a name and at least one non-empty prompt")
        prompts[str(name)] = listed
    return prompts


def ensemble(prompt_set: LabelSet, prompts: dict[str, list[str]]) -> LabelSet:
    """One vector per class: the mean of its prompts' unit vectors (the prompt-ensemble technique)."""
    vectors = normalise(prompt_set.vectors)
    index = {p: i for i, p in enumerate(prompt_set.names)}
    means = [vectors[[index[p] for p in listed]].mean(axis=0) for listed in prompts.values()]
    return LabelSet(prompt_set.model, tuple(prompts), normalise(np.vstack(means)).astype(np.float32))


def _probabilities(crop: ImageRecord) -> np.ndarray:
    assert crop.label is not None
    logits = LOGIT_SCALE * np.asarray(crop.label.scores, dtype=np.float64)
    odds = np.exp(logits - logits.max())
    return (odds / odds.sum()).astype(np.float32)


class _Labeller:
    """Sorts each crop batch into kept boxes (for the datasets and the gallery) and review items."""

    def __init__(
        self, classes: Sequence[str], min_score: float | None, min_probability: float, gallery: GallerySink
    ) -> None:
        self.classes, self.gallery = list(classes), gallery
        self.min_score, self.min_probability = min_score, min_probability
        self.schema = DETECTIONS_SCHEMA  # with the frame and tracker columns on video
        self.images: list[LabelledImage] = []
        self.review: list[ReviewItem] = []

    def rows(self, batch: Batch, model: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The batch's label rows (every image and detection) and review rows."""
        rows: list[dict[str, Any]] = []
        review_rows: list[dict[str, Any]] = []
        for parent, crops in batch.by_parent():
            if not parent.ok or not crops:
                status = "failed" if not parent.ok else "no_detections"
                rows.extend({**r, "status": status} for r in record_rows([parent], model, self.schema))
            if not parent.ok:
                continue
            parent = load(parent)  # from a Dask worker the bytes did not travel (see ImageRecord)
            labelled = LabelledImage(parent)
            for crop, row in zip(crops, record_rows(crops, model, self.schema), strict=True):
                rows.append(row)
                if not crop.ok or crop.crop is None:
                    continue
                box = np.asarray(crop.crop.xyxy, dtype=np.float32)  # clipped to the image (the box policy)
                probabilities = _probabilities(crop)
                best = int(probabilities.argmax())
                row.update(box_xyxy=box.tolist(), label_score=float(probabilities[best]))
                row.update(label_scores=probabilities.tolist())
                assert crop.label is not None
                similar = self.min_score is None or crop.label.scores[best] >= self.min_score
                if similar and probabilities[best] >= self.min_probability:
                    row.update(status="labelled", label=self.classes[best])
                    labelled.xyxy.append(box.tolist())
                    labelled.class_ids.append(best)
                    labelled.scores.append(float(probabilities[best]))
                else:
                    row.update(status="review", label=None)  # its best guesses are in the review table
                    review_rows.append(self._review(crop, row, probabilities))
            self.gallery.add(labelled)
            # keep the bytes only where the dataset export cannot read the image again from its path
            self.images.append(
                replace(labelled, image=replace(parent, data=None))
                if "://" not in parent.ref and parent.frame_index is None
                else labelled
            )
        return rows, review_rows

    def _review(self, crop: ImageRecord, row: dict[str, Any], probabilities: np.ndarray) -> dict[str, Any]:
        order = np.argsort(-probabilities, kind="stable")[:3]
        guesses = tuple((self.classes[i], float(probabilities[i])) for i in order)
        assert crop.crop is not None
        self.review.append(ReviewItem(crop.ref, crop.crop.detection_index, guesses))
        return {
            "image_ref": crop.ref,
            "image_sha256": row["image_sha256"],
            "detection_index": crop.crop.detection_index,
            "box_xyxy": row["box_xyxy"],
            "guesses": [g for g, _ in guesses],
            "guess_scores": [s for _, s in guesses],
        }


#: What a one-class run without ``min_score`` says in its log and summary.
ONE_CLASS_NOTE = (
    "one class: every box's class probability is 1.0, so min_probability sends none to review; "
    "set min_score (a cosine similarity, as in the other flows) to review the boxes least like the class"
)


@roboflow_flow(name="auto-label", flow_run_name="auto-label[{model}]", validate_parameters=True)
async def auto_label(
    images: ImageSource,
    examples: list[ExampleSpec],
    classes: Classes,
    out_dir: str,
    formats: Sequence[str] = DEFAULT_FORMATS,
    min_score: float | None = None,
    min_probability: float = 0.5,
    server: str | list[str] | None = None,
    model: EmbeddingFamily = "clip",
    version: str | None = None,
    detector_version: str | None = None,
    confidence: float = 0.99,
    batch_size: int = 32,
    cache_storage: str | None = None,
    max_failure_rate: float = 0.5,
    video_fps: float | None = 1.0,
    video_sample: str = "fps",
    image_prefix: str | None = None,
    fan_out: FanOut | None = None,
    shard: Shard | None = None,
) -> AutoLabelResult:
    """Find objects like the examples, label each with a class, and write a detection dataset.

    Args:
        images: A folder, a glob, or a list of paths and https URLs.
        examples: Reference images with example boxes (see `detect_crop_classify`).
        classes: Class prompts: a list (each prompt is a class), or class name → prompt or prompts.
        out_dir: Folder or bucket location (``s3://bucket/prefix/``, any fsspec URL,
            ``block://s3-bucket/<name>/<prefix>``) for ``labels.parquet``, ``review.parquet``,
            ``coco/``, ``yolo/``, ``gallery/`` (see `_dataset` for what a reader sees during a rewrite).
        formats: Some of ``"coco"``, ``"yolo"``, ``"label_studio"`` (``label_studio/tasks.json``: tasks
            with predictions) and ``"cvat"`` (``cvat/coco-1.0.zip``: CVAT's COCO 1.0 import); see `_outputs.handoff`.
        min_score: Detections whose cosine similarity to their best class is below this go to
            review, unlabelled (as `classify_images` and `detect_crop_classify` call theirs
            "unknown"). The one rule that works with a single class.
        min_probability: Detections whose class probability (softmax over the classes) is below
            this go to review, unlabelled: the classes compete for the box.
        server: A saved `InferenceServer` block name, a URL, or a list of URLs (several servers).
        model: ``"clip"`` or ``"perception_encoder"`` for the crops and prompts.
        version: Version of that model; detector_version: OWLv2's; their defaults when omitted.
        confidence: OWLv2 score threshold.
        batch_size: Images per task run.
        cache_storage: Folder or saved file-system block (``"type/name"``) for per-item results.
        max_failure_rate: The run fails (after writing its outputs) above this share of failed images.
        video_fps: For videos among ``images`` (``.mp4 .mov .avi .mkv .webm .m4v``): frames taken
            per second of video time; None takes every frame.
        video_sample: ``"fps"`` (a fixed rate), ``"keyframes"`` (the container's keyframes) or
            ``"scene"`` (a frame when the picture changes; see `_video.sample`). On video, each
            sampled frame is an image of the dataset, detections are tracked (``tracker_id``) and
            ``object_counts`` counts distinct objects per class.
        image_prefix: Label Studio tasks name each image as this prefix + its file name (the images
            are then written under ``label_studio/images/``); by default, by its own reference.
        fan_out: Split the job into shards that run as sub-runs of this flow's deployment (see
            `embed_images`): each shard writes its part of the folders ``labels/`` and ``review/``,
            draws its thumbnails into ``gallery/`` and keeps its labelled boxes; the parent then
            writes one COCO/YOLO dataset and one gallery page from all the shards' parts.
        shard: Set by a fanned-out run on its sub-runs: the part of the job this run does.
    """
    video = check_video(video_fps, video_sample)
    prompts = class_prompts(classes)
    srv = resolve_server(server)
    detector, embedder = detector_model(detector_version, srv), embedding_model(model, version, srv)
    reference, cache, out = steps.reference_examples(examples), resolve_cache(cache_storage), resolve_out_dir(out_dir)
    gallery = GallerySink(join(out, "gallery"), list(prompts))
    # each example box looked for in its own image, once the source and deployment are known good (a
    # typed error comes before any request): with the first batch, or after the fan-out; never in a shard
    check: list[PrefectFuture[list[str]]] = []

    def check_examples() -> None:
        if shard is None and not check:
            check.append(steps.check_example_boxes.submit(detector, reference, confidence, cache))

    notes = [ONE_CLASS_NOTE] if len(prompts) == 1 and min_score is None and shard is None else []
    tracks = VideoTracks()  # video frames: tracker ids across each video's frames
    run: RunTotals
    object_counts: dict[str, int]
    if fan_out is not None:
        settings = {"video_fps": video.fps, "video_sample": video.mode}
        tables = {"labels": DETECTIONS_SCHEMA, "review": REVIEW_SCHEMA}
        video_tables = {**tables, "labels": video_schema(DETECTIONS_SCHEMA, tracked=True)}
        run = fanned = await fanout.fan_out(FLOW_KEY, images, out, fan_out, tables, settings, video_tables)
        check_examples()
        for note in [*notes, *await asyncio.to_thread(check[0].result)]:
            run.warn(note)
        labelled, review_items = _merge_parts(fanned, gallery)
        object_counts = fanned.summed("object_counts")
        labels, review_path = fanned.folder("labels"), fanned.folder("review")
    else:
        description = f"Auto-labelling with {detector.label} and {embedder.label}"
        run = await BatchRun.listed(FLOW_KEY, images, batch_size, description, video=video, shard=shard)
        for note in notes:
            run.warn(note)
        all_prompts = list(dict.fromkeys(p for listed in prompts.values() for p in listed))
        class_set = ensemble(await asyncio.to_thread(steps.embed_labels, embedder, all_prompts, cache), prompts)
        labeller = _Labeller(list(prompts), min_score, min_probability, gallery)
        videos_in_job = run.videos or (shard is not None and shard.videos)  # one schema for every part of a job
        labeller.schema = video_schema(DETECTIONS_SCHEMA, tracked=True) if videos_in_job else DETECTIONS_SCHEMA

        def submit(batch: Batch) -> PrefectFuture[Batch]:
            check_examples()
            found: Any = steps.detect.submit(detector, batch, reference, confidence, cache)
            cropped: Any = steps.crop.submit(found)
            embedded: Any = steps.embed.submit(embedder, cropped, cache)
            return steps.classify.submit(embedded, class_set)

        def table(stem: str) -> str:
            return shard.table(out, stem) if shard else join(out, f"{stem}.parquet")

        async with (
            ParquetSink(table("labels"), labeller.schema) as sink,
            ParquetSink(table("review"), REVIEW_SCHEMA) as review,
        ):
            async for batch in run.process(submit):
                # the gallery's thumbnails are drawn and encoded on a worker thread
                rows, review_rows = await asyncio.to_thread(labeller.rows, tracks.track(batch), embedder)
                await run.write(sink, rows)
                await asyncio.to_thread(review.write, review_rows)
        labels, review_path = str(sink.path), str(review.path)
        for note in await asyncio.to_thread(check[0].result) if check else []:
            run.warn(note)
        object_counts = tracks.object_counts()
        if shard is not None:  # the parent writes the datasets and the gallery page once, from every shard's part
            await asyncio.to_thread(shard.save, out, run, {**_part(labeller), "object_counts": object_counts})
            outcome = _outcome(run, {}, labels, review_path, gallery.folder)
            outcome[0].object_counts = object_counts
            return await run.finish(*outcome, max_failure_rate)
        labelled, review_items = labeller.images, labeller.review
    version = f"{detector.label}+{embedder.label}"
    datasets = await asyncio.to_thread(
        write_datasets, labelled, list(prompts), formats, out, model_version=version, image_prefix=image_prefix
    )
    gallery_path = await asyncio.to_thread(gallery.finish, review_items)
    outcome = _outcome(run, datasets, labels, review_path, gallery_path)
    outcome[0].object_counts = object_counts
    return await run.finish(*outcome, max_failure_rate)


def _part(labeller: _Labeller) -> dict[str, Any]:
    """What a shard keeps for its parent: its labelled images (references and kept boxes), the
    thumbnails it drew per class and its review items."""
    return {
        "labelled": [image.dump() for image in labeller.images],
        "thumbs": dict(labeller.gallery.per_class),
        "review": [item.dump() for item in labeller.review],
    }


def _merge_parts(run: fanout.FannedOut, gallery: GallerySink) -> tuple[list[LabelledImage], list[ReviewItem]]:
    """Every shard's labelled images and review items, in shard order, and its thumbnails folded
    into ``gallery`` (a shard that never completed has none).

    Raises:
        InvalidInputError: naming ``out_dir``, when a shard's part is not what `_part` writes.
    """
    labelled: list[LabelledImage] = []
    review: list[ReviewItem] = []
    for index, part in enumerate(run.extras):
        try:
            images = [LabelledImage.restore(i, len(gallery.classes)) for i in part.get("labelled", [])]
            review.extend(ReviewItem.restore(item) for item in part.get("review", []))
            gallery.add_part(images, dict(part.get("thumbs", {})))
        except (TypeError, ValueError) as exc:
            raise InvalidInputError("out_dir", f"shard part-{index:05d}'s labelled part: {exc}") from None
        labelled.extend(images)
    return labelled, review


def _outcome(
    run: RunTotals, datasets: dict[str, str], labels: str, review: str, gallery: str
) -> tuple[AutoLabelResult, str, list[str]]:
    counts = run.counts()
    result = AutoLabelResult(
        **{**counts, "succeeded": counts["images"] - run.images_failed, "failed": run.images_failed},
        detections=run.statuses["labelled"] + run.statuses["review"],
        labelled=run.statuses["labelled"],
        review=run.statuses["review"],
        class_counts={k: v for k, v in run.labels.most_common()},
        datasets=datasets,
        labels_path=labels,
        review_path=review,
        gallery_path=gallery,
    )
    counts_table = markdown_table(
        [{"class": k, "labelled": v} for k, v in result.class_counts.items()], ["class", "labelled"]
    )
    sections = [
        f"## Classes\n\n{counts_table}",
        f"## Review\n\n{result.review} detection(s) under min_score or min_probability, with their best guesses: "
        f"`{review}`",
        f"## Outputs\n\n- review gallery: {show_location(gallery)}\n"
        + "".join(f"- {fmt.upper()}: `{path}`\n" for fmt, path in datasets.items())
        + f"- table: `{labels}`",
    ]
    title = f"{result.labelled} objects labelled in {result.images} images ({result.review} for review)"
    return result, title, sections
