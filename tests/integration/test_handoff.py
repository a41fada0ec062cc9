"""`auto_label`'s hand-off to annotation tools, against the real server: the Label Studio tasks
checked against Label Studio's documented predictions schema (label-studio-sdk would downgrade
numpy and OpenCV here, so it is not a test dependency), and the CVAT COCO 1.0 zip loaded back
with supervision's COCO parser; both carry the COCO export's boxes to within 1 px."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import supervision as sv
from support.fault_proxy import FaultProxy
from support.images import make_scene

from prefect_roboflow.flows import auto_label
from prefect_roboflow.flows.demo import example_spec

pytestmark = pytest.mark.server

CLASSES = {"box": ["a photo of a cardboard box", "a photo of a box"], "apple": "a photo of an apple"}
PREFIX = "s3://review-bucket/run-7/label_studio/images/"


def _coco_boxes(annotations: dict[str, Any]) -> dict[str, list[tuple[str, list[float]]]]:
    """File name → (class, [x, y, w, h]) per annotation, from a COCO file."""
    names = {c["id"]: c["name"] for c in annotations["categories"]}
    files = {i["id"]: i["file_name"] for i in annotations["images"]}
    boxes: dict[str, list[tuple[str, list[float]]]] = {name: [] for name in files.values()}
    for a in annotations["annotations"]:
        boxes[files[a["image_id"]]].append((names[a["category_id"]], a["bbox"]))
    return boxes


def _check_task_schema(task: dict[str, Any], model_version: str) -> None:
    """The fields Label Studio's predictions import requires, with their documented types and ranges."""
    assert set(task) == {"data", "predictions"} and isinstance(task["data"]["image"], str)
    (prediction,) = task["predictions"]
    assert prediction["model_version"] == model_version and 0.0 <= prediction["score"] <= 1.0
    for region in prediction["result"]:
        assert (region["from_name"], region["to_name"], region["type"]) == ("label", "image", "rectanglelabels")
        assert isinstance(region["id"], str) and region["image_rotation"] == 0
        assert region["original_width"] == 320 and region["original_height"] == 240
        value = region["value"]
        assert value["rotation"] == 0 and len(value["rectanglelabels"]) == 1 and value["rectanglelabels"][0] in CLASSES
        assert 0 <= value["x"] <= value["x"] + value["width"] <= 100 + 1e-6
        assert 0 <= value["y"] <= value["y"] + value["height"] <= 100 + 1e-6
        assert 0.0 <= region["score"] <= 1.0


def test_label_studio_and_cvat_handoff_match_the_coco_export(proxy: FaultProxy, tmp_path: Path) -> None:
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    for i in range(8):
        (scenes / f"scene_{i:02d}.png").write_bytes(make_scene(700 + i))
    examples, _ = example_spec()
    kwargs: dict[str, Any] = {"server": proxy.url, "cache_storage": str(tmp_path / "cache"), "min_probability": 0.0}
    out = tmp_path / "out"
    result = auto_label(
        str(scenes),
        examples,
        CLASSES,
        str(out),
        formats=["coco", "label_studio", "cvat"],
        image_prefix=PREFIX,
        **kwargs,
    )
    assert set(result.datasets) == {"coco", "label_studio", "cvat"} and result.labelled > 0
    coco = _coco_boxes(json.loads((out / "coco" / "annotations.json").read_text()))

    # Label Studio: one task per image, named by the prefix; boxes in percent back to pixels
    tasks = json.loads((out / "label_studio" / "tasks.json").read_text())
    model_version = tasks[0]["predictions"][0]["model_version"]
    assert "owlv2" in model_version.lower() and "clip" in model_version.lower()
    assert sorted(t["data"]["image"] for t in tasks) == sorted(PREFIX + name for name in coco)
    assert sorted(p.name for p in (out / "label_studio" / "images").iterdir()) == sorted(coco)
    for task in tasks:
        _check_task_schema(task, model_version)
        expected = coco[task["data"]["image"][len(PREFIX) :]]
        regions = task["predictions"][0]["result"]
        assert [r["value"]["rectanglelabels"][0] for r in regions] == [name for name, _ in expected]
        pixels = [
            [r["value"]["x"] * 3.2, r["value"]["y"] * 2.4, r["value"]["width"] * 3.2, r["value"]["height"] * 2.4]
            for r in regions
        ]
        np.testing.assert_allclose(
            np.array(pixels).reshape(-1, 4), np.array([b for _, b in expected]).reshape(-1, 4), atol=1.0
        )

    # CVAT: the COCO 1.0 zip layout, loaded back with supervision's COCO parser
    with zipfile.ZipFile(out / "cvat" / "coco-1.0.zip") as archive:
        names = archive.namelist()
        assert "annotations/instances_default.json" in names
        assert sorted(n[len("images/") :] for n in names if n.startswith("images/")) == sorted(coco)
        archive.extractall(tmp_path / "cvat")
    loaded = sv.DetectionDataset.from_coco(
        str(tmp_path / "cvat" / "images"), str(tmp_path / "cvat" / "annotations" / "instances_default.json")
    )
    assert loaded.classes == list(CLASSES)
    for path, _, found in loaded:
        expected = coco[Path(path).name]
        xywh = [[x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1 in found.xyxy.tolist()]
        np.testing.assert_allclose(
            np.array(xywh).reshape(-1, 4), np.array([b for _, b in expected]).reshape(-1, 4), atol=1.0
        )
        assert [loaded.classes[c] for c in found.class_id] == [name for name, _ in expected]

    # without a prefix, a task names its image by the image's own reference (and no images are copied)
    plain = auto_label(str(scenes), examples, CLASSES, str(tmp_path / "plain"), formats=["label_studio"], **kwargs)
    plain_tasks = json.loads((Path(plain.datasets["label_studio"]) / "tasks.json").read_text())
    assert sorted(t["data"]["image"] for t in plain_tasks) == sorted(str(p) for p in scenes.iterdir())
    assert not (Path(plain.datasets["label_studio"]) / "images").exists()
