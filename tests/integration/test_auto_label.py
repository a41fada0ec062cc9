"""`auto_label` against the real server: the table, the review table, COCO and YOLO loaded back
with supervision, the gallery in headless Chromium, and bad input refused before any request."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import supervision as sv
from PIL import Image
from support.fault_proxy import FaultProxy
from support.images import make_scene
from support.runs import logs_of, summary_of

from prefect_roboflow.blocks import Clip, InferenceServer, InvalidInputError
from prefect_roboflow.flows import auto_label
from prefect_roboflow.flows.auto_label import class_prompts, ensemble
from prefect_roboflow.flows.demo import example_spec
from prefect_roboflow.flows.records import LabelSet

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from _browser import Chromium

pytestmark = pytest.mark.server

CLASSES = {"box": ["a photo of a cardboard box", "a photo of a box"], "apple": "a photo of an apple"}


@pytest.fixture()
def scenes(tmp_path: Path) -> Path:
    folder = tmp_path / "scenes"
    folder.mkdir()
    for i in range(16):
        (folder / f"scene_{i:02d}.png").write_bytes(make_scene(700 + i))
    (folder / "zz_empty.png").write_bytes(b"")
    return folder


def _exported_name(row: dict[str, Any]) -> str:
    return f"{Path(row['image_ref']).stem}-{row['image_sha256'][:10]}{Path(row['image_ref']).suffix}"


def _loaded(dataset: sv.DetectionDataset) -> dict[str, sv.Detections]:
    return {Path(path).name: annotations for path, _, annotations in dataset}


def test_auto_label_writes_a_dataset_that_loads_back(proxy: FaultProxy, scenes: Path, tmp_path: Path) -> None:
    out, cache = tmp_path / "out", str(tmp_path / "cache")
    kwargs: dict[str, Any] = {"server": proxy.url, "cache_storage": cache, "batch_size": 8}
    examples, _ = example_spec()
    probe = auto_label(str(scenes), examples, CLASSES, str(tmp_path / "probe"), min_probability=0.0, **kwargs)
    scores = sorted(r["label_score"] for r in pq.read_table(probe.labels_path).to_pylist() if r["status"] == "labelled")
    assert probe.labelled == len(scores) > 4 and probe.review == 0
    threshold = float(np.median(scores))  # half the detections kept, half left for review

    proxy.clear()
    result = auto_label(str(scenes), examples, CLASSES, str(out), min_probability=threshold, **kwargs)
    assert proxy.count() == 0  # everything came from the content cache the probe run filled
    rows = pq.read_table(result.labels_path).to_pylist()
    kept = [r for r in rows if r["status"] == "labelled"]
    review = [r for r in rows if r["status"] == "review"]
    assert {Path(r["image_ref"]).name for r in rows} == {p.name for p in scenes.iterdir()}  # every image has a row
    assert all(r["label"] in CLASSES and r["label_score"] >= threshold for r in kept) and kept
    assert all(r["label"] is None and r["label_score"] < threshold for r in review) and review
    assert (result.labelled, result.review, result.failed) == (len(kept), len(review), 1)
    for row in kept + review:  # boxes clipped to the 320×240 scenes
        x1, y1, x2, y2 = row["box_xyxy"]
        assert 0 <= x1 <= x2 <= 320 and 0 <= y1 <= y2 <= 240
    guesses = pq.read_table(result.review_path).to_pylist()
    assert [(g["image_ref"], g["detection_index"]) for g in guesses] == [
        (r["image_ref"], r["detection_index"]) for r in review
    ]
    assert all(g["guesses"][0] in CLASSES and g["guess_scores"][0] < threshold for g in guesses)

    # COCO and YOLO load back with supervision: exactly the kept boxes and classes of the table
    coco = sv.DetectionDataset.from_coco(
        f"{result.datasets['coco']}/images", f"{result.datasets['coco']}/annotations.json"
    )
    yolo_dir = result.datasets["yolo"]
    yolo = sv.DetectionDataset.from_yolo(f"{yolo_dir}/images", f"{yolo_dir}/labels", f"{yolo_dir}/data.yaml")
    images = {_exported_name(r) for r in rows if r["status"] != "failed"}
    for dataset, atol in ((coco, 1e-3), (yolo, 320 * 1e-5)):  # YOLO keeps 5 decimals of normalised coordinates
        assert dataset.classes == list(CLASSES)
        loaded = _loaded(dataset)
        assert set(loaded) == images
        for name, found in loaded.items():
            expected = [r for r in kept if _exported_name(r) == name]
            np.testing.assert_allclose(
                found.xyxy, np.array([r["box_xyxy"] for r in expected]).reshape(-1, 4), atol=atol
            )
            assert [dataset.classes[c] for c in found.class_id] == [r["label"] for r in expected]

    # the review gallery, as a person sees it
    gallery = Path(result.gallery_path)
    page = gallery.read_text()
    assert all(f"{name} ({result.class_counts.get(name, 0)})" in page for name in CLASSES)
    assert f"left for review ({len(review)})" in page
    with Chromium(tmp_path / "chromium-profile", width=1200, height=900) as browser:
        browser.goto(gallery.as_uri())
        text = browser.wait_for_text(["auto_label review", "Detections per class", *CLASSES], 30)
        assert "Low confidence" in text
        shot = browser.screenshot(tmp_path / "gallery.png")
    with Image.open(shot) as image:
        assert image.size == (1200, 900) and len(image.convert("L").getcolors(1 << 16) or []) > 50


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"formats": ["coco", "voc"]}, "formats"),
        ({"formats": []}, "formats"),
        ({"min_score": 1.5}, "min_score"),
        ({"min_score": -1.1}, "min_score"),
        ({"min_probability": 1.5}, "min_probability"),
        ({"min_probability": -0.1}, "min_probability"),
        ({"classes": {}}, "classes"),
        ({"classes": []}, "classes"),
        ({"classes": {"box": []}}, "classes['box']"),
        ({"classes": {"box": ["a box", " "]}}, "classes['box']"),
        ({"classes": ["a box", "an apple", "a box"]}, "classes"),
    ],
)
def test_bad_input_is_refused_before_any_request(
    change: dict[str, Any], field: str, proxy: FaultProxy, scenes: Path, tmp_path: Path
) -> None:
    examples, _ = example_spec()
    arguments: dict[str, Any] = {
        "classes": CLASSES,
        "server": proxy.url,
        "cache_storage": str(tmp_path / "c"),
        **change,
    }
    with pytest.raises(InvalidInputError) as raised:
        auto_label(str(scenes), examples, out_dir=str(tmp_path / "out"), **arguments)
    assert raised.value.field == field
    assert proxy.count() == 0


def test_with_one_class_min_score_sends_the_boxes_least_like_it_to_review(
    proxy: FaultProxy, scenes: Path, tmp_path: Path, inference_url: str
) -> None:
    """One class: every softmax probability is 1.0, so only ``min_score`` (a cosine, as in the other
    flows) can leave a box for review; a run without it says so. The cosines are computed here, from
    the table's crop embeddings and the class prompts embedded by the block, not by the flow."""
    examples, _ = example_spec()
    one = {"box": CLASSES["box"]}
    kwargs: dict[str, Any] = {"server": proxy.url, "cache_storage": str(tmp_path / "cache"), "batch_size": 8}
    state = auto_label(str(scenes), examples, one, str(tmp_path / "plain"), return_state=True, **kwargs)
    plain = state.result()
    assert plain.review == 0 and plain.labelled > 4
    assert "min_score" in summary_of(state, "auto-label-summary").split("## Classes")[0]
    assert any("one class" in line and "min_score" in line for line in logs_of(state))

    rows = [r for r in pq.read_table(plain.labels_path).to_pylist() if r["status"] == "labelled"]
    clip = Clip(server=InferenceServer(api_url=inference_url))
    prompts = clip.embed_texts(one["box"])
    prompts /= np.linalg.norm(prompts, axis=1, keepdims=True)
    centre = prompts.mean(axis=0) / np.linalg.norm(prompts.mean(axis=0))  # the class's prompt ensemble
    crops = np.array([r["embedding"] for r in rows], dtype=np.float64)
    cosines = crops / np.linalg.norm(crops, axis=1, keepdims=True) @ centre
    threshold = float(np.median(cosines))
    by_box = {(r["image_ref"], r["detection_index"]): c for r, c in zip(rows, cosines, strict=True)}

    result = auto_label(str(scenes), examples, one, str(tmp_path / "out"), min_score=threshold, **kwargs)
    after = [r for r in pq.read_table(result.labels_path).to_pylist() if r["status"] in {"labelled", "review"}]
    margin = 1e-4  # float32 embeddings: a box this close to the median may fall either side
    for row in after:
        cosine = by_box[(row["image_ref"], row["detection_index"])]
        if abs(cosine - threshold) > margin:
            assert row["status"] == ("labelled" if cosine > threshold else "review"), (cosine, threshold)
    assert 0 < result.review < len(after) and result.labelled + result.review == len(after)


def test_a_prompt_ensemble_is_the_mean_of_its_unit_prompt_vectors() -> None:
    prompts = class_prompts({"cat": ["a cat", "a kitten"], "dog": "a dog"})
    assert prompts == {"cat": ["a cat", "a kitten"], "dog": ["a dog"]}
    assert class_prompts(["a cat", "a dog"]) == {"a cat": ["a cat"], "a dog": ["a dog"]}
    vectors = np.array([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 5.0]], dtype=np.float32)
    classes = ensemble(LabelSet("clip ViT-B-16", ("a cat", "a kitten", "a dog"), vectors), prompts)
    assert classes.names == ("cat", "dog") and classes.model == "clip ViT-B-16"
    np.testing.assert_allclose(classes.vectors, [[2**-0.5, 2**-0.5, 0], [0, 0, 1]], atol=1e-6)
