"""An embedding answer of the wrong size is an error for its items, never a result: checked
against the version's known size (contract §1.1, §2), or for an unknown version against the
first answer's. The server is the GPU stub (`benchmarks/gpu_stub.py`, its own process on
127.0.0.1), which answers vectors of any size asked."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from support.images import make_image

from prefect_roboflow.blocks import (
    CLIP_DIMENSIONS,
    Clip,
    InferenceResponseError,
    InferenceServer,
    PerceptionEncoder,
)

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.gpu_stub import StubServer  # noqa: E402


@pytest.fixture(scope="module")
def stub() -> Iterator[StubServer]:
    with StubServer() as server:
        yield server


@pytest.fixture()
def server(stub: StubServer) -> Iterator[InferenceServer]:
    stub.force_dim(None)
    yield InferenceServer(api_url=stub.url, max_retries=0)
    stub.force_dim(None)


IMAGES = [make_image(seed) for seed in range(3)]


def test_right_size_is_accepted(server: InferenceServer) -> None:
    assert Clip(server=server).embed_images(IMAGES).shape == (3, 512)
    assert PerceptionEncoder(server=server).embed_images(IMAGES).shape == (3, 1024)
    assert Clip(server=server, version="RN50").embed_texts(["a dog"]).shape == (1, CLIP_DIMENSIONS["RN50"])


def test_wrong_size_for_a_known_version_fails_every_item(stub: StubServer, server: InferenceServer) -> None:
    stub.force_dim(100)
    clip = Clip(server=server)  # ViT-B-16: 512
    outcomes = clip.embed_images_outcomes(IMAGES)
    assert len(outcomes) == 3
    for outcome in outcomes:
        assert isinstance(outcome, InferenceResponseError)
        assert "100 values, expected 512" in str(outcome)
    with pytest.raises(InferenceResponseError, match="100 values, expected 512"):
        clip.embed_texts(["a photo of a dog"])
    with pytest.raises(InferenceResponseError, match="100 values, expected 1024"):
        PerceptionEncoder(server=server).embed_images(IMAGES)  # 8 images per request: the whole chunk


def test_unknown_version_is_held_to_its_first_answer(stub: StubServer, server: InferenceServer) -> None:
    clip = Clip(server=server, version="ViT-H-14-custom")
    assert clip.dimension is None
    stub.force_dim(100)
    assert clip.embed_images(IMAGES[:1]).shape == (1, 100)
    assert clip.dimension == 100
    stub.force_dim(64)
    outcomes = clip.embed_images_outcomes(IMAGES)
    assert all(isinstance(o, InferenceResponseError) and "64 values, expected 100" in str(o) for o in outcomes)
    with pytest.raises(InferenceResponseError, match="64 values, expected 100"):
        clip.embed_texts(["a dog"])  # texts and images of a version share one size
    stub.force_dim(100)
    np.testing.assert_array_equal(clip.embed_texts(["a dog"]).shape, (1, 100))
    # Another version (and family) keeps its own size.
    assert Clip(server=server, version="another-custom").embed_images(IMAGES[:1]).shape == (1, 100)
