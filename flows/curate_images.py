"""`curate_images`: which images to label next, and which labels are probably wrong — at millions of rows.

Over an embeddings table or a vector index (or one per split), each row gets FiftyOne Brain's
**uniqueness** (weighted cosine distance to its 3 nearest rows), a **representativeness**
(closeness to its k-means centre, 20 clusters, within the cluster), its **near-duplicate group**
(as `find_duplicates` defines them), a **leak** flag (a near copy in another split), and for a
labelled table cleanlab's **label issues** (confident learning on the zero-shot probabilities);
then a **selection** of ``budget`` rows by greedy k-centre, duplicates skipped, that covers the
data. Outputs: ``curation.parquet``, a gallery (most and least unique, first picks, suspected
mistakes) and both as Prefect assets.

The index is read once, streamed (never every vector in memory as float32): rows become compact
sketches (`_curation.sketch`) that the neighbour search and the selection work on; pairs are
confirmed on the index's own vectors. Scores are cached by the rows' content and the parameters:
a rerun over the same rows computes none.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from prefect import get_run_logger
from pydantic import BaseModel

from ._curation.box_issues import BOX_ISSUES_SCHEMA, BoxIssues, box_issues
from ._curation.gallery import GALLERY_ROWS, GalleryItem, write_gallery
from ._curation.label_issues import LabelIssues, cached_label_issues
from ._curation.scores import Scores, Settings, cached_scores
from ._curation.sources import Source, describe, open_source
from ._curation.table import CURATION_SCHEMA, curation_blocks
from ._outputs.assets import assets_section, materialize_outputs
from ._outputs.files import ParquetSink, show_location
from ._run.artifacts import markdown_table, publish_summary
from ._run.events import emit_completed
from ._run.flow import roboflow_flow
from ._run.parameters import resolve_out_dir
from ._steps.cache import resolve_cache
from ._storage.access import is_remote, join

__all__ = ["CURATION_SCHEMA", "CurateImagesResult", "curate_images"]

FLOW_KEY = "curate-images"


class CurateImagesResult(BaseModel):
    """What a `curate_images` run found and where it wrote."""

    rows: int
    failed: int
    selected: int
    coverage_radius: float  # the largest cosine distance from any row to its nearest selected row
    duplicate_groups: int
    rows_in_groups: int
    leaks: int
    label_issues: int
    labelled: int
    box_label_issues: int  # reviewed images cleanlab's object-detection check flags
    box_issues_path: str | None
    from_cache: bool
    seconds: float
    curation_path: str
    gallery_path: str


@roboflow_flow(name="curate-images", flow_run_name="curate-images", validate_parameters=True)
async def curate_images(
    source: str | dict[str, str],
    out_dir: str,
    budget: int = 1000,
    threshold: float = 0.95,
    leak_threshold: float | None = None,
    k: int = 10,
    split_column: str = "split",
    labels: str | None = None,
    reviewed: str | None = None,
    classes: list[str] | None = None,
    cache_storage: str | None = None,
    gallery_rows: int = GALLERY_ROWS,
    seed: int = 0,
) -> CurateImagesResult:
    """Score every row's uniqueness, representativeness, duplicates, leaks and label issues, and
    select ``budget`` rows to label next.

    Args:
        source: An embeddings table (``.parquet``), a vector index (a folder, object-storage URL or
            ``block://`` path), or ``{split name: table or index}``.
        out_dir: Folder or bucket location for ``curation.parquet`` and ``gallery/``.
        budget: Rows to select (greedy k-centre; duplicate groups' other members never picked).
        threshold: Cosine similarity from which two rows are near duplicates, in (0, 1].
        leak_threshold: Cosine similarity from which a row in another split is a leak (default: ``threshold``).
        k: Neighbours kept per row (3-100) for duplicates and leaks; a larger group still chains.
        split_column: A table's column naming each row's split (used when present).
        labels: A labelled table (``label`` and ``label_scores`` per row: `classify_images`,
            `detect_crop_classify`, `auto_label`, or one with reviewed labels written back) whose
            labels cleanlab judges, joined by ``image_ref`` and ``detection_index``.
        reviewed: Reviewed boxes as a COCO ``annotations.json`` (exported by `auto_label`, or by Label
            Studio or CVAT after review) that cleanlab's object-detection check judges against the
            detections of ``labels``: ``box_issues.parquet``, one row per reviewed image.
        classes: The class names in ``label_scores`` order (default: read from the table).
        cache_storage: Where scores are cached (see `embed_images`); a rerun over the same rows
            reads them back.
        gallery_rows: Tiles per gallery section (0: no thumbnails, the page still lists the sections).
        seed: Seeds the sketch's random projection and the k-means of the neighbour lists.

    Returns:
        Counts, the selection's coverage radius, and the outputs' locations. Table columns: see
        `prefect_roboflow.flows._curation.table`.

    Raises:
        InvalidInputError: naming the parameter, before anything is read: a bad number, a missing
            source, a table without embeddings, splits of different models.
    """
    logger = get_run_logger()
    started = time.perf_counter()
    out = resolve_out_dir(out_dir)
    cache = resolve_cache(cache_storage)
    settings = Settings(threshold, leak_threshold if leak_threshold is not None else threshold, k, budget, seed)
    with tempfile.TemporaryDirectory(dir=None if is_remote(out) else out, prefix=".curate-images-") as scratch:
        opened = await asyncio.to_thread(open_source, source, Path(scratch), split_column)
        await asyncio.to_thread(opened.read_identity)
        logger.info(
            "Curating %s rows of %s (%s %s)",
            opened.index.rows,
            describe(source),
            opened.index.family,
            opened.index.version,
        )
        scores, cached = await asyncio.to_thread(cached_scores, cache, opened, settings, logger.info)
        judged = await asyncio.to_thread(cached_label_issues, cache, opened, labels, classes) if labels else None
        boxes = await asyncio.to_thread(_box_issues, labels, reviewed, judged) if reviewed else None
        path = await asyncio.to_thread(_write_table, join(out, "curation.parquet"), opened, scores, judged)
        boxes_path = await asyncio.to_thread(_write_boxes, join(out, "box_issues.parquet"), boxes) if boxes else None
        gallery = await asyncio.to_thread(_gallery, join(out, "gallery"), opened, scores, judged, gallery_rows, boxes)
    result = CurateImagesResult(
        rows=opened.index.rows + opened.failed.num_rows,
        failed=opened.failed.num_rows,
        selected=int((scores.pick >= 0).sum()),
        coverage_radius=round(scores.radius, 6),
        duplicate_groups=int(scores.group.max() + 1) if len(scores.group) else 0,
        rows_in_groups=int((scores.group >= 0).sum()),
        leaks=int((scores.leak_with >= 0).sum()),
        label_issues=judged.issues if judged else 0,
        labelled=int((judged.given >= 0).sum()) if judged else 0,
        box_label_issues=boxes.issues if boxes else 0,
        box_issues_path=boxes_path,
        from_cache=cached,
        seconds=round(time.perf_counter() - started, 3),
        curation_path=path,
        gallery_path=gallery,
    )
    await _publish(result, source, opened, scores, judged)
    return result


def _write_table(path: str, source: Source, scores: Scores, judged: LabelIssues | None) -> str:
    with ParquetSink(path, CURATION_SCHEMA) as sink:
        for block in curation_blocks(source, scores, judged):
            sink.write_table(block)
    return str(sink.path)


def _box_issues(labels: str | None, reviewed: str, judged: LabelIssues | None) -> BoxIssues:
    from ._storage.parquet import read_table

    assert labels is not None and judged is not None  # the contract asks for labels with reviewed
    return box_issues(read_table(labels, field="labels"), reviewed, judged.classes)


def _write_boxes(path: str, boxes: BoxIssues) -> str:
    with ParquetSink(path, BOX_ISSUES_SCHEMA) as sink:
        sink.write_table(boxes.table)
    return str(sink.path)


def _items(source: Source, rows: np.ndarray, caption: Any) -> list[GalleryItem]:
    if len(rows) == 0:
        return []
    refs = source.index.metadata(rows).column("image_ref").to_pylist()
    if source.marked:
        refs = [r.split("\x1f", 1)[-1] for r in refs]
    return [GalleryItem(ref, caption(int(row))) for ref, row in zip(refs, rows.tolist(), strict=True)]


def _gallery(
    folder: str, source: Source, scores: Scores, judged: LabelIssues | None, size: int, boxes: BoxIssues | None
) -> str:
    order = np.argsort(-scores.uniqueness, kind="stable")
    picks = np.argsort(np.where(scores.pick >= 0, scores.pick, np.iinfo(np.int32).max), kind="stable")
    picks = picks[: min(size, int((scores.pick >= 0).sum()))]

    def scored(row: int) -> str:
        return f"uniqueness {scores.uniqueness[row]:.3f}, representativeness {scores.representativeness[row]:.3f}"

    sections = [
        ("Most unique", _items(source, order[:size], scored)),
        ("Least unique", _items(source, order[::-1][:size], scored)),
        ("Selected first", _items(source, picks, lambda r: f"pick {scores.pick[r] + 1}; {scored(r)}")),
    ]
    if judged is not None:
        flagged = np.flatnonzero(judged.issue == 1)
        flagged = flagged[np.argsort(judged.quality[flagged], kind="stable")][:size]

        def mistaken(row: int) -> str:
            given, suggested = judged.classes[judged.given[row]], judged.classes[judged.suggested[row]]
            return f"labelled {given!r}, probably {suggested!r} (label quality {judged.quality[row]:.3f})"

        sections.append(("Suspected label mistakes", _items(source, flagged, mistaken)))
    if boxes is not None:
        flagged_boxes = boxes.table.filter(boxes.table.column("label_issue")).sort_by("label_quality").slice(0, size)
        sections.append(
            (
                "Suspected box label mistakes (reviewed)",
                [
                    GalleryItem(ref, f"box label quality {quality:.3f}")
                    for ref, quality in zip(
                        flagged_boxes.column("image_ref").to_pylist(),
                        flagged_boxes.column("label_quality").to_pylist(),
                        strict=True,
                    )
                ],
            )
        )
    return write_gallery(folder, sections, "curate_images")


async def _publish(
    result: CurateImagesResult,
    source: str | Mapping[str, str],
    opened: Source,
    scores: Scores,
    judged: LabelIssues | None,
) -> None:
    figures: list[dict[str, Any]] = [
        {"figure": "rows (failed)", "value": f"{result.rows} ({result.failed})"},
        {
            "figure": "selected / coverage radius (cosine distance)",
            "value": f"{result.selected} / {result.coverage_radius}",
        },
        {"figure": "duplicate groups (rows in them)", "value": f"{result.duplicate_groups} ({result.rows_in_groups})"},
        {"figure": "rows leaking into another split", "value": result.leaks},
        {"figure": "label issues / labelled rows", "value": f"{result.label_issues} / {result.labelled}"},
        {"figure": "reviewed images with box label issues", "value": result.box_label_issues},
        {
            "figure": "sketch values a row / neighbour lists / selection passes",
            "value": f"{scores.sketch_width} / {scores.lists} / {scores.passes}",
        },
        {"figure": "scores from the cache", "value": result.from_cache},
    ]
    keys = await materialize_outputs(
        FLOW_KEY,
        [p for p in (result.curation_path, result.box_issues_path, result.gallery_path) if p],
        source if isinstance(source, str) else list(source.values()),
        {"rows": result.rows, "failed": result.failed, "selected": result.selected},
        [f"{opened.index.family} {opened.index.version}"],
    )
    await publish_summary(
        FLOW_KEY,
        f"{result.selected} of {result.rows} rows selected to label; {result.duplicate_groups} duplicate groups, "
        f"{result.leaks} leaks, {result.label_issues} label issues",
        [
            markdown_table(figures, ["figure", "value"]),
            f"Table: {show_location(result.curation_path)}; gallery: {show_location(result.gallery_path)}",
            assets_section(keys),
        ],
    )
    emit_completed(FLOW_KEY, result.model_dump())
