"""Tracking the detections of a video's sampled frames, so a run counts objects, not sightings.

`Tracker` is ByteTrack's association (Zhang et al., 2022) in video time, with the crops'
embeddings as a second cue. For each sampled frame:

1. Each track's box is predicted at the frame's presentation time (constant velocity in pixels per
   second, averaged over `VELOCITY_SECONDS` of video time, so the rate or a variable frame rate
   does not change it).
2. Candidate pairs are gated *first*: a detection may go to a track when their IoU reaches the
   stage's threshold, or when their crops look alike (cosine similarity of embeddings at or above
   the video's appearance threshold, see below) and the detection lies within the distance the
   object can have moved (`REACH_BOXES` box sizes plus `REACH_BOXES_PER_SECOND` per second since
   it was seen). Among candidates the assignment maximises IoU plus an appearance term
   (Hungarian). Pairs outside the gates are never assigned, whatever the sum.
3. Confident detections (``>= HIGH_CONFIDENCE``) go first to the confirmed and lost tracks, then
   the less confident ones (``>= LOW_CONFIDENCE``) to the confirmed tracks still unmatched (IoU
   ``>= LOW_MATCH_IOU``, or alike), then the confident leftovers to the tentative tracks
   (IoU ``>= TENTATIVE_MATCH_IOU``, or alike); confident detections still left
   (``>= NEW_TRACK_CONFIDENCE``) start tentative tracks.
4. A tentative track is confirmed by its second sighting (then, and only then, it gets its id);
   one missed in `TENTATIVE_MISSES` sampled frames in a row ends (a blip is no object). A confirmed
   track unseen for `LOST_SECONDS` of video time ends, whatever the sampling rate.

Why appearance: at the rates a run samples (0.5–2 fps) a moving object's boxes no longer overlap
from one sampled frame to the next, and IoU alone loses it at every step. The crops' embeddings
(which the flows compute anyway) still match. The threshold for "alike" is the video's own: the
`APPEARANCE_QUANTILE` of the similarities between detections seen together in one frame (different
objects by definition), never below `APPEARANCE_FLOOR` (two objects of one kind that are never seen
together look alike too). An embedding model under which everything looks alike (placeholder
weights) thus falls back to IoU.

Measured against the reference ByteTrack of the ``trackers`` package on ground-truth sequences at
0.5–30 fps: `benchmarks/tracking.py`, tables in ``benchmarks/RESULTS.md``.

`VideoTracks` runs one tracker per video over a flow's batches (in order), sets each crop's
``tracker_id`` at the end of its batch (a track confirmed within the batch names its first sighting
too), and counts confirmed objects per label.

```python
tracker = Tracker()
first = tracker.update(np.array([[10, 10, 50, 50]]), np.array([0.9]), time_s=0.0)
second = tracker.update(np.array([[14, 10, 54, 50]]), np.array([0.9]), time_s=1 / 30)
first[0] is second[0], second[0].id    # True, 1: the same object, confirmed
```
"""

from __future__ import annotations

from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field, replace

import numpy as np

from ..records import Batch, ImageRecord

__all__ = [
    "HIGH_CONFIDENCE",
    "LOST_SECONDS",
    "MATCH_IOU",
    "Track",
    "Tracker",
    "VideoTracks",
    "iou_matrix",
    "match",
    "video_of",
]

#: Detections at or above this confidence are matched first.
HIGH_CONFIDENCE = 0.5
#: Below this a detection is ignored by the tracker (its row has no tracker_id).
LOW_CONFIDENCE = 0.1
#: Unmatched detections at or above this confidence start (tentative) tracks.
NEW_TRACK_CONFIDENCE = 0.6
#: IoU (predicted box against detection) that makes a candidate pair, per stage.
MATCH_IOU = 0.2
LOW_MATCH_IOU = 0.3
TENTATIVE_MATCH_IOU = 0.3
#: A confirmed track unseen for more than this many seconds of video time ends; a tentative one
#: (seen once) ends when missed in this many sampled frames in a row (or unseen for `LOST_SECONDS`).
LOST_SECONDS = 4.0
TENTATIVE_MISSES = 2
#: Velocity is an average over about this much video time (a step's weight is its gap / this, at most 1).
VELOCITY_SECONDS = 0.5
#: How far (centre to predicted centre) a detection may be from a track for an appearance match:
#: this many of the track's box sizes (square root of its area),
REACH_BOXES = 1.0
#: plus this many per second since the track was last seen.
REACH_BOXES_PER_SECOND = 3.0
#: A detection's box area may be at most this many times the track's, or its inverse.
AREA_RATIO = 4.0
#: Weight of appearance in the assignment's score (IoU + weight × scaled similarity).
APPEARANCE_WEIGHT = 0.5
#: The appearance threshold: this quantile of the similarities of detections seen together (once
#: `APPEARANCE_SAMPLES` such pairs were seen; the last `APPEARANCE_MEMORY` kept),
APPEARANCE_QUANTILE = 0.99
APPEARANCE_SAMPLES = 20
APPEARANCE_MEMORY = 2000
#: never below this cosine similarity (objects of one kind that never show together look alike too).
APPEARANCE_FLOOR = 0.8
#: Weight of a new crop in a track's running embedding.
EMBEDDING_UPDATE = 0.2


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


def match(score: np.ndarray, allowed: np.ndarray) -> list[tuple[int, int]]:
    """Pairs (row, column) of the assignment that maximises the summed ``score`` over the pairs
    ``allowed`` (gated before assigning: a pair outside the gate is never chosen, even when taking
    it would raise the sum)."""
    if not allowed.any():
        return []
    from scipy.optimize import linear_sum_assignment

    rows = np.flatnonzero(allowed.any(axis=1))
    cols = np.flatnonzero(allowed.any(axis=0))
    sub, ok = score[np.ix_(rows, cols)], allowed[np.ix_(rows, cols)]
    # A forbidden pair costs more than any set of allowed ones gains: the optimum leaves it out.
    penalty = 1.0 + 2.0 * float(np.abs(sub[ok]).sum())
    picked_rows, picked_cols = linear_sum_assignment(np.where(ok, sub, -penalty), maximize=True)
    return [(int(rows[r]), int(cols[c])) for r, c in zip(picked_rows, picked_cols, strict=True) if ok[r, c]]


def _unit(vector: np.ndarray | None) -> np.ndarray | None:
    if vector is None:
        return None
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 and np.isfinite(norm) else None


@dataclass(eq=False)
class Track:
    """One object followed across a video's frames.

    Attributes:
        id: Its tracker id, from 1 in the order tracks are confirmed; None while tentative (and
            for good when it ends unconfirmed: a one-frame blip is no object).
        box: Its last seen box (xyxy), at ``time_s``.
        velocity: Pixels per second of each box coordinate.
        hits: How many frames it was seen in.
    """

    box: np.ndarray
    time_s: float
    embedding: np.ndarray | None = None
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(4))
    hits: int = 1
    id: int | None = None
    misses: int = 0  # sampled frames in a row without a sighting

    @property
    def confirmed(self) -> bool:
        return self.id is not None

    def predicted(self, time_s: float) -> np.ndarray:
        return self.box + self.velocity * max(0.0, time_s - self.time_s)

    def size(self) -> float:
        width, height = self.box[2] - self.box[0], self.box[3] - self.box[1]
        return float(np.sqrt(max(width, 1.0) * max(height, 1.0)))

    def seen(self, box: np.ndarray, time_s: float, embedding: np.ndarray | None) -> None:
        gap = time_s - self.time_s
        if gap > 0:
            step = (box - self.box) / gap
            weight = 1.0 if self.hits == 1 else min(1.0, gap / VELOCITY_SECONDS)
            self.velocity = (1 - weight) * self.velocity + weight * step
        self.box, self.time_s, self.hits, self.misses = box, time_s, self.hits + 1, 0
        if embedding is not None:
            old = embedding if self.embedding is None else self.embedding
            self.embedding = _unit((1 - EMBEDDING_UPDATE) * old + EMBEDDING_UPDATE * embedding)


class Tracker:
    """ByteTrack's association in video time, with appearance (see the module docstring), over one
    video's frames in presentation order.

    Args:
        lost_seconds: Video time a confirmed track survives unseen.
        appearance: Whether embeddings given to `update` are used.
    """

    def __init__(self, lost_seconds: float = LOST_SECONDS, appearance: bool = True) -> None:
        self.lost_seconds, self.appearance = lost_seconds, appearance
        self.tracks: list[Track] = []
        self.confirmed = 0  # ids handed out
        self._alike: deque[float] = deque(maxlen=APPEARANCE_MEMORY)
        self._last_time: float | None = None

    def appearance_threshold(self) -> float:
        """The similarity at or above which two crops count as alike (see the module docstring)."""
        if len(self._alike) < APPEARANCE_SAMPLES:
            return APPEARANCE_FLOOR
        return max(APPEARANCE_FLOOR, float(np.quantile(np.fromiter(self._alike, float), APPEARANCE_QUANTILE)))

    def update(
        self,
        xyxy: np.ndarray,
        confidence: np.ndarray | None = None,
        time_s: float | None = None,
        embeddings: list[np.ndarray | None] | np.ndarray | None = None,
    ) -> list[Track | None]:
        """The track of each detection of the next frame (None: too unsure to track).

        Args:
            xyxy: ``(n, 4)`` boxes.
            confidence: ``(n,)`` scores (all 1 when None).
            time_s: The frame's presentation time; None counts frames at 30 fps.
            embeddings: One embedding (or None) per detection.

        A track's ``id`` is None until it is confirmed; read it once the frames that may confirm it
        are in (`VideoTracks` reads them at the end of each batch).
        """
        boxes = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
        scores = np.ones(len(boxes)) if confidence is None else np.asarray(confidence, dtype=np.float64)
        if time_s is None:
            time_s = 0.0 if self._last_time is None else self._last_time + 1 / 30
        self._last_time = time_s
        self.tracks = [t for t in self.tracks if time_s - t.time_s <= self.lost_seconds]  # expired before matching
        vectors = self._vectors(embeddings, len(boxes))
        self._learn_alike(vectors)
        threshold = self.appearance_threshold()
        out: list[Track | None] = [None] * len(boxes)
        high = [i for i in range(len(boxes)) if scores[i] >= HIGH_CONFIDENCE]
        low = [i for i in range(len(boxes)) if LOW_CONFIDENCE <= scores[i] < HIGH_CONFIDENCE]
        known = [t for t in self.tracks if t.confirmed]
        tentative = [t for t in self.tracks if not t.confirmed]
        # 1: confident detections to confirmed tracks (seen now or lost)
        left_tracks, left_high = self._assign(known, high, boxes, vectors, time_s, MATCH_IOU, threshold, out)
        # 2: less confident detections to the confirmed tracks still free
        self._assign(left_tracks, low, boxes, vectors, time_s, LOW_MATCH_IOU, threshold, out)
        # 3: confident leftovers to tentative tracks, which a second sighting confirms
        unmatched_tentative, left_high = self._assign(
            tentative, left_high, boxes, vectors, time_s, TENTATIVE_MATCH_IOU, threshold, out
        )
        unmatched = {id(t) for t in unmatched_tentative}
        for track in tentative:
            if id(track) not in unmatched and track.id is None:
                self.confirmed += 1
                track.id = self.confirmed
        # 4: confident detections still free start tentative tracks
        born = []
        for i in left_high:
            if scores[i] >= NEW_TRACK_CONFIDENCE:
                track = Track(boxes[i].copy(), time_s, vectors[i])
                born.append(track)
                out[i] = track
        for track in self.tracks:
            if track.time_s < time_s:
                track.misses += 1
        self.tracks = [
            t
            for t in self.tracks
            if time_s - t.time_s <= self.lost_seconds and (t.confirmed or t.misses < TENTATIVE_MISSES)
        ] + born
        return out

    def _vectors(self, embeddings: list[np.ndarray | None] | np.ndarray | None, n: int) -> list[np.ndarray | None]:
        if embeddings is None or not self.appearance:
            return [None] * n
        vectors = [_unit(None if e is None else np.asarray(e, dtype=np.float64).ravel()) for e in embeddings]
        if len(vectors) != n:
            raise ValueError(f"{len(vectors)} embeddings for {n} detections")
        return vectors

    def _learn_alike(self, vectors: list[np.ndarray | None]) -> None:
        """Similarities of crops seen together (different objects): what "alike" must exceed."""
        present = [v for v in vectors if v is not None]
        if len(present) < 2:
            return
        stacked = np.vstack(present)
        similarity = stacked @ stacked.T
        upper = similarity[np.triu_indices(len(present), k=1)]
        self._alike.extend(float(s) for s in upper)

    def _assign(
        self,
        tracks: list[Track],
        detections: list[int],
        boxes: np.ndarray,
        vectors: list[np.ndarray | None],
        time_s: float,
        min_iou: float,
        threshold: float,
        out: list[Track | None],
    ) -> tuple[list[Track], list[int]]:
        """Assign ``detections`` (indices into ``boxes``) to ``tracks``; the tracks and detections left."""
        if not tracks or not detections:
            return tracks, detections
        predicted = np.array([t.predicted(time_s) for t in tracks])
        chosen = boxes[detections]
        iou = iou_matrix(predicted, chosen)
        allowed = iou >= min_iou
        score = iou.copy()
        track_vectors = [t.embedding for t in tracks]
        det_vectors = [vectors[i] for i in detections]
        if any(v is not None for v in track_vectors) and any(v is not None for v in det_vectors):
            with_t = [(r, v) for r, v in enumerate(track_vectors) if v is not None]
            with_d = [(c, v) for c, v in enumerate(det_vectors) if v is not None]
            similarity = np.full(iou.shape, np.nan)
            if with_t and with_d:
                products = np.vstack([v for _, v in with_t]) @ np.vstack([v for _, v in with_d]).T
                similarity[np.ix_([r for r, _ in with_t], [c for c, _ in with_d])] = products
            known = ~np.isnan(similarity)
            scaled = np.where(known, np.clip((similarity - threshold) / max(1e-6, 1 - threshold), -1, 1), 0.0)
            alike = known & (similarity >= threshold) & self._reachable(tracks, predicted, chosen, time_s)
            allowed |= alike
            score += APPEARANCE_WEIGHT * scaled
        pairs = match(score, allowed)
        for r, c in pairs:
            i = detections[c]
            tracks[r].seen(boxes[i].copy(), time_s, vectors[i])
            out[i] = tracks[r]
        used_rows, used_cols = {r for r, _ in pairs}, {c for _, c in pairs}
        return [t for r, t in enumerate(tracks) if r not in used_rows], [
            d for c, d in enumerate(detections) if c not in used_cols
        ]

    @staticmethod
    def _reachable(tracks: list[Track], predicted: np.ndarray, chosen: np.ndarray, time_s: float) -> np.ndarray:
        """Whether each detection lies where each track's object can have gone (distance and size)."""
        sizes = np.array([t.size() for t in tracks])
        gaps = np.array([max(0.0, time_s - t.time_s) for t in tracks])
        reach = sizes * (REACH_BOXES + REACH_BOXES_PER_SECOND * gaps)
        centre_t = (predicted[:, :2] + predicted[:, 2:]) / 2
        centre_d = (chosen[:, :2] + chosen[:, 2:]) / 2
        distance = np.linalg.norm(centre_t[:, None, :] - centre_d[None, :, :], axis=2)
        area_t = np.maximum(sizes**2, 1.0)
        area_d = np.maximum((chosen[:, 2] - chosen[:, 0]) * (chosen[:, 3] - chosen[:, 1]), 1.0)
        ratio = area_d[None, :] / area_t[:, None]
        return (distance <= reach[:, None]) & (ratio <= AREA_RATIO) & (ratio >= 1 / AREA_RATIO)


def video_of(record: ImageRecord) -> str | None:
    """The video a frame record comes from (its ref without ``#frame=``); None for a photo."""
    return record.ref.rsplit("#frame=", 1)[0] if record.frame_index is not None else None


class VideoTracks:
    """One `Tracker` per video over a flow's crop batches, in order; counts confirmed objects per label.

    Attributes:
        labels: For each ``(video, tracker_id)``, how often each label was given to its crops.
    """

    def __init__(self) -> None:
        self._trackers: dict[str, Tracker] = {}
        self.labels: defaultdict[tuple[str, int], Counter[str]] = defaultdict(Counter)

    def track(self, batch: Batch) -> Batch:
        """The crop batch with each video frame's crops given their ``tracker_id`` (and the
        parents' ``detections.tracker_id`` set, for annotators, -1 where there is none); photos
        pass unchanged. Ids are read once the whole batch is tracked, so a track confirmed by a
        later frame of the batch names its first sighting too."""
        pending: list[tuple[ImageRecord, list[ImageRecord], list[Track | None] | None]] = []
        for parent, crops in batch.by_parent():
            video = video_of(parent)
            if video is None or not parent.ok or parent.frame_time_s is None:
                pending.append((parent, crops, None))
                continue
            found = parent.detections
            tracker = self._trackers.setdefault(video, Tracker())
            if found is None or not len(found):
                tracker.update(np.zeros((0, 4)), time_s=parent.frame_time_s)
                pending.append((parent, crops, None))
                continue
            embeddings: list[np.ndarray | None] = [None] * len(found)
            for crop in crops:
                if crop.crop is not None and crop.ok and crop.embedding is not None:
                    embeddings[crop.crop.detection_index] = crop.embedding
            tracked = tracker.update(found.xyxy, found.confidence, parent.frame_time_s, embeddings)
            pending.append((parent, crops, tracked))
        records: list[ImageRecord] = []
        for parent, crops, held in pending:
            if held is None or parent.detections is None:
                records.extend(crops)
                continue
            ids = [None if t is None else t.id for t in held]
            parent.detections.tracker_id = np.array([-1 if i is None else i for i in ids], dtype=int)
            video = video_of(parent)
            assert video is not None
            for crop in crops:
                assert crop.crop is not None
                tracker_id = ids[crop.crop.detection_index]
                crop = replace(crop, crop=replace(crop.crop, tracker_id=tracker_id))
                if tracker_id is not None and crop.ok and crop.label is not None:
                    self.labels[(video, tracker_id)][crop.label.name] += 1
                records.append(crop)
        return Batch(records, batch.label, batch.reports, batch.parents)

    def object_counts(self) -> dict[str, int]:
        """Distinct confirmed objects per label (each under the label its crops got most often)."""
        counts = Counter(labels.most_common(1)[0][0] for labels in self.labels.values() if labels)
        return dict(counts.most_common())
