"""Tracking the detections of a video's sampled frames, so a run counts objects, not sightings.

`ByteTracker` is ByteTrack's association (Zhang et al., 2022) in NumPy and SciPy: each track's box is
predicted one sampled frame ahead (constant velocity), the confident detections are matched to the
predicted boxes first (Hungarian assignment on IoU), the less confident ones then to the tracks
still unmatched, confident leftovers start new tracks, and a track unseen for `LOST_FRAMES` sampled
frames ends. supervision's own ``sv.ByteTrack`` moved out of supervision (0.26+) into the
``trackers`` package, which requires the GUI build of OpenCV (it clashes with the headless one
this library uses), hence this small re-implementation of the same algorithm.

Association needs the boxes of consecutive *sampled* frames to overlap: for fast motion, sample
more often (``video_fps``). `VideoTracks` runs one tracker per video over a flow's batches (in
order) and sets each crop's ``tracker_id``.

```python
tracker = ByteTracker()
tracker.update(np.array([[10, 10, 50, 50]]), np.array([0.9]))   # [1]
tracker.update(np.array([[14, 10, 54, 50]]), np.array([0.9]))   # [1]: the same object
```
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, replace

import numpy as np

from ..records import Batch, ImageRecord

__all__ = ["HIGH_CONFIDENCE", "LOST_FRAMES", "MATCH_IOU", "ByteTracker", "VideoTracks", "video_of"]

#: Detections at or above this confidence are matched first and may start tracks.
HIGH_CONFIDENCE = 0.5
#: Below this a detection is ignored by the tracker (its row has no tracker_id).
LOW_CONFIDENCE = 0.1
#: A detection matches a track when their IoU (after prediction) is at least this.
MATCH_IOU = 0.2
#: A second-stage (low-confidence) match needs this IoU.
LOW_MATCH_IOU = 0.5
#: A track not matched for this many sampled frames ends; a later detection gets a new id.
LOST_FRAMES = 30


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` (n, 4) with every box of ``b`` (m, 4), xyxy."""
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)


def _match(iou: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """Pairs (row, column) of a maximum-IoU assignment whose IoU reaches ``threshold``."""
    if not iou.size:
        return []
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(-iou)
    return [(int(r), int(c)) for r, c in zip(rows, cols, strict=True) if iou[r, c] >= threshold]


@dataclass
class _Track:
    id: int
    box: np.ndarray
    velocity: np.ndarray
    lost: int = 0

    def predicted(self) -> np.ndarray:
        return self.box + self.velocity * (self.lost + 1)

    def seen(self, box: np.ndarray) -> None:
        step = (box - self.box) / (self.lost + 1)
        self.velocity = 0.5 * self.velocity + 0.5 * step
        self.box, self.lost = box, 0


class ByteTracker:
    """ByteTrack's two-stage association over one video's frames, in order (see the module docstring)."""

    def __init__(self, lost_frames: int = LOST_FRAMES) -> None:
        self.lost_frames = lost_frames
        self._tracks: list[_Track] = []
        self._next_id = 1

    def update(self, xyxy: np.ndarray, confidence: np.ndarray | None = None) -> list[int | None]:
        """The tracker id of each detection of the next frame (None: too unsure to track)."""
        boxes = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
        scores = np.ones(len(boxes)) if confidence is None else np.asarray(confidence, dtype=np.float64)
        ids: list[int | None] = [None] * len(boxes)
        high = [i for i in range(len(boxes)) if scores[i] >= HIGH_CONFIDENCE]
        low = [i for i in range(len(boxes)) if LOW_CONFIDENCE <= scores[i] < HIGH_CONFIDENCE]
        predicted = np.array([t.predicted() for t in self._tracks]).reshape(-1, 4)
        free = list(range(len(self._tracks)))
        born: list[_Track] = []
        for group, threshold in ((high, MATCH_IOU), (low, LOW_MATCH_IOU)):
            pairs = _match(iou_matrix(predicted[free], boxes[group]), threshold)
            for row, col in pairs:
                track = self._tracks[free[row]]
                track.seen(boxes[group[col]])
                ids[group[col]] = track.id
            matched = {free[row] for row, _ in pairs}
            free = [t for t in free if t not in matched]
            if group is high:  # confident detections no track took start tracks
                for col in sorted(set(range(len(high))) - {c for _, c in pairs}):
                    born.append(_Track(self._next_id, boxes[high[col]], np.zeros(4)))
                    ids[high[col]] = self._next_id
                    self._next_id += 1
        for index in free:
            self._tracks[index].lost += 1
        self._tracks = [t for t in self._tracks if t.lost <= self.lost_frames] + born
        return ids


def video_of(record: ImageRecord) -> str | None:
    """The video a frame record comes from (its ref without ``#frame=``); None for a photo."""
    return record.ref.rsplit("#frame=", 1)[0] if record.frame_index is not None else None


class VideoTracks:
    """One `ByteTracker` per video over a flow's crop batches, in order; counts objects per label.

    Attributes:
        labels: For each ``(video, tracker_id)``, how often each label was given to its crops.
    """

    def __init__(self) -> None:
        self._trackers: dict[str, ByteTracker] = {}
        self.labels: defaultdict[tuple[str, int], Counter[str]] = defaultdict(Counter)

    def track(self, batch: Batch) -> Batch:
        """The crop batch with each video frame's crops given their ``tracker_id`` (and the
        parents' ``detections.tracker_id`` set, for annotators); photos pass unchanged."""
        records: list[ImageRecord] = []
        for parent, crops in batch.by_parent():
            video = video_of(parent)
            if video is None or not crops or parent.detections is None:
                records.extend(crops)
                continue
            found = parent.detections
            ids = self._trackers.setdefault(video, ByteTracker()).update(found.xyxy, found.confidence)
            found.tracker_id = np.array([-1 if i is None else i for i in ids], dtype=int)
            for crop in crops:
                assert crop.crop is not None
                tracker_id = ids[crop.crop.detection_index]
                crop = replace(crop, crop=replace(crop.crop, tracker_id=tracker_id))
                if tracker_id is not None and crop.ok and crop.label is not None:
                    self.labels[(video, tracker_id)][crop.label.name] += 1
                records.append(crop)
        return Batch(records, batch.label, batch.reports, batch.parents)

    def object_counts(self) -> dict[str, int]:
        """Distinct tracked objects per label (each object under the label its crops got most often)."""
        counts = Counter(labels.most_common(1)[0][0] for labels in self.labels.values() if labels)
        return dict(counts.most_common())
