"""The curation table: its columns, and its rows written a block at a time from the scores.

One row per source row (index rows first, in order, then the source's failed rows):

``image_ref, image_sha256, detection_index, split, status, error`` — who the row is, ``"ok"`` or
``"failed"`` and why; ``uniqueness, representativeness, cluster`` — the scores; ``duplicate_group,
duplicate_of`` — its near-duplicate group and the group's representative (null for the
representative itself); ``leak, leak_with`` — whether a near copy sits in another split, and the
closest one; ``selected, selection_rank`` — picked to label next, in pick order; ``label,
suggested_label, label_quality, label_issue`` — cleanlab's verdict on a labelled row.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from .label_issues import LabelIssues
from .scores import Scores
from .sources import Source

__all__ = ["CURATION_SCHEMA", "WRITE_BLOCK", "curation_blocks"]

#: Rows turned into one Arrow table at once.
WRITE_BLOCK = 262_144
CURATION_SCHEMA = pa.schema(
    [
        ("image_ref", pa.string()),
        ("image_sha256", pa.string()),
        ("detection_index", pa.int32()),
        ("split", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("uniqueness", pa.float32()),
        ("representativeness", pa.float32()),
        ("cluster", pa.int32()),
        ("duplicate_group", pa.int64()),
        ("duplicate_of", pa.string()),
        ("leak", pa.bool_()),
        ("leak_with", pa.string()),
        ("selected", pa.bool_()),
        ("selection_rank", pa.int32()),
        ("label", pa.string()),
        ("suggested_label", pa.string()),
        ("label_quality", pa.float32()),
        ("label_issue", pa.bool_()),
    ]
)


def _refs(source: Source, rows: np.ndarray) -> dict[int, str]:
    """The references of some rows (a group's representative, a leak's partner)."""
    wanted = np.unique(rows[rows >= 0])
    refs: dict[int, str] = {}
    for start in range(0, len(wanted), WRITE_BLOCK):
        part = wanted[start : start + WRITE_BLOCK]
        table = source.index.metadata(part)
        names = table.column("image_ref").to_pylist()
        if source.marked:
            names = [n.split("\x1f", 1)[-1] for n in names]
        refs.update(zip(part.tolist(), names, strict=True))
    return refs


def _named(values: np.ndarray, names: list[str]) -> pa.Array:
    lookup = np.asarray([*names, ""], dtype=object)
    return pa.array(np.where(values >= 0, lookup[values], None), pa.string())


def curation_blocks(source: Source, scores: Scores, labels: LabelIssues | None) -> Iterator[pa.Table]:
    """The table's rows, a block at a time (see the module docs)."""
    rows = source.index.rows
    others = np.where(scores.representative != np.arange(rows), scores.representative, -1)
    refs = _refs(source, np.concatenate([others, scores.leak_with]))
    split_names = np.asarray([*source.split_names, ""], dtype=object)
    for start in range(0, rows, WRITE_BLOCK):
        stop = min(rows, start + WRITE_BLOCK)
        meta = source.metadata(start, stop)
        n = stop - start
        part = slice(start, stop)
        splits = source.splits[part]
        group = scores.group[part]
        other, leak_with, pick = others[part], scores.leak_with[part], scores.pick[part]
        columns = {
            "image_ref": meta.column("image_ref"),
            "image_sha256": meta.column("image_sha256"),
            "detection_index": meta.column("detection_index"),
            "split": pa.array(np.where(splits >= 0, split_names[splits], None), pa.string()),
            "status": pa.array(["ok"] * n, pa.string()),
            "error": _errors(labels, start, stop),
            "uniqueness": pa.array(scores.uniqueness[part]),
            "representativeness": pa.array(scores.representativeness[part]),
            "cluster": pa.array(scores.cluster[part].astype(np.int32)),
            "duplicate_group": pa.array(group, mask=group < 0),
            "duplicate_of": pa.array([refs[r] if r >= 0 else None for r in other.tolist()], pa.string()),
            "leak": pa.array(leak_with >= 0),
            "leak_with": pa.array([refs[r] if r >= 0 else None for r in leak_with.tolist()], pa.string()),
            "selected": pa.array(pick >= 0),
            "selection_rank": pa.array(pick, mask=pick < 0),
        }
        columns.update(_label_columns(labels, part, n))
        yield pa.table(columns, schema=CURATION_SCHEMA)
    if source.failed.num_rows:
        failed = source.failed
        n = failed.num_rows
        columns = {
            name: failed.column(name) for name in ("image_ref", "image_sha256", "detection_index", "split", "error")
        }
        columns["status"] = pa.array(["failed"] * n, pa.string())
        yield pa.table(
            {f.name: columns.get(f.name, pa.nulls(n, f.type)) for f in CURATION_SCHEMA}, schema=CURATION_SCHEMA
        )


def _errors(labels: LabelIssues | None, start: int, stop: int) -> pa.Array:
    if labels is None or not labels.errors:
        return pa.nulls(stop - start, pa.string())
    return pa.array([labels.errors.get(row) for row in range(start, stop)], pa.string())


def _label_columns(labels: LabelIssues | None, part: slice, n: int) -> dict[str, pa.Array]:
    if labels is None:
        return {
            "label": pa.nulls(n, pa.string()),
            "suggested_label": pa.nulls(n, pa.string()),
            "label_quality": pa.nulls(n, pa.float32()),
            "label_issue": pa.nulls(n, pa.bool_()),
        }
    issue = labels.issue[part]
    quality = labels.quality[part]
    return {
        "label": _named(labels.given[part], labels.classes),
        "suggested_label": _named(labels.suggested[part], labels.classes),
        "label_quality": pa.array(quality, mask=np.isnan(quality)),
        "label_issue": pa.array(issue == 1, mask=issue < 0),
    }
