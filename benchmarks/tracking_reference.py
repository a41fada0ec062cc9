"""The reference side of the tracking benchmark, run by the `trackers` side virtualenv's python
(``benchmarks/trackers_venv``), never imported by the project: the ``trackers`` package's
`ByteTrackTracker` on the same detections, and its TrackEval-parity metrics (HOTA, CLEAR, Identity)
for every tracker output it is given.

Reads one JSON object on stdin::

    {"runs": [{"name": "crossing-0@1fps", "fps": 1.0,
               "frames": [{"time_s": 0.0, "xyxy": [[...]], "confidence": [...],
                           "truth": {"7": [x1, y1, x2, y2], ...},
                           "outputs": {"ours": [[id or null, ...]]}}, ...]}],
     "lost_track_buffer": 30}

For each run it tracks the frames with ``ByteTrackTracker(frame_rate=fps, lost_track_buffer=...)``
(its other settings at their defaults; ``timestamp=`` each frame's time) and writes, as JSON on
stdout: ``{"runs": [{"name", "reference": [[id or null per detection] per frame], "metrics":
{"reference": {...}, "ours": {...}}}]}``, the metrics of each output being HOTA, DetA, AssA, MOTA,
IDF1, IDSW and the number of distinct ids.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def _track(run: dict[str, Any], lost_track_buffer: int) -> list[list[int | None]]:
    import supervision as sv
    from trackers import ByteTrackTracker

    tracker = ByteTrackTracker(frame_rate=float(run["fps"]), lost_track_buffer=lost_track_buffer)
    out = []
    for frame in run["frames"]:
        boxes = np.asarray(frame["xyxy"], dtype=np.float32).reshape(-1, 4)
        detections = sv.Detections(xyxy=boxes, confidence=np.asarray(frame["confidence"], dtype=np.float32))
        detections.data["index"] = np.arange(len(boxes))
        tracked = tracker.update(detections, timestamp=float(frame["time_s"]))
        ids: list[int | None] = [None] * len(boxes)
        for index, tracker_id in zip(tracked.data.get("index", []), tracked.tracker_id, strict=True):
            ids[int(index)] = None if int(tracker_id) < 0 else int(tracker_id)
        out.append(ids)
    return out


def _mot_lines(boxes_and_ids: list[list[tuple[int, list[float]]]]) -> str:
    lines = []
    for number, frame in enumerate(boxes_and_ids, start=1):
        for identity, (x1, y1, x2, y2) in frame:
            lines.append(f"{number},{identity},{x1:.3f},{y1:.3f},{x2 - x1:.3f},{y2 - y1:.3f},1,1,1")
    return "\n".join(lines) + "\n"


def _score(run: dict[str, Any], ids: list[list[int | None]], folder: Path) -> dict[str, Any]:
    from trackers.eval import evaluate_mot_sequence

    truth = [[(int(k), v) for k, v in frame["truth"].items()] for frame in run["frames"]]
    hyp = [
        [(i, box) for i, box in zip(frame_ids, frame["xyxy"], strict=True) if i is not None]
        for frame_ids, frame in zip(ids, run["frames"], strict=True)
    ]
    # The frames scored run to the last one either file names; an empty output is scored by hand.
    gt_path, hyp_path = folder / "gt.txt", folder / "hyp.txt"
    gt_path.write_text(_mot_lines(truth))
    distinct = len({i for frame in ids for i in frame if i is not None})
    if not any(hyp):
        return {"HOTA": 0.0, "DetA": 0.0, "AssA": 0.0, "MOTA": 0.0, "IDF1": 0.0, "IDSW": 0, "ids": 0}
    hyp_path.write_text(_mot_lines(hyp))
    result = evaluate_mot_sequence(gt_path, hyp_path, metrics=["CLEAR", "HOTA", "Identity"])
    assert result.CLEAR is not None and result.HOTA is not None and result.Identity is not None
    return {
        "HOTA": float(result.HOTA.HOTA),
        "DetA": float(result.HOTA.DetA),
        "AssA": float(result.HOTA.AssA),
        "MOTA": float(result.CLEAR.MOTA),
        "IDF1": float(result.Identity.IDF1),
        "IDSW": int(result.CLEAR.IDSW),
        "ids": distinct,
    }


def main() -> None:
    job = json.load(sys.stdin)
    buffer = int(job.get("lost_track_buffer", 30))
    answers = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in job["runs"]:
            reference = _track(run, buffer)
            metrics = {"reference": _score(run, reference, Path(tmp))}
            for name in run["frames"][0].get("outputs", {}) if run["frames"] else []:
                output = [frame["outputs"][name] for frame in run["frames"]]
                metrics[name] = _score(run, output, Path(tmp))
            answers.append({"name": run["name"], "reference": reference, "metrics": metrics})
    json.dump({"runs": answers}, sys.stdout)


if __name__ == "__main__":
    main()
