"""Every route through the blocks, against the real Roboflow Inference server.

Where the placeholder weights make values meaningless, the blocks' answers are compared with
the server's own answer to the same raw request.
"""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import numpy as np
import pytest
import supervision as sv
from support.images import make_image

from prefect_roboflow.blocks import (
    Box,
    Clip,
    InferenceServer,
    OwlV2,
    PerceptionEncoder,
    ReferenceExample,
    record_responses,
)

pytestmark = pytest.mark.server

PROMPTS = [f"a photo of thing number {i}" for i in range(9)]


def _raw(url: str, route: str, body: dict) -> dict:
    response = httpx.post(f"{url}{route}", json=body, timeout=60)
    response.raise_for_status()
    return response.json()


def _b64(path: Path) -> dict[str, str]:
    return {"type": "base64", "value": base64.b64encode(path.read_bytes()).decode()}


@pytest.fixture(scope="module")
def twenty(image_paths: list[Path]) -> list[Path]:
    return image_paths[:20]


def test_server_info(server: InferenceServer) -> None:
    info = server.info()
    assert info["version"] == "1.8.3"


def test_clip_embeds_twenty_images_one_vector_each(
    server: InferenceServer, twenty: list[Path], inference_url: str
) -> None:
    clip = Clip(server=server)
    with record_responses() as infos:
        vectors = clip.embed_images(twenty)
    assert vectors.shape == (20, 512) and vectors.dtype == np.float32
    # one image per request on CLIP: the server's list handling stacks images into one
    assert len(infos) == 20 and all(i.endpoint == "/clip/embed_image" for i in infos)
    assert {i.engine for i in infos} == {"inference-models"}
    for index in (0, 7, 19):
        raw = _raw(inference_url, "/clip/embed_image", {"image": _b64(twenty[index]), "clip_version_id": "ViT-B-16"})
        np.testing.assert_allclose(vectors[index], raw["embeddings"][0], rtol=1e-5, atol=1e-5)
    assert len({v.tobytes() for v in vectors}) == 20  # distinct images, distinct rows, input order kept


def test_pe_embeds_twenty_images_in_requests_of_at_most_eight(
    server: InferenceServer, twenty: list[Path], inference_url: str
) -> None:
    pe = PerceptionEncoder(server=server)
    with record_responses() as infos:
        vectors = pe.embed_images(twenty)
    assert vectors.shape == (20, 1024) and vectors.dtype == np.float32
    assert len(infos) == 3  # 8 + 8 + 4
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
    raw = _raw(inference_url, "/perception_encoder/embed_image", {"image": [_b64(p) for p in twenty[16:20]]})
    np.testing.assert_allclose(vectors[16:20], raw["embeddings"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", [Clip, PerceptionEncoder])
def test_embed_texts_matches_the_server(server: InferenceServer, inference_url: str, family: type) -> None:
    model = family(server=server)
    vectors = model.embed_texts(PROMPTS)
    dim = 512 if family is Clip else 1024
    assert vectors.shape == (9, dim)
    route = f"/{model.family}/embed_text"
    raw = _raw(inference_url, route, {"text": PROMPTS[8:], model.routes.version_field: model.version})
    np.testing.assert_allclose(vectors[8:], raw["embeddings"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", [Clip, PerceptionEncoder])
def test_compare_nine_prompts_gives_nine_similarities(
    server: InferenceServer, inference_url: str, image_paths: list[Path], family: type
) -> None:
    model = family(server=server)
    with record_responses() as infos:
        similarities = model.compare(image_paths[0], PROMPTS)
    assert similarities.shape == (9,) and similarities.dtype == np.float32
    assert len(infos) == 2  # 8 + 1 prompts: the server refuses more than 8 per request
    assert np.all((similarities >= -1) & (similarities <= 1))
    raw = _raw(
        inference_url,
        f"/{model.family}/compare",
        {"subject": _b64(image_paths[0]), "prompt": PROMPTS[:8], model.routes.version_field: model.version},
    )
    np.testing.assert_allclose(similarities[:8], raw["similarity"], rtol=1e-4, atol=1e-4)


def _owl_examples() -> tuple[list[ReferenceExample], list[dict]]:
    reference = make_image(100)
    boxes = [Box(x=160, y=120, w=80, h=80, cls="thing"), Box(x=80, y=60, w=80, h=80, cls="other")]
    raw_training = [
        {
            "image": {"type": "base64", "value": base64.b64encode(reference).decode()},
            "boxes": [b.to_request() for b in boxes],
        }
    ]
    return [ReferenceExample(image=reference, boxes=boxes)], raw_training


def test_owlv2_detections_match_the_server_predictions(
    server: InferenceServer, inference_url: str, image_paths: list[Path]
) -> None:
    owl = OwlV2(server=server)
    examples, raw_training = _owl_examples()
    found_any = False
    for path in image_paths[:6]:
        detections = owl.detect(path, examples, confidence=0.5)
        raw = _raw(
            inference_url,
            "/owlv2/infer",
            {"image": _b64(path), "training_data": raw_training, "confidence": 0.5},
        )
        predictions = raw["predictions"]
        assert isinstance(detections, sv.Detections)
        assert len(detections) == len(predictions)
        expected = np.array(
            [
                [p["x"] - p["width"] / 2, p["y"] - p["height"] / 2, p["x"] + p["width"] / 2, p["y"] + p["height"] / 2]
                for p in predictions
            ]
        ).reshape(-1, 4)
        # the server's own boxes are kept as raw_xyxy; the boxes given out are clipped to the image
        np.testing.assert_allclose(detections.data["raw_xyxy"], expected, atol=1e-3)
        width, height = raw["image"]["width"], raw["image"]["height"]
        np.testing.assert_allclose(detections.xyxy, np.clip(expected, 0, [width, height, width, height]), atol=1e-3)
        np.testing.assert_allclose(detections.confidence, [p["confidence"] for p in predictions], atol=1e-6)
        assert detections.data["class_name"].tolist() == [p["class"] for p in predictions]
        assert set(detections.class_id.tolist()) <= {0, 1}  # index into ["other", "thing"]
        found_any |= len(detections) > 0
    assert found_any, "placeholder OWLv2 should find boxes of a quarter of the image side"


def test_owlv2_batch_sends_one_query_image_per_request(server: InferenceServer, image_paths: list[Path]) -> None:
    owl = OwlV2(server=server)
    examples, _ = _owl_examples()
    with record_responses() as infos:
        batch = owl.detect_batch(image_paths[:5], examples, confidence=0.5)
    assert len(batch) == 5 and len(infos) == 5
    single = owl.detect(image_paths[3], examples, confidence=0.5)
    np.testing.assert_allclose(batch[3].xyxy, single.xyxy)


async def test_async_twins_agree_with_sync(server: InferenceServer, image_paths: list[Path]) -> None:
    clip, pe, owl = Clip(server=server), PerceptionEncoder(server=server), OwlV2(server=server)
    images = image_paths[:10]
    examples, _ = _owl_examples()
    np.testing.assert_array_equal(await clip.aembed_images(images), clip.embed_images(images, _sync=True))
    np.testing.assert_allclose(await pe.aembed_images(images), pe.embed_images(images, _sync=True), atol=1e-5)
    np.testing.assert_array_equal(await clip.aembed_texts(PROMPTS), clip.embed_texts(PROMPTS, _sync=True))
    np.testing.assert_allclose(await pe.aembed_texts(PROMPTS), pe.embed_texts(PROMPTS, _sync=True), atol=1e-5)
    np.testing.assert_array_equal(await clip.acompare(images[0], PROMPTS), clip.compare(images[0], PROMPTS, _sync=True))
    np.testing.assert_allclose(
        await pe.acompare(images[0], PROMPTS), pe.compare(images[0], PROMPTS, _sync=True), atol=1e-5
    )
    async_detections = await owl.adetect(images[1], examples, confidence=0.5)
    sync_detections = owl.detect(images[1], examples, confidence=0.5, _sync=True)
    np.testing.assert_array_equal(async_detections.xyxy, sync_detections.xyxy)


async def test_dispatch_returns_a_coroutine_only_in_async_context(
    server: InferenceServer, image_paths: list[Path]
) -> None:
    clip = Clip(server=server)
    pending = clip.embed_images(image_paths[:1])  # async context: dispatches to aembed_images
    assert hasattr(pending, "__await__")
    assert (await pending).shape == (1, 512)


def test_every_input_type_gives_the_same_embedding(server: InferenceServer, image_paths: list[Path]) -> None:
    from PIL import Image

    clip = Clip(server=server)
    path = image_paths[0]  # a PNG: lossless, so array and PIL inputs carry the same pixels
    rgb = np.asarray(Image.open(path).convert("RGB"))
    vectors = clip.embed_images([path, str(path), path.read_bytes(), rgb[:, :, ::-1], Image.open(path)])
    np.testing.assert_array_equal(vectors[0], vectors[1])
    np.testing.assert_array_equal(vectors[0], vectors[2])
    # arrays and PIL images are JPEG-encoded before sending, so they differ slightly
    assert np.allclose(vectors[3], vectors[0], atol=0.2 * float(np.abs(vectors[0]).max()))
    np.testing.assert_allclose(vectors[3], vectors[4], atol=1e-4)


def test_an_array_sent_as_png_detects_exactly_as_its_lossless_original(
    server: InferenceServer, image_paths: list[Path]
) -> None:
    import io

    from PIL import Image

    from prefect_roboflow.blocks.images import encode_array

    owl = OwlV2(server=server)
    examples, _ = _owl_examples()
    original = next(p for p in image_paths if p.suffix == ".png").read_bytes()
    with Image.open(io.BytesIO(original)) as image:
        bgr = np.asarray(image.convert("RGB"))[:, :, ::-1]
    expected = owl.detect(original, examples, confidence=0.5)
    lossless = owl.detect(encode_array(bgr, format="png"), examples, confidence=0.5)
    assert len(expected) > 0
    np.testing.assert_array_equal(lossless.xyxy, expected.xyxy)
    np.testing.assert_array_equal(lossless.confidence, expected.confidence)
