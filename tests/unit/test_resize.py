"""Client-side pre-resize: plans per model, what is resized and how, and the bad inputs it meets."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from functools import cache

import cv2
import numpy as np
import pytest
from PIL import Image
from support.images import make_image, make_photo

from prefect_roboflow.blocks import (
    Box,
    Clip,
    InferenceServer,
    InvalidImageError,
    InvalidInputError,
    OwlV2,
    PerceptionEncoder,
)
from prefect_roboflow.blocks._resize import (
    PreparedImage,
    ResizePlan,
    header_size,
    plan_for,
    prepare_image,
    prepare_images,
    resize_encoded,
)
from prefect_roboflow.blocks.images import validate_encoded_image
from prefect_roboflow.blocks.owlv2 import ReferenceExample, to_detections, training_data

CLIP_PLAN = ResizePlan("crop", 224, "bicubic")
# Nothing listens here: a block that tried to send would fail with a connection error instead.
NOWHERE = InferenceServer(api_url="http://127.0.0.1:9", timeout_seconds=2, max_retries=0)


@cache
def photo(
    seed: int = 1, size: tuple[int, int] = (2000, 1500), fmt: str = "JPEG", orientation: int | None = None
) -> bytes:
    return make_photo(seed, size=size, fmt=fmt, orientation=orientation)


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)


def _sent(prepared: PreparedImage | Exception) -> bytes:
    assert isinstance(prepared, PreparedImage), prepared
    return base64.b64decode(prepared.image["value"])


def _png_claiming(width: int, height: int) -> bytes:
    """A well-formed 1×1 PNG whose header claims ``width``×``height``."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = bytearray(data[16:29])  # IHDR data: width, height, depth, colour, ...
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(data)


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) claims ``width``×``height``."""
    data = bytearray(make_image(1, fmt="JPEG"))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _corrupt_scan(jpeg: bytes) -> bytes:
    """Headers intact, end marker present, but the scan names a component the frame lacks:
    the cheap checks pass and only decoding fails."""
    data = bytearray(jpeg)
    sos = data.find(b"\xff\xda")
    data[sos + 5] = 9  # first component selector of the scan
    return bytes(data)


# --- plans ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "version", "plan"),
    [
        ("clip", "ViT-B-16", ResizePlan("crop", 224, "bicubic")),
        ("clip", "ViT-L-14", ResizePlan("crop", 224, "bicubic")),
        ("clip", "ViT-L-14-336px", ResizePlan("crop", 336, "bicubic")),
        ("clip", "RN50x4", ResizePlan("crop", 288, "bicubic")),
        ("clip", "RN50x64", ResizePlan("crop", 448, "bicubic")),
        ("perception_encoder", "PE-Core-B16-224", ResizePlan("squash", 224, "bilinear")),
        ("perception_encoder", "PE-Core-L14-336", ResizePlan("squash", 336, "bilinear")),
        ("perception_encoder", "PE-Core-G14-448", ResizePlan("squash", 448, "bilinear")),
        ("owlv2", "owlv2-base-patch16-ensemble", ResizePlan("fit", 960, "bilinear")),
        ("owlv2", "owlv2-large-patch14-ensemble", ResizePlan("fit", 1008, "bilinear")),
        ("clip", "ViT-H-14", None),
        ("perception_encoder", "PE-Spatial-G14-448", None),
        ("owlv2", "my-finetuned-detector", None),
    ],
)
def test_plan_per_model_version(family: str, version: str, plan: ResizePlan | None) -> None:
    assert plan_for(family, version) == plan


def test_blocks_use_their_plan_unless_resize_is_off() -> None:
    assert Clip(version="ViT-L-14-336px").resize_plan() == ResizePlan("crop", 336, "bicubic")
    assert PerceptionEncoder(version="PE-Core-G14-448").resize_plan() == ResizePlan("squash", 448, "bilinear")
    assert OwlV2().resize_plan() == ResizePlan("fit", 1008, "bilinear")
    assert Clip(client_resize=False).resize_plan() is None
    assert OwlV2(client_resize=False).resize_plan() is None


def test_resize_setting_is_part_of_the_cache_identity() -> None:
    for block in (Clip, PerceptionEncoder, OwlV2):
        on, off = block().identity(), block(client_resize=False).identity()
        assert on != off
        assert {k for k in on if on[k] != off[k]} == {"client_resize"}


@pytest.mark.parametrize(
    ("plan", "size", "expected"),
    [
        (CLIP_PLAN, (4000, 3000), (224, 224)),
        (CLIP_PLAN, (320, 240), None),
        (CLIP_PLAN, (336, 336), None),  # not more than MARGIN (1.5×) the input: untouched
        (CLIP_PLAN, (5000, 300), None),  # short side small: CLIP would crop, not shrink, most of it
        (ResizePlan("squash", 336, "bilinear"), (4000, 3000), (336, 336)),
        (ResizePlan("fit", 960, "bilinear"), (4000, 3000), (960, 720)),
        (ResizePlan("fit", 960, "bilinear"), (3000, 4000), (720, 960)),
        (ResizePlan("fit", 960, "bilinear"), (1400, 1000), None),
    ],
)
def test_output_size(plan: ResizePlan, size: tuple[int, int], expected: tuple[int, int] | None) -> None:
    assert plan.output_size(*size) == expected


# --- what is sent ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_small_images_are_sent_byte_for_byte(fmt: str) -> None:
    small = make_image(4, fmt=fmt)  # 320×240
    prepared = prepare_image(small, "image", CLIP_PLAN)
    assert _sent(prepared) == small
    assert not prepared.resized and prepared.scale == (1.0, 1.0)
    assert base64.b64decode(Clip().prepare_images([small])[0]["value"]) == small  # type: ignore[index]


def test_resize_off_sends_big_photos_byte_for_byte() -> None:
    big = photo()
    prepared = Clip(client_resize=False).prepare_images([big])[0]
    assert base64.b64decode(prepared["value"]) == big  # type: ignore[index]


def test_big_photo_is_resized_and_cropped_as_clip_would() -> None:
    big = photo()
    prepared = prepare_image(big, "image", CLIP_PLAN)
    sent = _sent(prepared)
    assert prepared.sent_size == (224, 224) and prepared.size == (2000, 1500)
    assert len(sent) < len(big) / 20
    # The reference: full decode, short side to 224 with torchvision's rounding, centre crop.
    full = Image.open(io.BytesIO(big)).convert("RGB").resize((298, 224), Image.Resampling.BICUBIC)
    reference = np.asarray(full.crop((37, 0, 261, 224)), dtype=np.float32)
    assert np.abs(_pixels(sent) - reference).mean() < 4.0  # draft decode + JPEG q95: a few levels


def test_jpeg_is_decoded_in_draft_mode_png_in_full() -> None:
    plan = plan_for("perception_encoder", "PE-Core-B16-224")
    assert plan is not None
    jpeg = resize_encoded(photo(), plan)
    assert jpeg.decoded_size == (500, 375)  # 1/4 scale: the smallest still ≥ 224 on both sides
    assert jpeg.size == (224, 224)
    png = resize_encoded(photo(2, size=(1000, 800), fmt="PNG"), plan)
    assert png.decoded_size == (1000, 800)
    assert png.size == (224, 224)


def test_exif_rotated_photo_is_turned_as_the_server_turns_it() -> None:
    # A phone photo: pixels stored 1200×900 landscape, EXIF 6 says "view turned 90° clockwise".
    rotated = photo(5, size=(1200, 900), orientation=6)
    assert header_size(rotated) == (900, 1200)
    prepared = prepare_image(rotated, "image", ResizePlan("fit", 400, "bilinear"))
    assert prepared.size == (900, 1200) and prepared.sent_size == (300, 400)
    # The server decodes with OpenCV IMREAD_COLOR, which applies the EXIF orientation.
    server_view = cv2.imdecode(np.frombuffer(rotated, np.uint8), cv2.IMREAD_COLOR)
    assert server_view.shape[:2] == (1200, 900)
    expected = cv2.resize(server_view, (300, 400), interpolation=cv2.INTER_AREA)[:, :, ::-1].astype(np.float32)
    sent = _pixels(_sent(prepared))
    assert np.abs(sent - expected).mean() < 4.0
    unturned = np.asarray(Image.open(io.BytesIO(rotated)).convert("RGB").resize((300, 400)), dtype=np.float32)
    assert np.abs(sent - unturned).mean() > 4 * np.abs(sent - expected).mean()


def test_png_with_alpha_is_sent_as_jpeg_without_alpha() -> None:
    rgb = Image.open(io.BytesIO(photo(6, size=(1000, 800), fmt="PNG")))
    rgba = rgb.copy()
    rgba.putalpha(Image.new("L", rgb.size, 0))  # fully transparent: the colours are still there
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    sent = _sent(prepare_image(buffer.getvalue(), "image", CLIP_PLAN))
    assert Image.open(io.BytesIO(sent)).format == "JPEG" and Image.open(io.BytesIO(sent)).mode == "RGB"
    # IMREAD_COLOR drops alpha without compositing; so does the resize.
    direct = _sent(prepare_image(photo(6, size=(1000, 800), fmt="PNG"), "image", CLIP_PLAN))
    assert np.abs(_pixels(sent) - _pixels(direct)).mean() < 0.5


def test_arrays_and_pil_images_are_resized_too() -> None:
    pil = Image.open(io.BytesIO(photo())).convert("RGB")
    bgr = np.asarray(pil)[:, :, ::-1]
    for image in (pil, bgr):
        prepared = prepare_image(image, "image", CLIP_PLAN)
        assert prepared.sent_size == (224, 224) and prepared.size == (2000, 1500)


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bomb",
    [_png_claiming(30_000, 30_000), _png_claiming(10_000, 10_000), _jpeg_claiming(60_000, 60_000)],
    ids=["png-900MP", "png-100MP", "jpeg-3.6GP"],
)
@pytest.mark.parametrize("client_resize", [True, False])
def test_decompression_bomb_header_is_a_typed_error_naming_the_image(bomb: bytes, client_resize: bool) -> None:
    validate_encoded_image(bomb)  # the cheap checks pass: only the header's claim gives it away
    clip = Clip(server=NOWHERE, client_resize=client_resize)
    prepared = clip.prepare_images([make_image(1), bomb])
    assert isinstance(prepared[1], InvalidImageError)
    assert prepared[1].field == "images[1]"
    assert "pixels" in prepared[1].reason
    assert not isinstance(prepared[0], Exception)
    with pytest.raises(InvalidImageError, match=r"images\[1\].*pixels"):
        clip.embed_images([make_image(1), bomb])  # raised before anything is sent (NOWHERE)


def test_corrupt_jpeg_fails_in_resize_as_its_own_outcome() -> None:
    corrupt = _corrupt_scan(photo(7))
    validate_encoded_image(corrupt)
    assert header_size(corrupt) == (2000, 1500)  # the header reads fine
    prepared = prepare_images([photo(8), corrupt, make_image(2)], "images", CLIP_PLAN)
    assert [type(p).__name__ for p in prepared] == ["PreparedImage", "InvalidImageError", "PreparedImage"]
    error = prepared[1]
    assert isinstance(error, InvalidImageError) and error.field == "images[1]"
    assert "cannot decode" in error.reason


def test_corrupt_jpeg_raises_before_sending_anything() -> None:
    with pytest.raises(InvalidImageError, match=r"images\[1\]: cannot decode"):
        Clip(server=NOWHERE).embed_images([photo(8), _corrupt_scan(photo(7))])


# --- OWLv2: boxes mapped between original and sent images -----------------------------------


def test_detections_on_a_resized_image_map_back_to_the_original() -> None:
    sent = PreparedImage({"type": "base64", "value": ""}, size=(4000, 3000), sent_size=(1008, 756))
    answer = {
        "predictions": [{"x": 504, "y": 378, "width": 100, "height": 50, "confidence": 0.99, "class": "can"}],
        "image": {"width": 1008, "height": 756},
    }
    detections = to_detections(answer, ["can"], sent)
    sx, sy = 4000 / 1008, 3000 / 756
    np.testing.assert_allclose(
        detections.xyxy[0], [454 * sx, 353 * sy, 554 * sx, 403 * sy], rtol=1e-6
    )  # float32 boxes: 6 digits
    assert (detections.metadata["image_width"], detections.metadata["image_height"]) == (4000, 3000)
    untouched = to_detections(answer, ["can"], PreparedImage({}, (1008, 756), (1008, 756)))
    np.testing.assert_array_equal(untouched.xyxy[0], [454, 353, 554, 403])


def test_reference_boxes_are_scaled_with_their_image() -> None:
    big = photo(9, size=(2016, 1512))  # long side 2 × 1008
    examples = [ReferenceExample(image=big, boxes=[Box(x=1000, y=700, w=400, h=300, cls="can")])]
    [entry] = training_data(examples, plan=plan_for("owlv2", "owlv2-large-patch14-ensemble"))
    assert entry["boxes"] == [{"x": 500, "y": 350, "w": 200, "h": 150, "cls": "can", "negative": False}]
    assert Image.open(io.BytesIO(base64.b64decode(entry["image"]["value"]))).size == (1008, 756)
    [untouched] = training_data(examples, plan=None)
    assert untouched["boxes"][0]["x"] == 1000
    assert base64.b64decode(untouched["image"]["value"]) == big


def test_reference_box_outside_the_upright_image_is_rejected() -> None:
    rotated = photo(5, size=(1200, 900), orientation=6)  # upright: 900 wide, 1200 tall
    examples = [ReferenceExample(image=rotated, boxes=[Box(x=1000, y=100, w=80, h=80, cls="can")])]
    with pytest.raises(InvalidInputError, match=r"outside the 900×1200"):
        training_data(examples, plan=None)
