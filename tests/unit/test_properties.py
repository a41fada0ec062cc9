"""Property-based tests: batch splitting and box conversions hold for any input."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from prefect_roboflow.blocks import Box
from prefect_roboflow.blocks._embedding import SERVER_MAX_ITEMS, chunked
from prefect_roboflow.blocks.owlv2 import to_detections
from prefect_roboflow.flows._steps.sources import iter_batches

finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False)
positive = st.floats(min_value=0.5, max_value=1e4, allow_nan=False, allow_infinity=False)


@given(st.lists(st.integers(), max_size=200), st.integers(min_value=1, max_value=SERVER_MAX_ITEMS))
def test_chunks_cover_the_input_in_order_within_the_limit(items: list[int], size: int) -> None:
    chunks = chunked(items, size)
    assert [x for chunk in chunks for x in chunk] == items
    assert all(1 <= len(chunk) <= size for chunk in chunks)
    assert len(chunks) == math.ceil(len(items) / size)
    assert all(len(chunk) == size for chunk in chunks[:-1])  # only the last chunk may be short


@given(
    st.lists(st.text(min_size=1, max_size=5).map(lambda s: f"https://example.com/{s}"), min_size=1, max_size=60),
    st.integers(1, 16),
)
def test_flow_batches_keep_every_reference_once_in_order(refs: list[str], size: int) -> None:
    batches = list(iter_batches(refs, size))
    assert [r for batch in batches for r in batch] == refs
    assert all(1 <= len(b) <= size for b in batches)


@given(finite, finite, finite, finite)
def test_box_from_corners_round_trips_to_corners(x1: float, y1: float, dx: float, dy: float) -> None:
    x2, y2 = x1 + abs(dx) + 1, y1 + abs(dy) + 1
    box = Box.from_xyxy((x1, y1, x2, y2), "a")
    assert math.isclose(box.x - box.w / 2, x1, abs_tol=1e-6) and math.isclose(box.x + box.w / 2, x2, abs_tol=1e-6)
    assert math.isclose(box.y - box.h / 2, y1, abs_tol=1e-6) and math.isclose(box.y + box.h / 2, y2, abs_tol=1e-6)


@given(finite, finite, positive, positive)
def test_request_boxes_are_whole_pixels_within_half_a_pixel(x: float, y: float, w: float, h: float) -> None:
    sent = Box(x=x, y=y, w=w, h=h, cls="a").to_request()
    assert all(isinstance(sent[k], int) for k in ("x", "y", "w", "h"))
    assert abs(sent["x"] - x) <= 0.5 and abs(sent["y"] - y) <= 0.5
    assert sent["w"] >= 1 and sent["h"] >= 1 and abs(sent["w"] - w) <= 1 and abs(sent["h"] - h) <= 1


@settings(max_examples=50)
@given(st.lists(st.tuples(finite, finite, positive, positive, st.sampled_from(["a", "b"])), max_size=20))
def test_server_predictions_become_consistent_detections(
    predictions: list[tuple[float, float, float, float, str]],
) -> None:
    answer = {
        "predictions": [
            {"x": x, "y": y, "width": w, "height": h, "confidence": 0.9, "class": c, "detection_id": str(i)}
            for i, (x, y, w, h, c) in enumerate(predictions)
        ]
    }
    detections = to_detections(answer, ["a", "b"])
    assert len(detections) == len(predictions)
    if predictions:
        centres = np.array([[p[0], p[1]] for p in predictions], dtype=np.float32)
        sizes = np.array([[p[2], p[3]] for p in predictions], dtype=np.float32)
        np.testing.assert_allclose((detections.xyxy[:, :2] + detections.xyxy[:, 2:]) / 2, centres, rtol=1e-5, atol=1e-2)
        np.testing.assert_allclose(detections.xyxy[:, 2:] - detections.xyxy[:, :2], sizes, rtol=1e-5, atol=1e-2)
        assert detections.class_id.tolist() == [0 if p[4] == "a" else 1 for p in predictions]
