"""The per-endpoint Prefect tasks, run inside flows on the test harness against the real server."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import supervision as sv
from prefect import flow
from support.images import make_image
from support.runs import task_runs_of

from prefect_roboflow.blocks import Box, Clip, InferenceServer, OwlV2, PerceptionEncoder, ReferenceExample
from prefect_roboflow.blocks.tasks import compare, detect, embed_images, embed_texts

pytestmark = pytest.mark.server


async def test_every_task_in_one_flow(server: InferenceServer, image_paths: list[Path]) -> None:
    clip, pe, owl = Clip(server=server), PerceptionEncoder(server=server), OwlV2(server=server)
    images = [str(p) for p in image_paths[:12]]
    examples = [ReferenceExample(image=make_image(100), boxes=[Box(x=160, y=120, w=80, h=80, cls="thing")])]
    prompts = ["a red square", "a blue circle", "a green field"]

    @flow
    def pipeline() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[sv.Detections], object]:
        from prefect.runtime import flow_run

        return (
            embed_images(clip, images),
            embed_images(pe, images),
            embed_texts(clip, prompts),
            compare(pe, images[0], prompts),
            detect(owl, images[:4], examples, confidence=0.5),
            flow_run.id,
        )

    clip_vectors, pe_vectors, texts, similarities, detections, run_id = pipeline()
    assert clip_vectors.shape == (12, 512) and pe_vectors.shape == (12, 1024)
    np.testing.assert_array_equal(clip_vectors, clip.embed_images(images, _sync=True))
    assert texts.shape == (3, 512) and similarities.shape == (3,)
    np.testing.assert_allclose(similarities, pe.compare(images[0], prompts, _sync=True), atol=1e-5)
    assert len(detections) == 4 and all(isinstance(d, sv.Detections) for d in detections)
    names = sorted(r.name for r in await task_runs_of(run_id, 5))
    assert names == sorted(
        [
            "embed_images[clip ViT-B-16] 12 images",
            "embed_images[perception_encoder PE-Core-L14-336] 12 images",
            "embed_texts[clip ViT-B-16] 3 texts",
            "compare[perception_encoder PE-Core-L14-336] 3 prompts",
            "detect[owlv2 owlv2-large-patch14-ensemble] 4 images",
        ]
    )


async def test_task_fails_fast_on_bad_input_without_retrying(server: InferenceServer) -> None:
    @flow
    def bad() -> object:
        return embed_texts(Clip(server=server), ["word " * 90], return_state=True)

    state = bad(return_state=True)
    assert state.is_failed()
    runs = await task_runs_of(state.state_details.flow_run_id, 1)
    assert len(runs) == 1
    assert runs[0].state is not None and runs[0].state.is_failed()
    assert "CLIP takes at most 75" in str(runs[0].state.message)
    assert runs[0].run_count == 1  # an input error is not retried
