"""The demo: every block once against a server, on the bundled example images.

Run it with ``bash scripts/demo.sh`` (which starts a local server first), or point it at any
server: ``INFERENCE_SERVER_URL=http://host:9001 python -m prefect_roboflow.flows.demo``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from prefect_roboflow.blocks import Box, Clip, InferenceServer, OwlV2, PerceptionEncoder, ReferenceExample

EXAMPLES_DIR = Path(__file__).parent / "_examples"


def example_images() -> list[Path]:
    """The bundled example images, sorted."""
    return sorted(EXAMPLES_DIR.glob("*.png"))


def example_references() -> tuple[list[ReferenceExample], list[str]]:
    """The bundled reference examples (one box per class) and label prompts."""
    spec = json.loads((EXAMPLES_DIR / "examples.json").read_text())
    examples = [
        ReferenceExample(image=EXAMPLES_DIR / e["image"], boxes=[Box(**b) for b in e["boxes"]]) for e in spec["examples"]
    ]
    return examples, list(spec["labels"])


def main() -> None:
    server = InferenceServer(api_url=os.environ.get("INFERENCE_SERVER_URL", "http://localhost:9001"))
    print(f"server: {server.api_url} {server.info()}")
    images = example_images()
    examples, labels = example_references()
    clip, pe, owl = Clip(server=server), PerceptionEncoder(server=server), OwlV2(server=server)
    print(f"CLIP {clip.version}: embed_images({len(images)}) -> {clip.embed_images(images).shape}")
    print(f"CLIP {clip.version}: embed_texts({len(labels)}) -> {clip.embed_texts(labels).shape}")
    print(f"CLIP compare {images[0].name}: {dict(zip(labels, clip.compare(images[0], labels).round(3).tolist()))}")
    print(f"PE {pe.version}: embed_images({len(images)}) -> {pe.embed_images(images).shape}")
    print(f"PE {pe.version}: embed_texts({len(labels)}) -> {pe.embed_texts(labels).shape}")
    print(f"PE compare {images[0].name}: {dict(zip(labels, pe.compare(images[0], labels).round(3).tolist()))}")
    for image, detections in zip(images[:3], owl.detect_batch(images[:3], examples, confidence=0.5)):
        found = [
            f"{name} {conf:.3f} @ {[round(float(v)) for v in box]}"
            for box, conf, name in zip(detections.xyxy, detections.confidence, detections.data["class_name"])
        ]
        print(f"OWLv2 {image.name}: {len(detections)} detection(s) {found[:4]}")
    print("placeholder weights give real shapes and code paths, but meaningless values and labels")


if __name__ == "__main__":
    main()
