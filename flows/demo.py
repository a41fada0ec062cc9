"""The main job: `detect_crop_classify` end to end on the bundled example images.

Run it with ``bash scripts/demo.sh`` (which starts a local inference server first), or point it
at any server: ``INFERENCE_SERVER_URL=http://host:9001 python -m prefect_roboflow.flows.demo [OUT_DIR]``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

from prefect_roboflow.flows import detect_crop_classify, search_images

EXAMPLES_DIR = Path(__file__).parent / "_examples"


def example_spec() -> tuple[list[dict[str, Any]], list[str]]:
    """The bundled reference examples (one box per class, as flow parameters) and label prompts."""
    spec = json.loads((EXAMPLES_DIR / "examples.json").read_text())
    examples = [{"image": str(EXAMPLES_DIR / e["image"]), "boxes": e["boxes"]} for e in spec["examples"]]
    return examples, list(spec["labels"])


def main(out_dir: str = "out/demo") -> None:
    """Detect, crop, embed and classify the example images; then search the result."""
    examples, labels = example_spec()
    state = detect_crop_classify(
        images=str(EXAMPLES_DIR), examples=examples, labels=labels, out_dir=out_dir, return_state=True
    )
    result = state.result()
    print(f"\nimages: {result.images}, objects found: {result.detections}, labels: {result.label_counts}")
    print(f"requests sent: {result.requests}, results from cache: {result.from_cache}")
    print(f"table:            {result.detections_path}")
    print(f"annotated images: {result.annotated_dir}")
    hits = search_images(query=labels[0], embeddings_path=result.detections_path, top_k=3)
    print(f"search {labels[0]!r}: " + ", ".join(f"{Path(h.image_ref).name}#{h.detection_index}" for h in hits.hits))
    run_id = state.state_details.flow_run_id
    if PREFECT_API_URL.value():
        print(f"flow run in the Prefect UI: {PREFECT_UI_URL.value()}/runs/flow-run/{run_id}")
    else:
        print(
            "this ran on a temporary Prefect server; to keep runs and see them in the UI, start one with\n"
            "  prefect server start --host 127.0.0.1   and   export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    print("placeholder weights give real shapes and code paths, but meaningless labels and scores")


if __name__ == "__main__":
    main(*sys.argv[1:2])
