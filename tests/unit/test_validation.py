"""Pure logic: batch splitting, box conversion, input checks, error mapping, retry delays."""

from __future__ import annotations

import math

import httpx
import numpy as np
import pytest
from support.images import make_image

from prefect_roboflow.blocks import (
    Box,
    Clip,
    InferenceClientError,
    InferenceServer,
    InferenceServerError,
    InvalidInputError,
    ModelNotFoundError,
    OwlV2,
    RateLimitedError,
    ReferenceExample,
    ServerUnavailableError,
)
from prefect_roboflow.blocks._embedding import chunked, require_items
from prefect_roboflow.blocks._http import HttpSettings, InferenceHTTP, status_error
from prefect_roboflow.blocks.owlv2 import check_confidence, check_examples, to_detections


@pytest.mark.parametrize(("n", "size"), [(1, 8), (8, 8), (9, 8), (20, 8), (17, 1), (3, 5)])
def test_chunked_keeps_order_and_size(n: int, size: int) -> None:
    items = list(range(n))
    chunks = chunked(items, size)
    assert [x for c in chunks for x in c] == items
    assert all(1 <= len(c) <= size for c in chunks)
    assert len(chunks) == math.ceil(n / size)


@pytest.mark.parametrize(
    ("value", "reason"),
    [([], "empty list"), ("a.jpg", "expected a list"), (b"x", "expected a list"), (None, "expected a list")],
)
def test_require_items_rejects_non_lists(value: object, reason: str) -> None:
    with pytest.raises(InvalidInputError, match=reason) as caught:
        require_items(value, "images", "images")
    assert caught.value.field == "images"


def test_box_from_xyxy_round_trips() -> None:
    box = Box.from_xyxy((120, 80, 200, 160), "can")
    assert (box.x, box.y, box.w, box.h, box.cls) == (160, 120, 80, 80, "can")
    assert box.to_request() == {"x": 160, "y": 120, "w": 80, "h": 80, "cls": "can", "negative": False}


def test_a_box_is_given_and_read_by_its_corners_too() -> None:
    """Outputs are corners (xyxy) while `Box` is a centre: corners in and out, checked by hand."""
    by_corners = Box(xyxy=(120, 80, 200, 160), cls="can")  # type: ignore[call-arg]
    assert by_corners == Box(x=160, y=120, w=80, h=80, cls="can")
    assert by_corners.xyxy == (120, 80, 200, 160)
    assert Box.model_validate({"xyxy": [0, 10, 30, 50], "cls": "a", "negative": True}).to_request() == {
        "x": 15, "y": 30, "w": 30, "h": 40, "cls": "a", "negative": True,
    }  # fmt: skip
    with pytest.raises(ValueError, match="not both"):
        Box.model_validate({"xyxy": [0, 0, 10, 10], "x": 5, "cls": "a"})
    with pytest.raises(ValueError, match="four numbers"):
        Box.model_validate({"xyxy": [0, 0, 10], "cls": "a"})
    with pytest.raises(ValueError, match="greater than 0"):  # corners in the wrong order: no size
        Box.model_validate({"xyxy": [10, 0, 0, 10], "cls": "a"})


@pytest.mark.parametrize(
    "fields",
    [
        {"w": 0},
        {"h": -3},
        {"x": math.nan},
        {"y": math.inf},
        {"cls": ""},
    ],
)
def test_bad_boxes_are_rejected(fields: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Box(**{"x": 10, "y": 10, "w": 5, "h": 5, "cls": "a", **fields})  # type: ignore[arg-type]


def _example(*boxes: Box) -> ReferenceExample:
    return ReferenceExample(image=make_image(0), boxes=list(boxes))


def test_negative_only_class_is_rejected_naming_the_box() -> None:
    examples = [_example(Box(x=10, y=10, w=5, h=5, cls="a"), Box(x=20, y=20, w=5, h=5, cls="b", negative=True))]
    with pytest.raises(InvalidInputError, match="only negative") as caught:
        check_examples(examples)
    assert caught.value.field == "examples[0].boxes[1].cls"


def test_negative_box_of_a_class_with_positives_is_accepted() -> None:
    examples = [_example(Box(x=10, y=10, w=5, h=5, cls="a"), Box(x=20, y=20, w=5, h=5, cls="a", negative=True))]
    assert len(check_examples(examples)[0].boxes) == 2


def test_example_dicts_are_validated_with_a_field_path() -> None:
    with pytest.raises(InvalidInputError) as caught:
        check_examples([{"image": "x.jpg", "boxes": []}])
    assert caught.value.field == "examples[0]"


@pytest.mark.parametrize("value", [-0.1, 1.5, math.nan, math.inf, "0.5", True, None])
def test_confidence_outside_unit_interval_is_rejected(value: object) -> None:
    with pytest.raises(InvalidInputError) as caught:
        check_confidence(value)
    assert caught.value.field == "confidence"


def test_box_outside_reference_image_is_rejected_before_sending() -> None:
    owl = OwlV2(server=InferenceServer(api_url="http://127.0.0.1:9"))
    examples = [_example(Box(x=400, y=100, w=80, h=80, cls="a"))]  # image is 320 wide
    with pytest.raises(InvalidInputError, match="outside the 320×240") as caught:
        owl.detect(make_image(1), examples)
    assert caught.value.field == "examples[0].boxes[0]"


def test_detections_from_server_answer() -> None:
    answer = {
        "image": {"width": 320, "height": 240},
        "predictions": [
            {"x": 100, "y": 50, "width": 20, "height": 10, "confidence": 0.99, "class": "b", "detection_id": "d1"},
            {"x": 10.5, "y": 20, "width": 5, "height": 4, "confidence": 0.5, "class": "a", "detection_id": "d2"},
        ],
    }
    detections = to_detections(answer, ["a", "b"])
    np.testing.assert_allclose(detections.xyxy, [[90, 45, 110, 55], [8, 18, 13, 22]])
    assert detections.class_id.tolist() == [1, 0]
    assert detections.data["class_name"].tolist() == ["b", "a"]
    assert detections.metadata["image_width"] == 320
    assert len(to_detections({"predictions": []}, ["a"])) == 0


def test_clip_text_over_the_context_is_rejected() -> None:
    clip = Clip(server=InferenceServer(api_url="http://127.0.0.1:9"))
    with pytest.raises(InvalidInputError, match="CLIP takes at most 75") as caught:
        clip.embed_texts(["ok", "word " * 80])
    assert caught.value.field == "texts[1]"


@pytest.mark.parametrize("text", ["bad \udcff surrogate", b"bytes", 3])
def test_texts_must_be_valid_unicode_strings(text: object) -> None:
    clip = Clip(server=InferenceServer(api_url="http://127.0.0.1:9"))
    with pytest.raises(InvalidInputError) as caught:
        clip.embed_texts([text])  # type: ignore[list-item]
    assert caught.value.field == "texts[0]"


def _response(
    status: int, json: object = None, headers: dict[str, str] | None = None, text: str | None = None
) -> httpx.Response:
    request = httpx.Request("POST", "http://server/clip/embed_image")
    if text is not None:
        return httpx.Response(status, text=text, headers=headers, request=request)
    return httpx.Response(status, json=json, headers=headers, request=request)


@pytest.mark.parametrize(
    ("response", "kind", "retryable"),
    [
        (_response(400, {"message": "Could not load input image."}), InferenceClientError, False),
        (
            _response(422, {"detail": [{"loc": ["body", "image"], "msg": "Field required"}]}),
            InferenceClientError,
            False,
        ),
        (_response(404, {"message": "Requested Roboflow resource not found"}), ModelNotFoundError, False),
        (_response(500, {"message": "Could not retrieve model No offline-weights record"}), ModelNotFoundError, False),
        (_response(500, {"message": "Internal error."}), InferenceServerError, False),
        (_response(500, text="Internal Server Error"), InferenceServerError, False),
        (_response(503, {"message": "busy"}), ServerUnavailableError, True),
        (_response(504, {"message": "timeout"}), ServerUnavailableError, True),
        (_response(429, {"message": "slow down"}, {"Retry-After": "2"}), RateLimitedError, True),
    ],
)
def test_status_errors_map_onto_the_hierarchy(response: httpx.Response, kind: type, retryable: bool) -> None:
    error = status_error("/clip/embed_image", response)
    assert type(error) is kind
    assert error.retryable is retryable
    assert error.status_code == response.status_code
    assert error.endpoint == "/clip/embed_image"
    assert "/clip/embed_image" in str(error)


def test_422_detail_and_retry_after_are_kept() -> None:
    error = status_error("/x", _response(422, {"detail": [{"msg": "Field required"}]}))
    assert "Field required" in error.server_message
    limited = status_error("/x", _response(429, {}, {"Retry-After": "2"}))
    assert isinstance(limited, RateLimitedError) and limited.retry_after == 2.0


def test_retry_delays_grow_with_jitter_and_respect_the_budget() -> None:
    engine = InferenceHTTP(
        HttpSettings(
            api_url="http://127.0.0.1:9", retry_backoff=1.0, retry_max_backoff=8.0, max_retries=5, retry_budget=100
        )
    )
    try:
        unavailable = ServerUnavailableError(503, "busy")
        import time

        now = time.monotonic()
        delays = [engine._retry_delay(unavailable, attempt, now) for attempt in range(1, 6)]
        for attempt, delay in enumerate(delays, start=1):
            backoff = min(8.0, 2 ** (attempt - 1))
            assert delay is not None and backoff / 2 <= delay <= backoff
        assert engine._retry_delay(unavailable, 6, now) is None  # out of retries
        assert engine._retry_delay(InferenceServerError(500, "x"), 1, now) is None  # not retryable
        assert engine._retry_delay(unavailable, 1, now - 99.9) is None  # out of budget
        limited = RateLimitedError(429, "x", retry_after=5.0)
        assert engine._retry_delay(limited, 1, now) == pytest.approx(5.0, abs=0.6)
    finally:
        engine.close()


def test_api_url_is_validated() -> None:
    with pytest.raises(ValueError, match="http"):
        InferenceServer(api_url="localhost:9001")
    with pytest.raises(ValueError, match="query"):
        InferenceServer(api_url="http://localhost:9001/?api_key=x")
    assert InferenceServer(api_url="http://localhost:9001/").api_url == "http://localhost:9001"
