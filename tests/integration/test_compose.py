"""The README's "Compose your own flow" example, run exactly as written, against the real server.

Also the public steps' contracts a composed flow relies on: records and failures travel through
every step, task runs are named per step and batch, and a rerun sends nothing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from prefect import flow
from support.cache import cached_entries
from support.fault_proxy import FaultProxy
from support.images import make_scene
from support.videos import make_video

from prefect_roboflow.blocks import Clip, InferenceServer, InvalidInputError, OwlV2, PerceptionEncoder
from prefect_roboflow.flows import embed_images
from prefect_roboflow.flows.demo import example_spec
from prefect_roboflow.flows.steps import (
    Batch,
    classify,
    crop,
    detect,
    embed,
    embed_labels,
    reference_examples,
)

pytestmark = pytest.mark.server

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_example() -> str:
    """The python block between the compose-example markers of the README."""
    text = README.read_text()
    section = text.split("<!-- compose-example:start -->", 1)[1].split("<!-- compose-example:end -->", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README's compose example has no python block"
    return match.group(1)


@pytest.fixture()
def scenes(tmp_path: Path) -> list[str]:
    folder = tmp_path / "scenes"
    folder.mkdir()
    for i in range(8):  # PE takes ~0.7 s per crop on these shared CPUs: a few scenes, a few dozen crops
        (folder / f"scene_{i:02d}.png").write_bytes(make_scene(500 + i))
    (folder / "zz_empty.png").write_bytes(b"")
    return sorted(str(p) for p in folder.iterdir())


def test_the_readme_example_runs_as_written_and_reruns_from_the_cache(
    proxy: FaultProxy, inference_url: str, scenes: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    exec(compile(readme_example(), str(README), "exec"), namespace)
    find_and_embed = namespace["find_and_embed"]
    examples, _ = example_spec()
    monkeypatch.chdir(tmp_path)  # the example's default cache is the relative folder "cache/"
    out = tmp_path / "crops.jsonl"

    counts = find_and_embed(scenes, examples, str(out), server_url=proxy.url)

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    direct = OwlV2(server=InferenceServer(api_url=inference_url)).detect_batch(
        scenes[:-1], reference_examples(examples), confidence=0.99
    )
    assert len(rows) == sum(len(d) for d in direct) == counts["crops"] + counts["failed"] > 0
    assert all(len(r["embedding"]) == 1024 for r in rows if "embedding" in r)
    assert counts["images_without_objects"] == sum(1 for d in direct if not len(d)) + 1  # + the empty file
    assert proxy.count("/owlv2/infer") == len(scenes) - 1  # the empty file is never sent
    assert cached_entries(tmp_path / "cache") > 0  # a relative cache folder, not a block slug

    proxy.clear()
    again = find_and_embed(scenes, examples, str(out), server_url=proxy.url)
    assert proxy.count() == 0 and again == counts
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows


def test_steps_carry_failures_and_name_their_runs(proxy: FaultProxy, scenes: list[str], tmp_path: Path) -> None:
    server = InferenceServer(api_url=proxy.url)
    owl, clip = OwlV2(server=server), Clip(server=server)
    examples = reference_examples(example_spec()[0])
    cache = str(tmp_path / "cache")

    @flow
    def chain(refs: list[str]) -> tuple[Batch, Batch]:
        batch = Batch.of(refs, label="1/1")
        found = detect(owl, batch, examples, cache=cache)
        labels = embed_labels(clip, ["a box", "an apple"], cache=cache)
        return found, classify(embed(clip, crop(found), cache=cache), labels)

    found, labelled = chain([*scenes[:6], scenes[-1], str(tmp_path / "missing.png")])  # CLIP: fast enough for all

    assert [r.failure.step for r in found.failed] == ["read", "read"]
    assert found.failed[0].failure.reason == "image is empty (0 bytes)"
    assert labelled.parents[6:] == found.records[6:]  # failed images stay, as the crop batch's parents
    assert [r.step for r in labelled.reports] == ["detect", "crop", "embed", "classify"]
    assert labelled.reports[0].sent == 6 and labelled.reports[2].sent == len(labelled.ok)
    for parent, crops in labelled.by_parent():
        assert len(crops) == (len(parent.detections) if parent.ok else 0)
        assert all(c.crop.parent_sha256 == parent.sha256 and c.label.name in ("a box", "an apple") for c in crops)
        np.testing.assert_allclose([c.crop.xyxy for c in crops], parent.detections.xyxy.reshape(-1, 4) if crops else [])


def test_a_batch_of_a_video_is_its_sampled_frames_as_the_flows_take_them(
    proxy: FaultProxy, scenes: list[str], tmp_path: Path
) -> None:
    """`Batch.of(["clip.mp4"])` was one failed record ("not a recognised image format"). A 3 s video at
    10 fps sampled at 2 fps is frames 0, 5, ..., 25 at 0.0, 0.5, ..., 2.5 s (planted by the video's
    own rate), the same refs the embed_images flow writes for it; the public steps then embed them."""
    video = make_video(tmp_path / "clip.mp4", seconds=3.0, fps=10)
    batch = Batch.of([str(video), scenes[0]], video_fps=2.0)
    frames = [r for r in batch if r.frame_index is not None]
    assert [r.ref for r in frames] == [f"{video}#frame={i}" for i in range(0, 30, 5)]
    assert [r.frame_time_s for r in frames] == pytest.approx([i / 10 for i in range(0, 30, 5)])
    assert all(r.loaded and r.ok for r in frames) and batch.records[-1].ref == scenes[0]
    assert len(Batch.of([str(video)], video_fps=None)) == 30
    assert len(Batch.of([str(video)], video_sample="keyframes")) >= 1

    clip, cache = Clip(server=InferenceServer(api_url=proxy.url)), str(tmp_path / "cache")

    @flow
    def embed_frames() -> Batch:
        return embed(clip, batch, cache=cache)

    embedded = embed_frames()
    assert len(embedded.ok) == len(batch) and all(r.embedding.shape == (512,) for r in embedded)
    table = embed_images([str(video)], str(tmp_path / "out"), server=proxy.url, video_fps=2.0, cache_storage=cache)
    assert table.failed == 0
    assert sorted(pq.read_table(table.embeddings_path, columns=["image_ref"]).column(0).to_pylist()) == sorted(
        r.ref for r in frames
    )
    for mistake, field in (({"video_fps": 0}, "video_fps"), ({"video_sample": "every"}, "video_sample")):
        with pytest.raises(InvalidInputError) as raised:
            Batch.of([str(video)], **mistake)
        assert raised.value.field == field


def test_classify_refuses_labels_of_another_dimension(inference_url: str, scenes: list[str], tmp_path: Path) -> None:
    server = InferenceServer(api_url=inference_url)
    cache = str(tmp_path / "cache")

    @flow
    def mismatch() -> Batch:
        labels = embed_labels(PerceptionEncoder(server=server), ["a box"], cache=cache)  # 1024-d
        return classify(embed(Clip(server=server), Batch.of(scenes[:2]), cache=cache), labels)  # 512-d

    with pytest.raises(Exception, match="labels"):
        mismatch()
