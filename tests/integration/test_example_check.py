"""An example box that OWLv2 does not find in its own reference image is a warning in the run's log
and at the top of its summary; one it finds is not. The server is the GPU stub
(`benchmarks/gpu_stub.py`), whose OWLv2 answer is planted: one box per class, centred on the image,
a quarter of its width and height. So an example drawn on that centre is found in its own image
(IoU 1), one drawn in a corner is not (IoU 0): truth the flow does not compute."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.images import make_image
from support.runs import logs_of, summary_of

from prefect_roboflow.flows import auto_label, detect_crop_classify

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.gpu_stub import StubServer  # noqa: E402

CENTRE = {"x": 160, "y": 120, "w": 80, "h": 60}  # the stub's box on a 320×240 image
CORNER = {"x": 40, "y": 40, "w": 60, "h": 60}


@pytest.fixture(scope="module")
def stub() -> Iterator[StubServer]:
    with StubServer() as server:
        yield server


@pytest.fixture()
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(make_image(40 + i))  # 320×240
    return folder


def _examples(photos: Path, *boxes: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"image": str(photos / "0.png"), "boxes": list(boxes)}]


def test_an_example_box_not_found_in_its_own_image_is_a_warning(stub: StubServer, photos: Path, tmp_path: Path) -> None:
    examples = _examples(photos, {**CENTRE, "cls": "can"}, {**CORNER, "cls": "lid"})
    kwargs: dict[str, Any] = {"server": stub.url, "cache_storage": str(tmp_path / "cache"), "return_state": True}
    state = detect_crop_classify(str(photos), examples, ["a can", "a lid"], str(tmp_path / "out"), **kwargs)
    assert state.is_completed()
    warnings = summary_of(state, "detect-crop-classify-summary").split("## Warnings", 1)[1].split("##", 1)[0]
    assert "examples[0].boxes[1] ('lid')" in warnings and "examples[0].boxes[0]" not in warnings
    assert any("examples[0].boxes[1] ('lid') is not found in its own reference image" in m for m in logs_of(state))

    stub_calls = stub.stats().get("/owlv2/infer", 0)
    again = auto_label(str(photos), examples, ["a can", "a lid"], str(tmp_path / "labels"), **kwargs)
    assert stub.stats().get("/owlv2/infer", 0) == stub_calls  # the check's answer came from the cache
    assert "examples[0].boxes[1] ('lid')" in summary_of(again, "auto-label-summary").split("## Classes")[0]


def test_example_boxes_found_in_their_own_image_are_no_warning(stub: StubServer, photos: Path, tmp_path: Path) -> None:
    examples = _examples(photos, {**CENTRE, "cls": "can"}, {**CORNER, "cls": "can", "negative": True})
    state = detect_crop_classify(
        str(photos), examples, ["a can", "a lid"], str(tmp_path / "out"), server=stub.url,
        cache_storage=str(tmp_path / "cache"), return_state=True,
    )  # fmt: skip
    assert "## Warnings" not in summary_of(state, "detect-crop-classify-summary")
    assert not any("is not found in its own reference image" in m for m in logs_of(state))
