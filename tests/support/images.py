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
