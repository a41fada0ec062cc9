"""The bad-input catalogue: every case asserts its outcome against the real server behind a
counting proxy — a typed error naming the field and no request sent, or a correct conversion.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from support.fault_proxy import FaultProxy
from support.images import make_image

from prefect_roboflow.blocks import (
    Box,
    Clip,
    InferenceServer,
    InvalidImageError,
    InvalidInputError,
    ModelNotFoundError,
    OwlV2,
    PerceptionEncoder,
    ReferenceExample,
)

pytestmark = pytest.mark.server

PNG = make_image(1)
JPEG = make_image(2, fmt="JPEG")
REFERENCE = make_image(100)


def _example(*boxes: Box, image: Any = REFERENCE) -> list[ReferenceExample]:
    return [ReferenceExample(image=image, boxes=list(boxes))]


GOOD_BOX = Box(x=160, y=120, w=80, h=80, cls="thing")


def same_embedding(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal as float32 batched math promises: the same image embedded in one batch twice may
    differ from about the 6th significant digit (BLAS kernels differ by machine), so within 1e-4
    of the vector's norm; different images differ by orders of magnitude more."""
    return bool(np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(a))


@dataclass(frozen=True)
class Rejected:
    """The call raises ``error`` naming ``field``, and sends nothing."""

    error: type[Exception]
    field: str


@dataclass(frozen=True)
class Converted:
    """The call succeeds; ``check`` holds on its result; exactly ``requests`` go out."""

    check: Callable[[Any], bool]
    requests: int


@dataclass(frozen=True)
class ServerAnswer:
    """The server refuses it; the client raises ``error`` after ``requests`` request(s)."""

    error: type[Exception]
    requests: int


Models = dict[str, Any]


def _png(mode: str, size: tuple[int, int] = (64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (120, 60, 30)).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def _sixteen_bit_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((48, 64), 50000, dtype=np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


def _files(tmp: Path) -> dict[str, Path]:
    files = {
        "empty": b"",
        "truncated_jpeg": JPEG[: len(JPEG) // 2],
        "truncated_png": PNG[: len(PNG) // 2],
        "text": b"this is a text file, not an image\n",
        "html": b"<!doctype html><html></html>",
    }
    paths = {}
    for name, data in files.items():
        path = tmp / f"{name}.jpg"
        path.write_bytes(data)
        paths[name] = path
    directory = tmp / "a_directory.jpg"
    directory.mkdir()
    paths["directory"] = directory
    return paths


def _catalogue(tmp: Path) -> list[tuple[str, Callable[[Models], Any], Rejected | Converted | ServerAnswer]]:
    f = _files(tmp)
    nine = [make_image(10 + i) for i in range(9)]
    return [
        # lists
        ("empty image list", lambda m: m["clip"].embed_images([]), Rejected(InvalidInputError, "images")),
        ("empty text list", lambda m: m["pe"].embed_texts([]), Rejected(InvalidInputError, "texts")),
        ("empty prompt list", lambda m: m["clip"].compare(PNG, []), Rejected(InvalidInputError, "prompts")),
        ("empty example list", lambda m: m["owl"].detect(PNG, []), Rejected(InvalidInputError, "examples")),
        ("a str instead of a list", lambda m: m["clip"].embed_texts("a cat"), Rejected(InvalidInputError, "texts")),
        (
            "a path instead of a list",
            lambda m: m["clip"].embed_images(str(f["empty"])),
            Rejected(InvalidInputError, "images"),
        ),
        ("9 PE images split 8 + 1", lambda m: m["pe"].embed_images(nine), Converted(lambda r: r.shape == (9, 1024), 2)),
        (
            "9 PE texts split 8 + 1",
            lambda m: m["pe"].embed_texts([f"t{i}" for i in range(9)]),
            Converted(lambda r: r.shape == (9, 1024), 2),
        ),
        (
            "9 CLIP prompts split 8 + 1",
            lambda m: m["clip"].compare(PNG, [f"p{i}" for i in range(9)]),
            Converted(lambda r: r.shape == (9,), 2),
        ),
        (
            "duplicate images in one batch",
            lambda m: m["pe"].embed_images([PNG, PNG, JPEG]),
            Converted(
                lambda r: r.shape == (3, 1024) and same_embedding(r[0], r[1]) and not same_embedding(r[0], r[2]), 1
            ),
        ),
        # text
        (
            "CLIP text over 75 tokens",
            lambda m: m["clip"].embed_texts(["ok", "word " * 76]),
            Rejected(InvalidInputError, "texts[1]"),
        ),
        (
            "CLIP prompt over 75 tokens",
            lambda m: m["clip"].compare(PNG, ["x " * 80]),
            Rejected(InvalidInputError, "prompts[0]"),
        ),
        (
            "non-UTF-8 text (lone surrogate)",
            lambda m: m["clip"].embed_texts(["caf\udce9"]),
            Rejected(InvalidInputError, "texts[0]"),
        ),
        ("bytes instead of text", lambda m: m["pe"].embed_texts([b"a cat"]), Rejected(InvalidInputError, "texts[0]")),
        ("None in texts", lambda m: m["pe"].embed_texts(["a", None]), Rejected(InvalidInputError, "texts[1]")),
        # URLs
        (
            "http URL",
            lambda m: m["clip"].embed_images(["http://images.example.com/a.jpg"]),
            Rejected(InvalidImageError, "images[0]"),
        ),
        (
            "ftp URL",
            lambda m: m["clip"].embed_images(["ftp://images.example.com/a.jpg"]),
            Rejected(InvalidImageError, "images[0]"),
        ),
        (
            "URL without a FQDN",
            lambda m: m["pe"].embed_images(["https://intranet/a.jpg"]),
            Rejected(InvalidImageError, "images[0]"),
        ),
        (
            "malformed URL",
            lambda m: m["pe"].embed_images(["https://[bad/a.jpg"]),
            Rejected(InvalidImageError, "images[0]"),
        ),
        (
            "URL with spaces",
            lambda m: m["clip"].compare("https://a b.example.com/x.jpg", ["a"]),
            Rejected(InvalidImageError, "image"),
        ),
        # files and bytes
        ("0-byte file", lambda m: m["clip"].embed_images([PNG, f["empty"]]), Rejected(InvalidImageError, "images[1]")),
        (
            "truncated JPEG",
            lambda m: m["clip"].embed_images([f["truncated_jpeg"]]),
            Rejected(InvalidImageError, "images[0]"),
        ),
        (
            "truncated PNG",
            lambda m: m["pe"].embed_images([f["truncated_png"]]),
            Rejected(InvalidImageError, "images[0]"),
        ),
        ("text file", lambda m: m["clip"].embed_images([f["text"]]), Rejected(InvalidImageError, "images[0]")),
        (
            "HTML bytes",
            lambda m: m["clip"].embed_images([f["html"].read_bytes()]),
            Rejected(InvalidImageError, "images[0]"),
        ),
        (
            "missing file",
            lambda m: m["clip"].embed_images([tmp / "nope.jpg"]),
            Rejected(InvalidImageError, "images[0]"),
        ),
        ("a directory", lambda m: m["clip"].embed_images([f["directory"]]), Rejected(InvalidImageError, "images[0]")),
        ("unsupported object", lambda m: m["clip"].embed_images([object()]), Rejected(InvalidImageError, "images[0]")),
        # pixel formats that are converted, not rejected
        ("grayscale PNG", lambda m: m["clip"].embed_images([_png("L")]), Converted(lambda r: r.shape == (1, 512), 1)),
        ("RGBA PNG", lambda m: m["clip"].embed_images([_png("RGBA")]), Converted(lambda r: r.shape == (1, 512), 1)),
        (
            "16-bit PNG",
            lambda m: m["pe"].embed_images([_sixteen_bit_png()]),
            Converted(lambda r: r.shape == (1, 1024), 1),
        ),
        (
            "grayscale array",
            lambda m: m["clip"].embed_images([np.full((48, 64), 90, np.uint8)]),
            Converted(lambda r: r.shape == (1, 512), 1),
        ),
        (
            "BGRA array",
            lambda m: m["clip"].embed_images([np.full((48, 64, 4), 90, np.uint8)]),
            Converted(lambda r: r.shape == (1, 512), 1),
        ),
        (
            "uint16 array",
            lambda m: m["clip"].embed_images([np.full((48, 64, 3), 40000, np.uint16)]),
            Converted(lambda r: r.shape == (1, 512), 1),
        ),
        (
            "float [0,1] array",
            lambda m: m["clip"].embed_images([np.full((48, 64, 3), 0.5, np.float32)]),
            Converted(lambda r: r.shape == (1, 512), 1),
        ),
        (
            "PIL palette image",
            lambda m: m["clip"].embed_images([Image.new("P", (64, 48))]),
            Converted(lambda r: r.shape == (1, 512), 1),
        ),
        # NaN / inf and bad numbers
        (
            "NaN array",
            lambda m: m["clip"].embed_images([np.full((8, 8, 3), np.nan, np.float32)]),
            Rejected(InvalidImageError, "images[0]"),
        ),
        (
            "inf array",
            lambda m: m["clip"].embed_images([np.full((8, 8, 3), np.inf, np.float64)]),
            Rejected(InvalidImageError, "images[0]"),
        ),
        (
            "empty array",
            lambda m: m["clip"].embed_images([np.zeros((0, 8, 3), np.uint8)]),
            Rejected(InvalidImageError, "images[0]"),
        ),
        (
            "5-channel array",
            lambda m: m["clip"].embed_images([np.zeros((8, 8, 5), np.uint8)]),
            Rejected(InvalidImageError, "images[0]"),
        ),
        (
            "confidence above 1",
            lambda m: m["owl"].detect(PNG, _example(GOOD_BOX), confidence=1.01),
            Rejected(InvalidInputError, "confidence"),
        ),
        (
            "confidence below 0",
            lambda m: m["owl"].detect(PNG, _example(GOOD_BOX), confidence=-0.1),
            Rejected(InvalidInputError, "confidence"),
        ),
        (
            "confidence NaN",
            lambda m: m["owl"].detect(PNG, _example(GOOD_BOX), confidence=math.nan),
            Rejected(InvalidInputError, "confidence"),
        ),
        (
            "box NaN",
            lambda m: m["owl"].detect(
                PNG, [{"image": REFERENCE, "boxes": [{"x": math.nan, "y": 1, "w": 80, "h": 80, "cls": "a"}]}]
            ),
            Rejected(InvalidInputError, "examples[0]"),
        ),
        (
            "box infinite size",
            lambda m: m["owl"].detect(
                PNG, [{"image": REFERENCE, "boxes": [{"x": 1, "y": 1, "w": math.inf, "h": 80, "cls": "a"}]}]
            ),
            Rejected(InvalidInputError, "examples[0]"),
        ),
        # boxes and classes
        (
            "box of zero width",
            lambda m: m["owl"].detect(
                PNG, [{"image": REFERENCE, "boxes": [{"x": 10, "y": 10, "w": 0, "h": 80, "cls": "a"}]}]
            ),
            Rejected(InvalidInputError, "examples[0]"),
        ),
        (
            "box of negative height",
            lambda m: m["owl"].detect(
                PNG, [{"image": REFERENCE, "boxes": [{"x": 10, "y": 10, "w": 8, "h": -8, "cls": "a"}]}]
            ),
            Rejected(InvalidInputError, "examples[0]"),
        ),
        (
            "box off the right edge",
            lambda m: m["owl"].detect(PNG, _example(Box(x=400, y=100, w=80, h=80, cls="a"))),
            Rejected(InvalidInputError, "examples[0].boxes[0]"),
        ),
        (
            "box above the image",
            lambda m: m["owl"].detect(PNG, _example(GOOD_BOX, Box(x=100, y=-5, w=80, h=80, cls="thing"))),
            Rejected(InvalidInputError, "examples[0].boxes[1]"),
        ),
        (
            "class with only negatives",
            lambda m: m["owl"].detect(PNG, _example(GOOD_BOX, Box(x=80, y=60, w=80, h=80, cls="other", negative=True))),
            Rejected(InvalidInputError, "examples[0].boxes[1].cls"),
        ),
        (
            "example with no boxes",
            lambda m: m["owl"].detect(PNG, [{"image": REFERENCE, "boxes": []}]),
            Rejected(InvalidInputError, "examples[0]"),
        ),
        (
            "unreadable reference image",
            lambda m: m["owl"].detect(PNG, _example(GOOD_BOX, image=b"")),
            Rejected(InvalidImageError, "examples[0].image"),
        ),
        (
            "bad query image for OWLv2",
            lambda m: m["owl"].detect_batch([PNG, b"junk"], _example(GOOD_BOX)),
            Rejected(InvalidImageError, "images[1]"),
        ),
        (
            "fractional boxes are rounded",
            lambda m: m["owl"].detect(
                PNG, _example(Box(x=160.4, y=119.6, w=80.2, h=79.7, cls="thing")), confidence=0.5
            ),
            Converted(lambda r: len(r.xyxy.shape) == 2, 1),
        ),
        # answers only the server can give
        (
            "unknown CLIP version",
            lambda m: Clip(server=m["server"], version="ViT-Nonexistent").embed_texts(["a"]),
            ServerAnswer(ModelNotFoundError, 1),
        ),
        (
            "unknown PE version",
            lambda m: PerceptionEncoder(server=m["server"], version="PE-Nope").embed_images([PNG]),
            ServerAnswer(ModelNotFoundError, 1),
        ),
    ]


def test_catalogue_has_at_least_thirty_cases(tmp_path: Path) -> None:
    assert len(_catalogue(tmp_path)) >= 30


def test_bad_input_catalogue(proxy: FaultProxy, proxied: InferenceServer, tmp_path: Path) -> None:
    models = {
        "clip": Clip(server=proxied),
        "pe": PerceptionEncoder(server=proxied),
        "owl": OwlV2(server=proxied),
        "server": proxied,
    }
    failures = []
    for name, call, expected in _catalogue(tmp_path):
        proxy.clear()
        try:
            if isinstance(expected, Converted):
                result = call(models)
                assert expected.check(result), "result check failed"
                assert proxy.count() == expected.requests, f"{proxy.count()} requests, expected {expected.requests}"
            else:
                with pytest.raises(expected.error) as caught:
                    call(models)
                if isinstance(expected, Rejected):
                    assert caught.value.field == expected.field, f"field {caught.value.field!r}"  # type: ignore[attr-defined]
                    assert expected.field in str(caught.value)
                    assert proxy.count() == 0, f"{proxy.count()} request(s) sent"
                else:
                    assert proxy.count() == expected.requests, f"{proxy.count()} requests"
        except BaseException as error:  # collect every mismatch, then report them together
            failures.append(f"{name}: {type(error).__name__}: {error}")
    assert not failures, "\n".join(failures)
