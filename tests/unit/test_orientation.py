"""Photos are turned in one place (`blocks.images.upright`, the server's rule) and everything after it
reads them that way: crops and annotated copies, and the Label Studio export's sizes and regions
(percent of the *displayed* image). Checked against Pillow's own ``ImageOps.exif_transpose``."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from prefect_roboflow.flows._outputs.handoff import label_studio_tasks
from prefect_roboflow.flows._steps.operations import decode_rgb
from prefect_roboflow.flows.records import ImageRecord


def _phone_photo(orientation: int) -> bytes:
    """A 120×80 stored picture (a red block at its top-left) with an EXIF orientation."""
    pixels = np.full((80, 120, 3), 90, np.uint8)
    pixels[:20, :30] = (220, 20, 20)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_photos_are_read_upright_as_pillow_turns_them(orientation: int) -> None:
    data = _phone_photo(orientation)
    with Image.open(io.BytesIO(data)) as image:
        expected = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    assert np.array_equal(decode_rgb(data), expected)


class _Labelled:
    def __init__(self, ref: str, xyxy: list[list[float]]) -> None:
        self.image = ImageRecord(ref)
        self.xyxy, self.class_ids, self.scores = xyxy, [0] * len(xyxy), [0.9] * len(xyxy)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_label_studio_regions_are_percent_of_the_displayed_photo(tmp_path: Path, orientation: int) -> None:
    path = tmp_path / f"phone-{orientation}.jpg"
    path.write_bytes(_phone_photo(orientation))
    with Image.open(path) as image:
        shown = ImageOps.exif_transpose(image)
        width, height = shown.size
        red = np.argwhere(np.asarray(shown)[:, :, 0] > 150)  # where the block is seen
    (y0, x0), (y1, x1) = red.min(axis=0), red.max(axis=0) + 1
    box = [float(x0), float(y0), float(x1), float(y1)]  # the box the server gives: upright pixels
    (task,) = label_studio_tasks([_Labelled(str(path), [box])], ["block"], {str(path): str(path)}, "test", None)
    (region,) = task["predictions"][0]["result"]
    assert (region["original_width"], region["original_height"]) == (width, height)
    value = region["value"]
    assert value["x"] == pytest.approx(100 * x0 / width) and value["y"] == pytest.approx(100 * y0 / height)
    assert value["x"] + value["width"] <= 100 + 1e-9 and value["y"] + value["height"] <= 100 + 1e-9
