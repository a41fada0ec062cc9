"""Label issues: cleanlab's confident learning over a labelled table's zero-shot probabilities.

The labelled table is one `classify_images`, `detect_crop_classify` or `auto_label` wrote (or the
same table with reviewed labels written back into its ``label`` column): per row a ``label`` and
``label_scores``, one value per class. Those scores are the model's ``pred_probs`` — taken as they
are when they are probabilities (`auto_label`'s: non-negative, summing to 1), else read as
CLIP cosine similarities and turned into probabilities as CLIP does, softmax of 100 × similarity.
`cleanlab.filter.find_label_issues` then flags the rows whose label confident learning doubts,
and `cleanlab.rank.get_label_quality_scores` scores every label (0: surely wrong, 1: surely
right). No home-made score: the judgement is cleanlab's.

Rows join the curation's rows by ``(image_ref, detection_index)``. A row whose scores do not have
one value per class, or whose label is not a class, is not scored and says why; ``"unknown"`` and
empty labels are not labels. `cached_label_issues` stores the verdicts under the rows' digest, the
labelled table's bytes and the classes: a rerun reads them back.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from prefect_roboflow.blocks.exceptions import InvalidInputError

from .._steps.cache import ContentCache, content_key
from .._storage.access import read_bytes
from .._storage.parquet import read_table
from .sources import Source

__all__ = ["LOGIT_SCALE", "LabelIssues", "cached_label_issues", "label_issues"]

#: CLIP's logit scale: zero-shot probabilities are softmax(100 × cosine similarity).
LOGIT_SCALE = 100.0
NOT_A_LABEL = {"", "unknown"}


@dataclass
class LabelIssues:
    """Per curation row: the given and suggested class, cleanlab's label quality and verdict."""

    classes: list[str]
    given: np.ndarray  # class index, -1: no label
    suggested: np.ndarray  # the most probable class, -1: no scores
    quality: np.ndarray  # float32, NaN where not scored
    issue: np.ndarray  # int8: 1 an issue, 0 not, -1 not scored
    errors: dict[int, str] = field(default_factory=dict)  # row → why its label was not scored

    @property
    def issues(self) -> int:
        """How many rows cleanlab flags."""
        return int((self.issue == 1).sum())

    def dump(self) -> bytes:
        """As one cache entry."""
        buffer = io.BytesIO()
        facts = json.dumps({"classes": self.classes, "errors": {str(k): v for k, v in self.errors.items()}})
        np.savez(buffer, facts=np.frombuffer(facts.encode(), np.uint8), given=self.given, suggested=self.suggested,
                 quality=self.quality, issue=self.issue)  # fmt: skip
        return buffer.getvalue()

    @classmethod
    def load(cls, data: bytes, rows: int) -> LabelIssues | None:
        """The verdicts of a cache entry, or None when it is not one for ``rows`` rows."""
        try:
            with np.load(io.BytesIO(data)) as stored:
                facts = json.loads(bytes(stored["facts"]).decode())
                arrays = [stored[name] for name in ("given", "suggested", "quality", "issue")]
        except (OSError, ValueError, KeyError):
            return None
        if any(len(a) != rows for a in arrays):
            return None
        given, suggested, quality, issue = arrays
        errors = {int(k): str(v) for k, v in facts["errors"].items()}
        return cls(list(facts["classes"]), given, suggested, quality, issue, errors)


def cached_label_issues(cache: ContentCache, source: Source, path: str, classes: list[str] | None) -> LabelIssues:
    """`label_issues`, stored under the rows' digest, the labelled table's content and the classes."""
    digest = hashlib.sha256(read_bytes(path, field="labels")).hexdigest()
    model = {"family": source.index.family, "version": source.index.version}
    key = content_key("curate-labels", f"{source.digest}/{digest}", model, {"format": "1", "classes": classes})
    stored = cache.get(key)
    found = LabelIssues.load(stored, source.index.rows) if stored is not None else None
    if found is not None:
        return found
    judged = label_issues(source, path, classes)
    cache.put(key, judged.dump())
    return judged


def _read(path: str) -> pa.Table:
    table = read_table(path, field="labels")
    missing = {"image_ref", "label", "label_scores"} - set(table.column_names)
    if missing:
        raise InvalidInputError("labels", f"{path} lacks column(s) {sorted(missing)}")
    return table


def _probabilities(scores: np.ndarray) -> np.ndarray:
    """Scores as probabilities: as they are when they already are, else softmax(100 × scores)."""
    if (scores >= 0).all() and np.allclose(scores.sum(axis=1), 1.0, atol=1e-3):
        return scores / scores.sum(axis=1, keepdims=True)
    logits = LOGIT_SCALE * scores
    odds = np.exp(logits - logits.max(axis=1, keepdims=True))
    return odds / odds.sum(axis=1, keepdims=True)


def _classes(labels: list[str | None], scores: list[list[float] | None], width: int) -> list[str]:
    """Class names by position, from the rows whose label is their best score's class."""
    votes: dict[int, Counter[str]] = {}
    for label, row in zip(labels, scores, strict=True):
        if label in NOT_A_LABEL or label is None or row is None or len(row) != width:
            continue
        votes.setdefault(int(np.argmax(row)), Counter())[label] += 1
    return [votes[i].most_common(1)[0][0] if i in votes else f"class {i}" for i in range(width)]


def label_issues(source: Source, path: str, classes: list[str] | None) -> LabelIssues:
    """cleanlab's verdict on each labelled row of ``path`` that is a row of ``source``.

    Raises:
        InvalidInputError: naming ``labels`` (unreadable, no such columns, no row with scores)
            or ``classes`` (their count differs from the scores').
    """
    import pandas as pd

    table = _read(path)
    scores = table.column("label_scores").to_pylist()
    widths = Counter(len(s) for s in scores if s is not None)
    if not widths:
        raise InvalidInputError("labels", f"{path} has no row with label_scores")
    width = widths.most_common(1)[0][0]
    labels = [None if v is None else str(v) for v in table.column("label").to_pylist()]
    if classes is not None and len(classes) != width:
        raise InvalidInputError("classes", f"{len(classes)} classes; {path}'s label_scores have {width} values")
    names = list(classes) if classes is not None else _classes(labels, scores, width)
    detections = (
        table.column("detection_index").to_pylist() if "detection_index" in table.column_names else [None] * len(labels)
    )
    keyed = pd.Series(
        np.arange(table.num_rows),
        index=[
            f"{r}\x00{-1 if d is None else int(d)}"
            for r, d in zip(table.column("image_ref").to_pylist(), detections, strict=True)
        ],
    )
    keyed = keyed[~keyed.index.duplicated(keep="first")]
    rows = source.index.rows
    out = LabelIssues(
        names,
        np.full(rows, -1, np.int32),
        np.full(rows, -1, np.int32),
        np.full(rows, np.nan, np.float32),
        np.full(rows, -1, np.int8),
    )
    matched_rows, matched_labels = [], []
    for start in range(0, rows, 262_144):
        meta = source.metadata(start, min(rows, start + 262_144))
        dets = meta.column("detection_index").to_pylist()
        keys = [
            f"{r}\x00{-1 if d is None else int(d)}"
            for r, d in zip(meta.column("image_ref").to_pylist(), dets, strict=True)
        ]
        found = keyed.reindex(keys).to_numpy()
        hit = np.flatnonzero(~np.isnan(found))
        matched_rows.append(start + hit)
        matched_labels.append(found[hit].astype(np.int64))
    at = np.concatenate(matched_rows) if matched_rows else np.empty(0, np.int64)
    of = np.concatenate(matched_labels) if matched_labels else np.empty(0, np.int64)
    index_of = {name: i for i, name in enumerate(names)}
    usable, given, probs = [], [], []
    for row, source_row in zip(of.tolist(), at.tolist(), strict=True):
        row_scores, label = scores[row], labels[row]
        if row_scores is None or len(row_scores) != width:
            out.errors[source_row] = (
                f"label_scores has {0 if row_scores is None else len(row_scores)} values, not {width}"
            )
            continue
        out.suggested[source_row] = int(np.argmax(row_scores))
        if label is None or label in NOT_A_LABEL:
            continue
        if label not in index_of:
            out.errors[source_row] = f"label {label!r} is not one of the classes {names}"
            continue
        usable.append(source_row)
        given.append(index_of[label])
        probs.append(row_scores)
    if usable:
        _judge(out, np.asarray(usable), np.asarray(given), _probabilities(np.asarray(probs, dtype=np.float64)))
    return out


def _judge(out: LabelIssues, rows: np.ndarray, given: np.ndarray, probs: np.ndarray) -> None:
    """cleanlab's flags and label quality for the labelled rows."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    out.given[rows] = given
    out.quality[rows] = get_label_quality_scores(given, probs).astype(np.float32)
    try:
        flagged = find_label_issues(given, probs)
    except (ValueError, AssertionError) as error:  # e.g. fewer rows than classes seen: quality only
        for row in rows.tolist():
            out.errors[row] = f"cleanlab could not flag issues: {error}"
        return
    out.issue[rows] = np.asarray(flagged, dtype=np.int8)
