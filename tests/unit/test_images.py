"""Image inputs become the server's image objects, or a typed error naming the field."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support.images import make_image

from prefect_roboflow.blocks import InvalidImageError
from prefect_roboflow.blocks.images import (
    encode_array,
    image_format,
    image_size,
    to_request_image,
    validate_encoded_image,
    validate_url,
)


def _decode(payload: dict[str, str]) -> np.ndarray:
    assert payload["type"] == "base64"
    # The server decodes with OpenCV IMREAD_COLOR, which makes every image 3-channel.
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(payload["value"]))).convert("RGB"))


def test_bytes_are_sent_unchanged() -> None:
    # given
    png = make_image(1)
    # when
    payload = to_request_image(png)
    # then
    assert base64.b64decode(payload["value"]) == png


def test_path_and_pathlike_read_the_file(tmp_path: Path) -> None:
    jpg = make_image(2, fmt="JPEG")
    path = tmp_path / "a.jpg"
    path.write_bytes(jpg)
    assert to_request_image(path) == to_request_image(str(path)) == to_request_image(jpg)


def test_https_url_is_passed_to_the_server() -> None:
    assert to_request_image("https://media.example.com/dog.jpeg") == {
        "type": "url",
        "value": "https://media.example.com/dog.jpeg",
    }


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://media.example.com/dog.jpeg", "only https"),
        ("ftp://media.example.com/dog.jpeg", "only https"),
        ("https://localhost/dog.jpeg", "fully qualified"),
        ("https:///dog.jpeg", "fully qualified"),
        ("https://exa mple.com/dog.jpeg", "malformed"),
        ("https://[::1/dog.jpeg", "malformed"),
    ],
)
def test_bad_urls_are_rejected_naming_the_field(url: str, reason: str) -> None:
    with pytest.raises(InvalidImageError, match=reason) as caught:
        validate_url(url, "images[3]")
    assert caught.value.field == "images[3]"


def test_bgr_array_is_encoded_with_channels_swapped() -> None:
    # given a pure blue image in OpenCV's BGR order
    bgr = np.zeros((20, 30, 3), dtype=np.uint8)
    bgr[:, :, 0] = 255
    # when
    rgb = _decode(to_request_image(bgr))
    # then it decodes as blue in RGB
    assert rgb.shape == (20, 30, 3)
    assert rgb[..., 2].mean() > 240 and rgb[..., 0].mean() < 15


@pytest.mark.parametrize(
    "array",
    [
        np.full((10, 12), 128, dtype=np.uint8),
        np.full((10, 12, 1), 128, dtype=np.uint8),
        np.full((10, 12, 4), 128, dtype=np.uint8),
        np.full((10, 12, 3), 128 * 256, dtype=np.uint16),
        np.full((10, 12, 3), 128 / 255, dtype=np.float32),
        np.full((10, 12, 3), 128.0, dtype=np.float64),
    ],
    ids=["gray", "gray1", "bgra", "uint16", "float01", "float255"],
)
def test_other_layouts_are_converted_not_rejected(array: np.ndarray) -> None:
    rgb = _decode(to_request_image(array))
    assert rgb.shape == (10, 12, 3)
    assert abs(float(rgb.mean()) - 128) < 3


@pytest.mark.parametrize(
    ("array", "reason"),
    [
        (np.zeros((0, 5, 3), dtype=np.uint8), "no pixels"),
        (np.zeros((5, 5, 2), dtype=np.uint8), "H×W"),
        (np.zeros((2, 5, 5, 3), dtype=np.uint8), "H×W"),
        (np.full((5, 5, 3), np.nan, dtype=np.float32), "NaN"),
        (np.full((5, 5, 3), np.inf, dtype=np.float32), "NaN or infinite"),
        (np.full((5, 5, 3), -1.0, dtype=np.float32), r"\[0, 1\]"),
        (np.full((5, 5, 3), 300, dtype=np.int32), r"\[0, 255\]"),
        (np.zeros((5, 5, 3), dtype=np.complex64), "dtype"),
    ],
)
def test_bad_arrays_are_rejected(array: np.ndarray, reason: str) -> None:
    with pytest.raises(InvalidImageError, match=reason):
        encode_array(array, "images[0]")


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "LA", "CMYK"])
def test_pil_images_of_any_mode_become_rgb_jpeg(mode: str) -> None:
    image = Image.new("RGB", (16, 8), (200, 100, 50)).convert(mode)
    assert _decode(to_request_image(image)).shape == (8, 16, 3)


def test_sixteen_bit_pil_image_is_scaled_not_clipped() -> None:
    image = Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16))
    assert abs(float(_decode(to_request_image(image)).mean()) - 40000 / 256) < 3


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"GIF8", "not a recognised image format"),
        (b"hello world", "not a recognised image format"),
        (make_image(3, fmt="JPEG")[:400], "truncated JPEG"),
        (make_image(3, fmt="PNG")[:400], "truncated PNG"),
    ],
    ids=["empty", "short", "text", "jpeg-cut", "png-cut"],
)
def test_unsendable_bytes_are_rejected(data: bytes, reason: str) -> None:
    with pytest.raises(InvalidImageError, match=reason):
        validate_encoded_image(data, "images[1]")


def test_missing_file_is_an_invalid_image_not_an_oserror(tmp_path: Path) -> None:
    with pytest.raises(InvalidImageError, match="file not found") as caught:
        to_request_image(tmp_path / "missing.jpg", "images[7]")
    assert caught.value.field == "images[7]"


def test_unsupported_type_is_rejected() -> None:
    with pytest.raises(InvalidImageError, match="unsupported image type int"):
        to_request_image(42)  # type: ignore[arg-type]


def test_format_and_size_come_from_the_header() -> None:
    png = make_image(4, size=(64, 48))
    assert image_format(png) == "png"
    assert image_format(make_image(4, fmt="JPEG")) == "jpeg"
    assert image_size(png) == (64, 48)
    assert image_size(b"garbage") is None


def test_png_encoding_is_lossless_and_jpeg_is_not() -> None:
    rng = np.random.default_rng(7)
    frame = rng.integers(0, 256, size=(60, 80, 3), dtype=np.uint8)  # BGR, noisy: JPEG must change it
    png = encode_array(frame, format="png")
    with Image.open(io.BytesIO(png)) as decoded:
        assert decoded.format == "PNG"
        np.testing.assert_array_equal(np.asarray(decoded)[:, :, ::-1], frame)
    with Image.open(io.BytesIO(encode_array(frame))) as decoded:
        assert decoded.format == "JPEG" and not np.array_equal(np.asarray(decoded)[:, :, ::-1], frame)
    with pytest.raises(InvalidImageError, match="format"):
        encode_array(frame, format="webp")  # type: ignore[arg-type]
