"""Generate the demo's bundled example images (deterministic; re-run to rebuild them).

Eight 320×240 "shelf" scenes, each holding a few 80×80 objects (round fruit and square boxes)
on a textured background, plus `examples.json` giving one reference box per class. Objects are
a quarter of the longer image side, the size the placeholder OWLv2 weights can match.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = (320, 240)
OBJECT = 80
OUT = Path(__file__).resolve().parents[1] / "flows" / "_examples"


def scene(seed: int) -> tuple[Image.Image, list[dict[str, object]]]:
    rng = np.random.default_rng(seed)
    noise = rng.integers(150, 200, size=(SIZE[1], SIZE[0], 1), dtype=np.uint8)
    image = Image.fromarray(np.repeat(noise, 3, axis=2))
    draw = ImageDraw.Draw(image)
    boxes: list[dict[str, object]] = []
    slots = [(40 + 80 * i, 60 + 120 * j) for j in range(2) for i in range(4)]
    for index in rng.permutation(len(slots))[: int(rng.integers(3, 6))]:
        cx, cy = slots[int(index)]
        cls = "fruit" if rng.random() < 0.5 else "box"
        half = OBJECT // 2 - 4
        shape = (cx - half, cy - half, cx + half, cy + half)
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if cls == "fruit":
            draw.ellipse(shape, fill=colour, outline=(20, 20, 20), width=3)
        else:
            draw.rectangle(shape, fill=colour, outline=(20, 20, 20), width=3)
        boxes.append({"x": cx, "y": cy, "w": OBJECT, "h": OBJECT, "cls": cls})
    return image, boxes


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    references: dict[str, dict[str, object]] = {}
    for seed in range(8):
        image, boxes = scene(seed)
        name = f"shelf_{seed}.png"
        image.save(OUT / name, optimize=True)
        for box in boxes:
            references.setdefault(str(box["cls"]), {"image": name, "box": box})
    examples = [{"image": ref["image"], "boxes": [ref["box"]]} for _, ref in sorted(references.items())]
    (OUT / "examples.json").write_text(json.dumps({"examples": examples, "labels": LABELS}, indent=2) + "\n")
    print(f"wrote 8 images and examples.json to {OUT}", file=sys.stderr)


LABELS = ["a photo of an apple", "a photo of an orange", "a photo of a cardboard box", "a photo of a tin can"]

if __name__ == "__main__":
    main()
