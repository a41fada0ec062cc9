"""Tracking measured against ground truth and against the reference ByteTrack.

The ground truth is planted (`benchmarks/tracking_truth.py`: crossing pairs, occluders, a crowd,
stop-and-go; detections with jitter, misses, low scores and false positives; crop embeddings), a
seed other than the benchmark's. The reference is the ``trackers`` package's `ByteTrackTracker`
(2.6.1), run in its side virtualenv (``benchmarks/trackers_venv``, made by the session fixture the
first time: ~40 s); the scores are py-motmetrics' (IDF1, MOTA, ID switches). Everything is seeded
and deterministic: the same inputs give the same ids and the same scores on every run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from prefect_roboflow.flows._video.track import LOST_SECONDS, Tracker, match

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.tracking import RATES, evaluate, reference_python  # noqa: E402
from benchmarks.tracking_truth import make_sequences  # noqa: E402


@pytest.fixture(scope="module")
def scored() -> dict[float, dict]:
    """Every rate's scores over one planted sequence of each scenario (seed 1)."""
    rows = evaluate(make_sequences(seed=1, per_scenario=1), reference_python())
    return {row["fps"]: row for row in rows}


@pytest.mark.parametrize("fps", RATES)
def test_idf1_is_at_least_the_reference_bytetracks_at_every_rate(scored: dict[float, dict], fps: float) -> None:
    row = scored[fps]
    reference = max(row["reference"]["IDF1"], row["reference_lost"]["IDF1"])
    assert row["ours"]["IDF1"] >= reference
    if fps <= 1:  # boxes no longer overlap between sampled frames: the crops' embeddings carry the tracks
        assert row["ours"]["IDF1"] >= reference + 0.1
        assert row["ours"]["IDF1"] >= row["ours_iou"]["IDF1"] + 0.1


@pytest.mark.parametrize("fps", RATES)
def test_object_counts_are_within_ten_percent_of_the_true_objects(scored: dict[float, dict], fps: float) -> None:
    row = scored[fps]
    assert abs(row["ours"]["counted"] - row["objects"]) <= 0.1 * row["objects"]


def test_pairs_are_gated_before_the_assignment() -> None:
    # ByteTrack keeps the pairs over the threshold, then maximises: two pairs here. Maximising
    # first (0.19 + 0.45 = 0.64 > 0.30 + 0.30) and dropping the pair under 0.2 keeps only one.
    iou = np.array([[0.30, 0.19], [0.45, 0.30]])
    assert sorted(match(iou, iou >= 0.2)) == [(0, 0), (1, 1)]
    assert match(iou, iou >= 0.5) == []


def test_a_one_frame_blip_is_never_an_object() -> None:
    tracker = Tracker()
    still = np.array([[100.0, 100, 160, 180]])
    first = tracker.update(still, np.array([0.9]), time_s=0.0)
    blip = tracker.update(np.vstack([still, [[600, 300, 650, 350]]]), np.array([0.9, 0.9]), time_s=1 / 30)
    assert first[0] is blip[0] and blip[0] is not None and blip[0].id == 1  # confirmed by its second sighting
    assert blip[1] is not None and blip[1].id is None  # tentative
    for k in range(2, 6):
        tracker.update(still, np.array([0.9]), time_s=k / 30)
    assert blip[1].id is None and tracker.confirmed == 1  # missed twice: ended, never counted


@pytest.mark.parametrize("fps", [1.0, 30.0])
def test_a_lost_track_lasts_the_same_video_time_at_any_rate(fps: float) -> None:
    box = np.array([[100.0, 100, 160, 180]])

    def seen_after(gap_s: float) -> int | None:
        tracker = Tracker()
        for k in range(3):
            tracker.update(box, np.array([0.9]), time_s=k / fps)
        hidden = 2 / fps
        time_s = hidden + 1 / fps
        while time_s < hidden + gap_s:  # frames without the object
            tracker.update(np.zeros((0, 4)), time_s=time_s)
            time_s += 1 / fps
        (track,) = tracker.update(box, np.array([0.9]), time_s=hidden + gap_s)
        assert track is not None
        return track.id

    assert seen_after(LOST_SECONDS - 0.5) == 1  # the same object
    assert seen_after(LOST_SECONDS + 1.0) is None  # a new (tentative) track
