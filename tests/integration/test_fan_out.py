"""Fan-out pieces that need no work pool: a shard run of each batch flow on its own (its parts and
what it keeps for the parent), and the fan-out's bad input.

The whole fan-out (a deployment on a process pool with two workers, on PostgreSQL, S3 to S3) is
tested end to end in ``tests/e2e/test_scale_out_e2e.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from prefect.exceptions import ParameterTypeError
from support.fault_proxy import FaultProxy
from support.images import make_scene

from prefect_roboflow.blocks import InvalidInputError
from prefect_roboflow.flows import auto_label, classify_images, detect_crop_classify, embed_images
from prefect_roboflow.flows.demo import example_spec

pytestmark = pytest.mark.server


def test_a_shard_run_embeds_its_manifest_into_its_part(
    proxy: FaultProxy, image_paths: list[Path], tmp_path: Path
) -> None:
    # given a manifest of three images, as the parent run writes it
    manifest = tmp_path / "out" / "_shards" / "part-00002.json"
    manifest.parent.mkdir(parents=True)
    refs = [str(p) for p in image_paths[:3]]
    manifest.write_text(json.dumps(refs))
    shard = {"index": 2, "manifest": str(manifest), "attempt": 1}
    # when a run of the flow is given that shard, and as images its manifest (as the parent gives them:
    # a shard run's parameters do not hold the job's references)
    result = embed_images(
        str(manifest), str(tmp_path / "out"), server=proxy.url, cache_storage=str(tmp_path / "cache"), shard=shard
    )
    # then its part of the dataset folder holds exactly the manifest's images, and its counts are kept
    part = tmp_path / "out" / "embeddings" / "part-00002.parquet"
    assert result.embeddings_path == str(part)
    assert [r["image_ref"] for r in pq.read_table(part).to_pylist()] == refs
    saved = json.loads((tmp_path / "out" / "_shards" / "part-00002.result.json").read_text())["totals"]
    assert (saved["images"], saved["images_failed"], saved["statuses"]) == (3, 0, {"ok": 3})
    assert proxy.count("/clip/embed_image") >= 1


LABELS = ["a photo of an apple", "a photo of a box", "a photo of a bottle"]
CLASSES = {"box": ["a photo of a cardboard box", "a photo of a box"], "apple": "a photo of an apple"}


def _manifest(out: Path, index: int, refs: list[str]) -> dict[str, object]:
    """Shard ``index``'s manifest of ``refs``, written as the parent run writes it; the shard parameter."""
    manifest = out / "_shards" / f"part-{index:05d}.json"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps(refs))
    return {"index": index, "manifest": str(manifest), "attempt": 1}


def _saved(out: Path, index: int) -> dict[str, object]:
    return json.loads((out / "_shards" / f"part-{index:05d}.result.json").read_text())


@pytest.fixture()
def scenes(tmp_path: Path) -> list[str]:
    folder = tmp_path / "scenes"
    folder.mkdir()
    for i in range(8):
        (folder / f"scene_{i:02d}.png").write_bytes(make_scene(900 + i))
    (folder / "zz_empty.png").write_bytes(b"")
    return sorted(str(p) for p in folder.iterdir())


def test_a_classify_shard_writes_its_part_and_keeps_its_label_counts(
    proxy: FaultProxy, image_paths: list[Path], tmp_path: Path
) -> None:
    out, refs = tmp_path / "out", [str(p) for p in image_paths[:4]]
    shard = _manifest(out, 1, refs)
    # when a classify run is given a shard of four images
    result = classify_images(
        str(image_paths[6]), LABELS, str(out), server=proxy.url, cache_storage=str(tmp_path / "cache"), shard=shard
    )
    # then its part holds exactly them, and its saved totals hold the label counts its parent adds up
    part = out / "classifications" / "part-00001.parquet"
    rows = pq.read_table(part).to_pylist()
    assert result.classifications_path == str(part) and [r["image_ref"] for r in rows] == refs
    saved = _saved(out, 1)["totals"]
    assert saved["labels"] == result.label_counts and sum(result.label_counts.values()) == 4
    assert saved["labels"] == {label: sum(r["label"] == label for r in rows) for label in saved["labels"]}
    assert (saved["images"], saved["statuses"]) == (4, {"ok": 4})
    assert not (out / "classifications.parquet").exists()


def test_a_detect_crop_classify_shard_draws_its_images_and_writes_its_part(
    proxy: FaultProxy, scenes: list[str], tmp_path: Path
) -> None:
    examples, _ = example_spec()
    out, cache = tmp_path / "out", str(tmp_path / "cache")
    kwargs = {"server": proxy.url, "cache_storage": cache, "batch_size": 4}
    # given the whole job's rows from a plain run
    whole = detect_crop_classify(scenes, examples, LABELS, str(tmp_path / "whole"), **kwargs)
    expected = [r for r in pq.read_table(whole.detections_path).to_pylist() if r["image_ref"] in scenes[4:]]
    # when a shard of the last five images runs
    result = detect_crop_classify(scenes[0], examples, LABELS, str(out), shard=_manifest(out, 0, scenes[4:]), **kwargs)
    # then its part holds the same rows for those images, and it drew just those of them with detections
    part = out / "detections" / "part-00000.parquet"
    rows = pq.read_table(part).to_pylist()
    assert result.detections_path == str(part)
    assert [(r["image_ref"], r["detection_index"], r["label"]) for r in rows] == [
        (r["image_ref"], r["detection_index"], r["label"]) for r in expected
    ]
    drawn = {Path(r["image_ref"]).stem for r in rows if r["detection_index"] is not None}
    assert drawn and {p.name.rsplit("-", 1)[0] for p in (out / "annotated").iterdir()} == drawn
    saved = _saved(out, 0)["totals"]
    assert (saved["images"], saved["images_failed"]) == (result.images, result.images_failed) == (5, 1)
    assert saved["labels"] == result.label_counts and sum(saved["statuses"].values()) == len(rows)


def test_an_auto_label_shard_keeps_its_labelled_part_for_the_parent(
    proxy: FaultProxy, scenes: list[str], tmp_path: Path
) -> None:
    examples, _ = example_spec()
    out, cache = tmp_path / "out", str(tmp_path / "cache")
    kwargs: dict[str, object] = {"server": proxy.url, "cache_storage": cache, "batch_size": 4}
    probe = auto_label(scenes, examples, CLASSES, str(tmp_path / "probe"), min_probability=0.0, **kwargs)
    scores = [r["label_score"] for r in pq.read_table(probe.labels_path).to_pylist() if r["status"] == "labelled"]
    kwargs["min_probability"] = float(np.median(scores))  # about half the boxes kept, half left for review
    whole = auto_label(scenes, examples, CLASSES, str(tmp_path / "whole"), **kwargs)
    assert whole.labelled and whole.review, "the scenes give both kept and reviewed boxes: this checks both"
    # when a shard of every image runs
    result = auto_label(scenes[0], examples, CLASSES, str(out), shard=_manifest(out, 3, scenes), **kwargs)
    # then its labels and review parts are the plain run's tables, and it wrote no dataset (its parent does)
    for stem, path in (("labels", whole.labels_path), ("review", whole.review_path)):
        part = pq.read_table(out / stem / "part-00003.parquet").to_pylist()
        assert part == pq.read_table(path).to_pylist(), stem
    assert result.datasets == {} and not (out / "coco").exists() and not (out / "gallery" / "index.html").exists()
    # it kept each readable image with exactly the boxes its table labels, and its review items
    extra = _saved(out, 3)["extra"]
    labels = pq.read_table(whole.labels_path).to_pylist()
    assert [i["ref"] for i in extra["labelled"]] == scenes[:-1]  # the empty file failed
    for image in extra["labelled"]:
        kept = [r for r in labels if r["image_ref"] == image["ref"] and r["status"] == "labelled"]
        assert image["class_ids"] == [list(CLASSES).index(r["label"]) for r in kept]
        assert image["xyxy"] == [pytest.approx(r["box_xyxy"]) for r in kept]
    assert len(extra["review"]) == whole.review
    # and the thumbnails it names are in the gallery folder
    thumbs = {name for names in extra["thumbs"].values() for name in names}
    assert thumbs and all((out / "gallery" / name).is_file() for name in thumbs)


def _call(flow: str, images: str, out: str, **kwargs: object) -> object:
    examples, _ = example_spec()
    calls = {
        "embed_images": lambda: embed_images(images, out, **kwargs),
        "classify_images": lambda: classify_images(images, LABELS, out, **kwargs),
        "detect_crop_classify": lambda: detect_crop_classify(images, examples, LABELS, out, **kwargs),
        "auto_label": lambda: auto_label(images, examples, CLASSES, out, **kwargs),
    }
    return calls[flow]()


@pytest.mark.parametrize("flow", ["classify_images", "detect_crop_classify", "auto_label"])
def test_every_batch_flow_refuses_a_fan_out_with_no_deployment_before_any_request(
    flow: str, proxy: FaultProxy, image_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(InvalidInputError) as caught:
        _call(flow, str(image_dir), str(tmp_path / "out"), server=proxy.url, fan_out={"shard_size": 10})
    assert caught.value.field == "fan_out" and "run this flow from one" in caught.value.reason
    assert proxy.count() == 0
    assert not (tmp_path / "out" / "_shards").exists()


@pytest.mark.parametrize(
    ("fan_out", "reason"),
    [
        ({"shard_size": 10}, "run this flow from one"),
        ({"shard_size": 10, "deployment": "embed-images/no-such-deployment"}, "no deployment named"),
    ],
)
def test_a_fan_out_with_no_deployment_to_run_on_fails_before_any_request(
    fan_out: dict[str, object], reason: str, proxy: FaultProxy, image_dir: Path, tmp_path: Path
) -> None:
    # when a fan-out is asked of a run that has no deployment (a plain call), or names a missing one
    with pytest.raises(InvalidInputError) as caught:
        embed_images(str(image_dir), str(tmp_path / "out"), server=proxy.url, fan_out=fan_out)
    # then a typed error names the parameter, and nothing was listed into manifests or sent
    assert caught.value.field == "fan_out" and reason in caught.value.reason
    assert proxy.count() == 0
    assert not (tmp_path / "out" / "_shards").exists()


def test_a_shard_size_below_one_is_refused_before_the_run(proxy: FaultProxy, image_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ParameterTypeError, match="shard_size"):
        embed_images(str(image_dir), str(tmp_path / "out"), server=proxy.url, fan_out={"shard_size": 0})
    assert proxy.count() == 0
