"""Test images made on the spot: small, distinct, deterministic."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def make_image(seed: int, size: tuple[int, int] = (320, 240), fmt: str = "PNG") -> bytes:
    """A distinct, deterministic picture: a coloured background with a few rectangles."""
    rng = np.random.default_rng(seed)
    width, height = size
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[:] = rng.integers(0, 256, size=3, dtype=np.uint8)
    low, high = max(2, min(size) // 12), max(3, min(size) // 2)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width - low)), int(rng.integers(0, height - low))
        w, h = int(rng.integers(low, high)), int(rng.integers(low, high))
        pixels[y0 : y0 + h, x0 : x0 + w] = rng.integers(0, 256, size=3, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def make_scene(seed: int, fmt: str = "PNG") -> bytes:
    """A 320×240 scene with 80×80 objects: the size the placeholder OWLv2 weights can match."""
    from PIL import ImageDraw

    rng = np.random.default_rng(1000 + seed)
    background = rng.integers(150, 200, size=(240, 320, 1), dtype=np.uint8)
    image = Image.fromarray(np.repeat(background, 3, axis=2))
    draw = ImageDraw.Draw(image)
    for index in rng.permutation(8)[: int(rng.integers(2, 6))]:
        cx, cy = 40 + 80 * int(index % 4), 60 + 120 * int(index // 4)
        shape = (cx - 36, cy - 36, cx + 36, cy + 36)
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if rng.random() < 0.5:
            draw.ellipse(shape, fill=colour, outline=(20, 20, 20), width=3)
        else:
            draw.rectangle(shape, fill=colour, outline=(20, 20, 20), width=3)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


_NOISE: dict[int, np.ndarray] = {}


def _noise_tile(side: int = 1024) -> np.ndarray:
    """Sensor-like noise, made once and tiled: per-pixel detail is what makes photos big as JPEG."""
    if side not in _NOISE:
        _NOISE[side] = np.random.default_rng(7).integers(-14, 15, size=(side, side, 3), dtype=np.int16)
    return _NOISE[side]


def make_photo(
    seed: int,
    size: tuple[int, int] = (4000, 3000),
    fmt: str = "JPEG",
    quality: int = 92,
    orientation: int | None = None,
) -> bytes:
    """A distinct, deterministic camera-like photo: smooth colour gradients, a dozen shapes of
    varied size and colour, and per-pixel noise (a 4000×3000 JPEG comes out at ~3 MB).

    ``orientation`` (EXIF 1–8) is written into the file's EXIF, as phones do instead of turning
    the pixels: 6 means "turn 90° clockwise to view".
    """
    from PIL import ImageDraw

    rng = np.random.default_rng(10_000 + seed)
    width, height = size
    corners = rng.integers(0, 256, size=(3, 4, 3), dtype=np.uint8)
    image = Image.fromarray(corners).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    short = min(size)
    for _ in range(12):
        w, h = (int(v) for v in rng.integers(short // 20, short // 2, size=2))
        x, y = int(rng.integers(-w // 2, width - w // 2)), int(rng.integers(-h // 2, height - h // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        shape = (x, y, x + w, y + h)
        if rng.random() < 0.5:
            draw.ellipse(shape, fill=colour)
        else:
            draw.rectangle(shape, fill=colour)
    tile = _noise_tile()
    reps = (-(-height // tile.shape[0]) + 1, -(-width // tile.shape[1]) + 1, 1)
    dy, dx = (int(v) for v in rng.integers(0, tile.shape[0], size=2))
    noise = np.tile(tile, reps)[dy : dy + height, dx : dx + width]
    pixels = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    out = Image.fromarray(pixels)
    buffer = io.BytesIO()
    options: dict[str, object] = {"quality": quality} if fmt == "JPEG" else {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        options["exif"] = exif.tobytes()
    out.save(buffer, format=fmt, **options)
    return buffer.getvalue()
