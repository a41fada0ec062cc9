"""Ground-truth sequences for tracking: objects that enter, leave, cross and hide, and the
detections a detector would give of them (jitter, misses, low scores, false positives) with the
embeddings their crops would get. Deterministic for a seed.

A sequence is 30 fps video time; `Sequence.sampled` takes the frames a run at ``fps`` would (the
first frame at or after each multiple of ``1 / fps`` s, as `_video.sample.FpsGate`). The truth of a
frame is what is visible in it (at least half inside the picture and not behind an occluder), so
the scores reward keeping an object's id across a hidden stretch.

Appearance: each object's embedding is its class's direction plus its own (cosine ~0.6 between two
objects of one class, ~0.9 between two crops of one object), and each crop adds noise; a false
positive's is random. That is the structure real crop embeddings of a good model have; a model that
makes everything alike is the tracker's fallback case (IoU), tested on its own.

```python
sequences = make_sequences(seed=0)
frames = sequences[0].sampled(1.0)    # [(index, time_s, truth, detections), ...]
```
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["FPS", "SCENARIOS", "Detections", "Sequence", "make_sequence", "make_sequences"]

FPS = 30
WIDTH, HEIGHT = 1280, 720
DIM = 64
#: What each scenario plants, by name.
SCENARIOS = ("crossing", "occlusion", "crowd", "stop_and_go")


@dataclass
class Detections:
    """One frame's detections: ``xyxy`` (n, 4), ``confidence`` (n,), ``embeddings`` (n, DIM), and
    ``truth`` (n,): the object each one shows, -1 for a false positive."""

    xyxy: np.ndarray
    confidence: np.ndarray
    embeddings: np.ndarray
    truth: np.ndarray


@dataclass
class Sequence:
    """A ground-truth sequence: per 30 fps frame, the visible objects' boxes and the detections."""

    name: str
    truth: list[dict[int, np.ndarray]] = field(default_factory=list)
    detections: list[Detections] = field(default_factory=list)

    def sampled(self, fps: float) -> list[tuple[int, float, dict[int, np.ndarray], Detections]]:
        """``(frame index, time_s, truth, detections)`` of the frames a run sampling at ``fps`` takes."""
        kept, next_time = [], 0.0
        for index in range(len(self.truth)):
            time_s = index / FPS
            if time_s + 1e-6 >= next_time:
                kept.append((index, time_s, self.truth[index], self.detections[index]))
                next_time = (math.floor(time_s * fps + 1e-6) + 1) / fps
        return kept

    def objects(self, fps: float) -> int:
        """How many distinct objects are visible in the frames sampled at ``fps``."""
        return len({i for _, _, truth, _ in self.sampled(fps) for i in truth})


@dataclass
class _Object:
    id: int
    start: int
    position: np.ndarray  # top-left x, y
    size: np.ndarray  # w, h
    velocity: np.ndarray  # px / s
    appearance: np.ndarray
    stops: list[tuple[int, int]] = field(default_factory=list)  # frame spans standing still


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _entering(rng: np.random.Generator, identity: int, start: int, look: np.ndarray) -> _Object:
    """An object entering from the left or right edge at a random height, crossing the picture."""
    width = rng.uniform(50, 110)
    size = np.array([width, width * rng.uniform(0.8, 2.0)])
    speed = rng.uniform(40, 160)
    leftwards = rng.random() < 0.5
    y = rng.uniform(20, HEIGHT - size[1] - 20)
    x = WIDTH if leftwards else -size[0]
    angle = rng.uniform(-0.25, 0.25)
    velocity = speed * np.array([-math.cos(angle) if leftwards else math.cos(angle), math.sin(angle)])
    return _Object(identity, start, np.array([x, y]), size, velocity, look)


def make_sequence(scenario: str, seed: int, seconds: float = 40.0) -> Sequence:
    """One planted sequence of ``scenario`` (see `SCENARIOS`)."""
    rng = np.random.default_rng([SCENARIOS.index(scenario), seed])
    classes = _unit(rng.standard_normal((3, DIM)))

    def look(cls: int) -> np.ndarray:
        return _unit(0.8 * classes[cls] + 0.6 * _unit(rng.standard_normal(DIM)))

    frames = round(seconds * FPS)
    objects: list[_Object] = []
    occluders: list[tuple[float, float]] = []  # x spans of vertical bands that hide what passes behind
    if scenario == "crossing":
        for k in range(6):  # pairs of one class moving at each other on one line
            start, cls = int(k * 6 * FPS + rng.integers(0, FPS)), int(rng.integers(0, 3))
            y, width, speed = rng.uniform(60, HEIGHT - 200), rng.uniform(60, 100), rng.uniform(60, 140)
            size = np.array([width, width * 1.5])
            for side in (0, 1):
                x = -width if side == 0 else WIDTH
                v = np.array([speed if side == 0 else -speed, rng.normal(0, 5)])
                objects.append(_Object(len(objects) + 1, start, np.array([x, y]), size, v, look(cls)))
    elif scenario == "occlusion":
        occluders = [(380.0, 520.0), (800.0, 900.0)]
        for k in range(10):
            objects.append(_entering(rng, k + 1, int(k * 3.5 * FPS + rng.integers(0, FPS)), look(k % 3)))
    elif scenario == "crowd":
        for k in range(16):
            start = int(rng.uniform(0, seconds - 10) * FPS)
            objects.append(_entering(rng, k + 1, start, look(int(rng.integers(0, 3)))))
        for k in range(3):  # standing still the whole time
            position = np.array([rng.uniform(100, WIDTH - 200), rng.uniform(100, HEIGHT - 200)])
            size = np.array([rng.uniform(50, 90), rng.uniform(60, 120)])
            objects.append(_Object(17 + k, 0, position, size, np.zeros(2), look(int(rng.integers(0, 3)))))
    elif scenario == "stop_and_go":
        for k in range(8):
            item = _entering(rng, k + 1, int(k * 4 * FPS + rng.integers(0, FPS)), look(k % 3))
            pause = int(item.start + rng.uniform(2, 5) * FPS)
            item.stops = [(pause, pause + int(rng.uniform(2, 6) * FPS))]
            objects.append(item)
    else:
        raise ValueError(f"unknown scenario {scenario!r}")

    sequence = Sequence(f"{scenario}-{seed}")
    jitter_rng = np.random.default_rng([SCENARIOS.index(scenario), seed, 1])
    for index in range(frames):
        truth: dict[int, np.ndarray] = {}
        for item in objects:
            if index < item.start:
                continue
            moving = not any(a <= index < b for a, b in item.stops)
            if index > item.start and moving:
                item.velocity = item.velocity + jitter_rng.normal(0, 2.0, 2)  # a little wander
                item.position = item.position + item.velocity / FPS
            box = np.array([*item.position, *(item.position + item.size)])
            if _visible(box, occluders):
                truth[item.id] = box
        sequence.truth.append(truth)
        sequence.detections.append(_detect(jitter_rng, truth, {o.id: o.appearance for o in objects}))
    return sequence


def _visible(box: np.ndarray, occluders: list[tuple[float, float]]) -> bool:
    """At least half of the box inside the picture, and its centre not behind an occluder."""
    inside = np.clip(box, [0, 0, 0, 0], [WIDTH, HEIGHT, WIDTH, HEIGHT])
    area = (box[2] - box[0]) * (box[3] - box[1])
    shown = max(0.0, inside[2] - inside[0]) * max(0.0, inside[3] - inside[1])
    centre = (box[0] + box[2]) / 2
    return shown >= 0.5 * area and not any(a <= centre <= b for a, b in occluders)


def _detect(rng: np.random.Generator, truth: dict[int, np.ndarray], looks: dict[int, np.ndarray]) -> Detections:
    boxes, scores, vectors, ids = [], [], [], []
    for identity, box in truth.items():
        if rng.random() < 0.1:  # missed
            continue
        size = math.sqrt((box[2] - box[0]) * (box[3] - box[1]))
        boxes.append(box + rng.normal(0, 0.04 * size, 4))
        scores.append(rng.uniform(0.6, 1.0) if rng.random() < 0.8 else rng.uniform(0.2, 0.6))
        vectors.append(_unit(looks[identity] + rng.normal(0, 0.35 / math.sqrt(DIM), DIM)))
        ids.append(identity)
    for _ in range(rng.poisson(0.3)):  # false positives: anywhere, any size, lower scores
        x, y = rng.uniform(0, WIDTH - 120), rng.uniform(0, HEIGHT - 120)
        w, h = rng.uniform(40, 120), rng.uniform(40, 120)
        boxes.append(np.array([x, y, x + w, y + h]))
        scores.append(rng.uniform(0.1, 0.75))
        vectors.append(_unit(rng.standard_normal(DIM)))
        ids.append(-1)
    if not boxes:
        return Detections(np.zeros((0, 4)), np.zeros(0), np.zeros((0, DIM)), np.zeros(0, int))
    order = rng.permutation(len(boxes))  # detectors give no order
    return Detections(
        np.array(boxes)[order], np.array(scores)[order], np.array(vectors)[order], np.array(ids, dtype=int)[order]
    )


def make_sequences(seed: int = 0, per_scenario: int = 2, seconds: float = 40.0) -> list[Sequence]:
    """``per_scenario`` sequences of every scenario."""
    return [make_sequence(s, seed * 100 + k, seconds) for s in SCENARIOS for k in range(per_scenario)]
