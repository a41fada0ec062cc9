"""Each concept in one place, behaving one way wherever it is used: the box policy, the image size as
the server sees it, which strings name an image, the family lookup, the run names, `normalise`."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from prefect_roboflow.blocks import Clip, InvalidInputError, PerceptionEncoder
from prefect_roboflow.blocks._model import model_class
from prefect_roboflow.blocks.images import image_size
from prefect_roboflow.blocks.owlv2 import to_detections
from prefect_roboflow.blocks.tasks import run_name
from prefect_roboflow.flows.records import ImageRecord
from prefect_roboflow.flows.vector_index import family_name


def _answer(*boxes: tuple[float, float, float, float], size: tuple[int, int] = (80, 120)) -> dict:
    return {
        "predictions": [
            {"x": x, "y": y, "width": w, "height": h, "confidence": 0.9, "class": "can", "detection_id": str(i)}
            for i, (x, y, w, h) in enumerate(boxes)
        ],
        "image": {"width": size[0], "height": size[1]},
    }


def test_boxes_leave_the_blocks_clipped_to_the_image_with_the_servers_box_kept_as_raw() -> None:
    # centre (32, 63.5), 80 × 81 on an 80 × 120 image: the server's box is (-8, 23, 72, 104)
    detections = to_detections(_answer((32, 63.5, 80, 81)), ["can"])
    np.testing.assert_array_equal(detections.data["raw_xyxy"][0], [-8, 23, 72, 104])
    np.testing.assert_array_equal(detections.xyxy[0], [0, 23, 72, 104])
    inside = to_detections(_answer((40, 60, 20, 20)), ["can"])
    np.testing.assert_array_equal(inside.xyxy, inside.data["raw_xyxy"])


def test_crop_records_carry_boxes_clipped_to_the_image() -> None:
    from prefect_roboflow.flows._steps.operations import crop_records

    buffer = io.BytesIO()
    Image.new("RGB", (80, 120), (200, 30, 30)).save(buffer, format="PNG")
    data = buffer.getvalue()
    detections = to_detections(_answer((32, 63.5, 80, 81), (79, 119, 10, 10)), ["can"])
    parent = ImageRecord("shelf.png", hashlib.sha256(data).hexdigest(), data, detections=detections)
    crops, _, _ = crop_records([parent], padding=0)
    assert [c.crop.xyxy for c in crops if c.crop] == [(0.0, 23.0, 72.0, 104.0), (74.0, 114.0, 80.0, 120.0)]
    for crop in crops:
        assert crop.crop is not None
        x1, y1, x2, y2 = crop.crop.xyxy
        assert 0 <= x1 <= x2 <= 80 and 0 <= y1 <= y2 <= 120


def _jpeg(size: tuple[int, int], orientation: int | None) -> bytes:
    image = Image.new("RGB", size)
    buffer = io.BytesIO()
    if orientation is None:
        image.save(buffer, format="JPEG")
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.save(buffer, format="JPEG", exif=exif)
    return buffer.getvalue()


@pytest.mark.parametrize(("orientation", "expected"), [(None, (60, 40)), (1, (60, 40)), (6, (40, 60)), (8, (40, 60))])
def test_image_size_is_what_the_server_sees_after_exif_orientation(orientation: int | None, expected: tuple) -> None:
    assert image_size(_jpeg((60, 40), orientation)) == expected


def test_one_rule_says_which_strings_name_an_image() -> None:
    from prefect_roboflow.flows._storage.listing import looks_like_image

    for image in ["s3://bucket/q.jpg", "block://s3-bucket/photos/q.PNG", "photos/q.webp", "https://x.test/p?id=3"]:
        assert looks_like_image(image), image
    for text in ["a red car", "a photo of a dog.", "s3://bucket/table.parquet"]:
        assert not looks_like_image(text), text


def test_the_family_lookup_is_the_blocks_registry_and_knows_old_class_names() -> None:
    assert model_class("clip") is Clip and model_class("Clip") is Clip
    assert model_class("PerceptionEncoder") is PerceptionEncoder
    assert family_name("PerceptionEncoder") == "perception_encoder"
    with pytest.raises(InvalidInputError) as caught:
        family_name("owlv2", "embeddings_path")  # a registered family, but not an embedding model
    assert caught.value.field == "embeddings_path"


def test_runs_are_named_one_way() -> None:
    assert run_name("embed", "clip ViT-B-16", "batch 3/12") == "embed[clip ViT-B-16] batch 3/12"
    assert run_name("embed-images", "clip", "part-00003 attempt 1") == "embed-images[clip] part-00003 attempt 1"
    assert run_name("find-duplicates") == "find-duplicates"


def test_normalise_refuses_bad_user_vectors_and_keeps_failed_rows_at_zero() -> None:
    from prefect_roboflow.flows._steps.vectors import normalise

    np.testing.assert_allclose(normalise(np.array([[3.0, 4.0], [0.0, 0.0]])), [[0.6, 0.8], [0.0, 0.0]], rtol=1e-6)
    for bad in ([[0.0, 0.0]], [[np.nan, 1.0]]):
        with pytest.raises(InvalidInputError) as caught:
            normalise(np.array(bad), "vectors")
        assert caught.value.field == "vectors"
