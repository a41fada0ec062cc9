"""Every flow writes its outputs into a bucket (moto's S3 server on loopback): ``out_dir`` as a plain
``s3://`` URL and as a saved prefect-aws ``S3Bucket`` block. Tables read straight from the bucket by
pandas, pyarrow and duckdb; annotated images, the gallery and the COCO/YOLO datasets load back; a bad
``out_dir`` is refused before any request; a crash leaves the previous objects; no secret leaks."""

from __future__ import annotations

import asyncio
import io
import logging
import secrets
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import supervision as sv
from PIL import Image
from prefect.client.orchestration import get_client
from support.fault_proxy import FaultProxy
from support.images import make_scene
from support.s3 import ACCESS_KEY, MotoBucket, s3, s3_server, saved_bucket_block  # noqa: F401

from prefect_roboflow.blocks import InvalidInputError
from prefect_roboflow.flows import (
    _storage,
    auto_label,
    classify_images,
    detect_crop_classify,
    embed_images,
    find_duplicates,
)
from prefect_roboflow.flows._storage import locate as _locate
from prefect_roboflow.flows._storage import stores as _stores
from prefect_roboflow.flows.demo import example_spec

pytestmark = pytest.mark.server

CLASSES = {"box": ["a photo of a cardboard box", "a photo of a box"], "apple": "a photo of an apple"}
LABELS = ["a photo of a box", "a photo of an apple"]


def _upload(s3: MotoBucket) -> list[str]:  # noqa: F811
    """Five scenes (objects to detect) under photos/; their keys in listing order."""
    images = {f"photos/scene_{i}.png": make_scene(800 + i) for i in range(5)}
    s3.put_many(images.items())
    return sorted(images)


def _block(s3: MotoBucket, secret: str, folder: str = "") -> str:  # noqa: F811
    """A saved S3Bucket block that carries its own credentials and endpoint; its name."""
    return str(saved_bucket_block(s3.endpoint, s3.bucket, folder=folder, secret=secret)._block_document_name)


def _table(s3: MotoBucket, key: str) -> pd.DataFrame:  # noqa: F811
    return pq.read_table(io.BytesIO(s3.get(key))).to_pandas()


def _download(s3: MotoBucket, prefix: str, to: Path) -> Path:  # noqa: F811
    for key in s3.keys(prefix):
        target = to / key[len(prefix) :]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(s3.get(key))
    return to


async def _artifacts_text() -> str:
    async with get_client() as client:
        return "\n".join(a.model_dump_json() for a in await client.read_artifacts(limit=200))


def _run_every_flow(images: str, out: str, proxy: FaultProxy, cache: str, local: Path) -> dict[str, Any]:
    examples, _ = example_spec()
    kwargs: dict[str, Any] = {"server": proxy.url, "cache_storage": cache}
    embedded = embed_images(images, out, **kwargs)
    pq.write_table(pq.read_table(io.BytesIO(_storage.read_bytes(embedded.embeddings_path))), local / "emb.parquet")
    return {
        "embed": embedded,
        "classify": classify_images(images, LABELS, out, **kwargs),
        "detect": detect_crop_classify(images, examples, LABELS, out, **kwargs),
        "label": auto_label(images, examples, CLASSES, out, min_probability=0.0, **kwargs),
        "duplicates": find_duplicates(str(local / "emb.parquet"), out, threshold=0.99999),
    }


def _boxes(boxes: Any) -> np.ndarray:
    return np.array(sorted(tuple(float(v) for v in box) for box in boxes)).reshape(-1, 4)


def _check_outputs(
    s3: MotoBucket,  # noqa: F811
    prefix: str,
    shown: str,
    refs: list[str],
    results: dict[str, Any],
    tmp: Path,
) -> None:
    """Every output is in the bucket under the key ``prefix``, whole and readable; results name ``shown``."""
    embedded = _table(s3, f"{prefix}embeddings.parquet")
    assert embedded["image_ref"].tolist() == refs and (embedded["status"] == "ok").all()
    assert results["embed"].embeddings_path == f"{shown}embeddings.parquet"
    classified = _table(s3, f"{prefix}classifications.parquet")
    assert classified["label"].isin(LABELS).all() and len(classified) == len(refs)
    assert results["classify"].classifications_path == f"{shown}classifications.parquet"

    # detect_crop_classify: its table, and one annotated JPEG per image with detections
    detected = _table(s3, f"{prefix}detections.parquet")
    assert set(detected["image_ref"]) == set(refs) and (detected["status"] == "ok").sum() > 0
    annotated = s3.keys(f"{prefix}annotated/")
    with_boxes = detected[detected["status"] == "ok"].drop_duplicates("image_ref")
    pairs = zip(with_boxes["image_ref"], with_boxes["image_sha256"], strict=True)
    expected = {f"{Path(ref).stem}-{sha[:10]}.jpg" for ref, sha in pairs}
    assert {k.rsplit("/", 1)[1] for k in annotated} == expected
    with Image.open(io.BytesIO(s3.get(annotated[0]))) as image:
        assert image.format == "JPEG" and image.size == (320, 240)
    assert results["detect"].annotated_dir == f"{shown}annotated"

    # auto_label: the tables, COCO and YOLO loaded back with supervision, the gallery
    labels = _table(s3, f"{prefix}labels.parquet")
    kept = labels[labels["status"] == "labelled"]
    assert len(kept) == results["label"].labelled > 0
    assert _table(s3, f"{prefix}review.parquet").empty  # min_probability 0: nothing for review
    local = _download(s3, prefix, tmp)
    coco = sv.DetectionDataset.from_coco(str(local / "coco/images"), str(local / "coco/annotations.json"))
    yolo = sv.DetectionDataset.from_yolo(
        str(local / "yolo/images"), str(local / "yolo/labels"), str(local / "yolo/data.yaml")
    )
    for dataset, atol in ((coco, 1e-3), (yolo, 320 * 1e-5)):  # YOLO keeps 5 decimals of normalised coordinates
        assert dataset.classes == list(CLASSES) and len(dataset) == len(refs)
        found = np.concatenate([annotations.xyxy for _, _, annotations in dataset])
        np.testing.assert_allclose(_boxes(found), _boxes(kept["box_xyxy"]), atol=atol)
    assert results["label"].datasets == {"coco": f"{shown}coco", "yolo": f"{shown}yolo"}
    page = s3.get(f"{prefix}gallery/index.html").decode()
    thumbs = s3.keys(f"{prefix}gallery/thumbs/")
    assert thumbs and all(f'src="thumbs/{k.rsplit("/", 1)[1]}"' in page for k in thumbs)
    assert results["label"].gallery_path == f"{shown}gallery/index.html"

    duplicates = _table(s3, f"{prefix}duplicates.parquet")
    assert list(duplicates.columns)[:4] == ["group", "group_kind", "representative", "member"]
    assert results["duplicates"].duplicates_path == f"{shown}duplicates.parquet"


def test_every_flow_writes_into_a_bucket_by_url_and_by_block(
    s3: MotoBucket,  # noqa: F811
    proxy: FaultProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # given secret keys that moto accepts, in the environment and in saved blocks, and scenes in the bucket
    sentinel = f"SENTINEL{secrets.token_hex(8)}"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", sentinel)
    _locate._CLIENTS.clear()
    keys = _upload(s3)
    cache = str(tmp_path / "cache")
    caplog.set_level(logging.DEBUG)
    reads: Counter[str] = Counter()
    client = _locate._s3_client(None, "images")
    read = "before-parameter-build.s3.GetObject"
    client.meta.events.register(read, lambda params, **_: reads.update([params["Key"]]))

    # when every flow runs S3 → S3 with plain URLs
    by_url = _run_every_flow(f"{s3.url}photos/", f"{s3.url}runs/url/", proxy, cache, tmp_path)
    # then each image was read by the step that needed it, once per flow that needs its bytes
    # (embed, classify, detect_crop_classify, auto_label): no output writer read an input again
    assert {key: reads[key] for key in keys} == dict.fromkeys(keys, 4)
    refs = [f"{s3.url}{k}" for k in keys]
    _check_outputs(s3, "runs/url/", f"{s3.url}runs/url/", refs, by_url, tmp_path / "url")
    # a table in the bucket feeds a vector index (pyarrow reads it with the same AWS configuration)
    indexed = embed_images(
        f"{s3.url}photos/",
        f"{s3.url}runs/url/",
        server=proxy.url,
        cache_storage=cache,
        index_path=str(tmp_path / "index"),
    )
    assert indexed.indexed == len(keys) and indexed.requests == 0

    # and through saved S3Bucket blocks (images and out_dir), with no AWS configuration in the environment
    out_block, photos_block = _block(s3, sentinel + "block", "runs"), _block(s3, sentinel + "block", "photos")
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    proxy.clear()
    images, out = f"block://s3-bucket/{photos_block}/", f"block://s3-bucket/{out_block}/blk/"
    by_block = _run_every_flow(images, out, proxy, cache, tmp_path)
    assert proxy.count() == 0  # everything came from the content cache
    block_refs = [f"{images}{k.removeprefix('photos/')}" for k in keys]
    _check_outputs(s3, "runs/blk/", out, block_refs, by_block, tmp_path / "blk")
    url_rows = _table(s3, "runs/url/labels.parquet").drop(columns=["image_ref"])
    pd.testing.assert_frame_equal(url_rows, _table(s3, "runs/blk/labels.parquet").drop(columns=["image_ref"]))

    # the tables read straight from the bucket by pandas (s3fs), pyarrow and duckdb
    for name, value in _aws(s3, sentinel).items():
        monkeypatch.setenv(name, value)
    _read_with_every_reader(f"{s3.url}runs/url/embeddings.parquet", len(keys))

    # and the summaries show the bucket locations, the secrets show nowhere: logs, results, artifacts
    artifacts = asyncio.run(_artifacts_text())
    assert f"{s3.url}runs/url/" in artifacts and out in artifacts
    seen = [caplog.text, artifacts, *(r.model_dump_json() for r in [*by_url.values(), *by_block.values()])]
    assert caplog.records and not [text for text in seen if sentinel in text]


def _aws(s3: MotoBucket, secret: str) -> dict[str, str]:  # noqa: F811
    return {"AWS_ENDPOINT_URL": s3.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": secret}


def _read_with_every_reader(url: str, rows: int) -> None:
    import duckdb
    import fsspec

    frame = pd.read_parquet(url)
    assert len(frame) == rows and frame["embedding"].map(len).nunique() == 1
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    table = pq.read_table(url.removeprefix("s3://"), filesystem=fs)
    assert table.num_rows == rows
    connection = duckdb.connect()
    connection.register_filesystem(fs)  # duckdb's own httpfs may not be installable offline
    assert connection.sql(f"select count(*) from read_parquet('{url}') where status = 'ok'").fetchall() == [(rows,)]


@pytest.mark.parametrize(
    ("out_dir", "reason"),
    [
        ("s3://no-such-bucket-{token}/run/", "bucket 'no-such-bucket-{token}' does not exist"),
        ("s3://AKIA:hunter2@{bucket}/run/", "credentials in a s3:// URL are not accepted"),
        ("foo://{bucket}/run/", "unknown URL scheme 'foo'"),
        ("gs://{bucket}/run/", "gs:// is not available here"),
        ("https://example.invalid/run/", "https:// URLs cannot be written to"),
        ("block://s3-bucket/no-such-block-{token}/run/", "no saved block s3-bucket/no-such-block-{token}"),
        ("{tmp}/taken", "{tmp}/taken exists and is not a folder"),
        ("missing-credentials", "cannot write s3://{bucket}/run/: no AWS credentials found"),
    ],
)
def test_a_bad_out_dir_is_refused_before_any_request(
    s3: MotoBucket,  # noqa: F811
    proxy: FaultProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    out_dir: str,
    reason: str,
) -> None:
    s3.put("photos/a.png", make_scene(1))
    (tmp_path / "taken").write_bytes(b"a file")
    token = secrets.token_hex(3)
    if out_dir == "missing-credentials":
        out_dir = "s3://{bucket}/run/"
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")

    def fill(text: str) -> str:
        return text.format(bucket=s3.bucket, token=token, tmp=tmp_path)

    examples, _ = example_spec()
    images, kwargs = str(tmp_path / "taken"), {"server": proxy.url}  # images are checked after out_dir
    calls = [
        lambda out: embed_images(images, out, **kwargs),
        lambda out: classify_images(images, LABELS, out, **kwargs),
        lambda out: detect_crop_classify(images, examples, LABELS, out, **kwargs),
        lambda out: auto_label(images, examples, CLASSES, out, **kwargs),
        lambda out: find_duplicates(images, out),
    ]
    for call in calls:
        with pytest.raises(InvalidInputError) as caught:
            call(fill(out_dir))
        assert caught.value.field == "out_dir"
        assert caught.value.reason.startswith(fill(reason)), caught.value.reason
        assert "hunter2" not in str(caught.value)
    assert proxy.count() == 0


def _objects(s3: MotoBucket, prefix: str) -> dict[str, bytes]:  # noqa: F811
    return {key: s3.get(key) for key in s3.keys(prefix)}


def test_a_run_that_crashes_midway_leaves_the_previous_objects(
    s3: MotoBucket,  # noqa: F811
    proxy: FaultProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # given a finished detect_crop_classify run in the bucket
    keys = _upload(s3)
    examples, _ = example_spec()
    out, kwargs = f"{s3.url}run/", {"server": proxy.url, "cache_storage": str(tmp_path / "cache"), "batch_size": 2}
    detect_crop_classify(f"{s3.url}photos/", examples, LABELS, out, **kwargs)
    before = _objects(s3, "run/")
    assert "run/detections.parquet" in before and len(before) > 2

    # when a rerun over fewer images dies after its first batch
    from prefect_roboflow.flows._outputs.annotated import AnnotatedImageSink

    original, calls = AnnotatedImageSink.draw, []

    def crash_on_second_batch(self: AnnotatedImageSink, batch: Any) -> None:
        calls.append(batch)
        if len(calls) == 2:
            raise RuntimeError("the flow process crashed")
        original(self, batch)

    monkeypatch.setattr(AnnotatedImageSink, "draw", crash_on_second_batch)  # on its worker thread
    with pytest.raises(RuntimeError, match="crashed"):
        detect_crop_classify([f"{s3.url}{k}" for k in keys[:4]], examples, LABELS, out, **kwargs)
    # then every object is the previous one, whole: the table still has all five images
    assert _objects(s3, "run/") == before
    assert _table(s3, "run/detections.parquet")["image_ref"].nunique() == 5


def test_auto_label_publishes_each_dataset_index_last(
    s3: MotoBucket,  # noqa: F811
    proxy: FaultProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # given an auto_label dataset of five images in the bucket
    keys = _upload(s3)
    examples, _ = example_spec()
    kwargs = {"server": proxy.url, "cache_storage": str(tmp_path / "cache"), "min_probability": 0.0}
    out = f"{s3.url}run/"
    auto_label(f"{s3.url}photos/", examples, CLASSES, out, **kwargs)
    old_coco = _objects(s3, "run/coco/")

    # when a rerun over three of them dies while publishing the COCO index
    upload = _stores.S3Store.upload

    def crash_on_index(self: Any, rel: str, file: Any) -> None:
        if rel.endswith("coco/annotations.json"):
            raise RuntimeError("crashed while publishing")
        upload(self, rel, file)

    monkeypatch.setattr(_stores.S3Store, "upload", crash_on_index)
    fewer = [f"{s3.url}{k}" for k in keys[:3]]
    with pytest.raises(RuntimeError, match="crashed"):
        auto_label(fewer, examples, CLASSES, out, **kwargs)
    # then the old index is in place, and every image it names is still there: the old dataset loads whole
    assert s3.get("run/coco/annotations.json") == old_coco["run/coco/annotations.json"]
    local = _download(s3, "run/coco/", tmp_path / "crashed")
    assert len(sv.DetectionDataset.from_coco(str(local / "images"), str(local / "annotations.json"))) == 5

    # and a finished rerun replaces the index and removes the images it no longer names
    monkeypatch.setattr(_stores.S3Store, "upload", upload)
    auto_label(fewer, examples, CLASSES, out, **kwargs)
    for fmt in ("coco", "yolo"):
        assert len(s3.keys(f"run/{fmt}/images/")) == 3
    local = _download(s3, "run/", tmp_path / "rerun")
    assert len(sv.DetectionDataset.from_coco(str(local / "coco/images"), str(local / "coco/annotations.json"))) == 3
    yolo = sv.DetectionDataset.from_yolo(
        str(local / "yolo/images"), str(local / "yolo/labels"), str(local / "yolo/data.yaml")
    )
    assert len(yolo) == 3 and len(s3.keys("run/yolo/labels/")) <= 3
