"""Failure behaviour against the real server: its real error answers, and faults injected by
a real loopback proxy in front of it. Request counts are taken at the proxy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support.fault_proxy import Fault, FaultProxy
from support.images import make_image

from prefect_roboflow.blocks import (
    Box,
    Clip,
    InferenceClientError,
    InferenceConnectionError,
    InferenceServer,
    InferenceTimeoutError,
    InvalidImageError,
    InvalidInputError,
    ModelNotFoundError,
    OwlV2,
    PerceptionEncoder,
    RateLimitedError,
    ReferenceExample,
    ServerUnavailableError,
    record_responses,
)

pytestmark = pytest.mark.server

REFERENCE = make_image(100)
GOOD_EXAMPLES = [ReferenceExample(image=REFERENCE, boxes=[Box(x=160, y=120, w=80, h=80, cls="thing")])]


def _rejections(tmp: Path) -> list[tuple[str, Any, str]]:
    empty = tmp / "empty.jpg"
    empty.write_bytes(b"")
    corrupt = tmp / "corrupt.jpg"
    corrupt.write_bytes(make_image(5, fmt="JPEG")[:300])
    return [
        ("clip.embed_images", lambda m: m["clip"].embed_images([]), "images"),
        ("clip.embed_images", lambda m: m["clip"].embed_images([make_image(1), empty]), "images[1]"),
        ("clip.embed_images", lambda m: m["clip"].embed_images([corrupt]), "images[0]"),
        ("clip.embed_images", lambda m: m["clip"].embed_images(["http://example.com/a.jpg"]), "images[0]"),
        ("clip.embed_images", lambda m: m["clip"].embed_images([b"not an image"]), "images[0]"),
        ("pe.embed_images", lambda m: m["pe"].embed_images([make_image(1)] * 3 + [tmp / "missing.png"]), "images[3]"),
        ("clip.embed_texts", lambda m: m["clip"].embed_texts([]), "texts"),
        ("clip.embed_texts", lambda m: m["clip"].embed_texts(["fine", "too long " * 60]), "texts[1]"),
        ("clip.compare", lambda m: m["clip"].compare(make_image(1), []), "prompts"),
        ("clip.compare", lambda m: m["clip"].compare(make_image(1), "a string, not a list"), "prompts"),
        ("pe.compare", lambda m: m["pe"].compare(b"", ["a"]), "image"),
        ("owl.detect", lambda m: m["owl"].detect(make_image(1), []), "examples"),
        (
            "owl.detect",
            lambda m: m["owl"].detect(
                make_image(1),
                [ReferenceExample(image=REFERENCE, boxes=[Box(x=160, y=120, w=80, h=80, cls="x", negative=True)])],
            ),
            "examples[0].boxes[0].cls",
        ),
        (
            "owl.detect",
            lambda m: m["owl"].detect(
                make_image(1), [ReferenceExample(image=REFERENCE, boxes=[Box(x=500, y=120, w=80, h=80, cls="x")])]
            ),
            "examples[0].boxes[0]",
        ),
        ("owl.detect", lambda m: m["owl"].detect(make_image(1), GOOD_EXAMPLES, confidence=1.5), "confidence"),
        ("owl.detect", lambda m: m["owl"].detect("https://nohost/a.jpg", GOOD_EXAMPLES), "images[0]"),
    ]


def test_rejected_inputs_raise_typed_errors_and_send_nothing(
    proxy: FaultProxy, proxied: InferenceServer, tmp_path: Path
) -> None:
    models = {"clip": Clip(server=proxied), "pe": PerceptionEncoder(server=proxied), "owl": OwlV2(server=proxied)}
    cases = _rejections(tmp_path)
    for name, call, field in cases:
        with pytest.raises(InvalidInputError) as caught:
            call(models)
        assert caught.value.field == field, f"{name}: {caught.value}"
        assert field in str(caught.value)
    assert proxy.count() == 0, [r.path for r in proxy.requests]
    # and the same blocks do reach the server with good input
    models["clip"].embed_texts(["fine"])
    assert proxy.count("/clip/embed_text") == 1


def test_real_server_errors_are_mapped(server: InferenceServer) -> None:
    # the server's own answer to an unknown version (no such model package here)
    with pytest.raises(ModelNotFoundError) as unknown:
        Clip(server=server, version="ViT-L-14").embed_texts(["a"])
    assert "ViT-L-14" in unknown.value.server_message
    assert unknown.value.endpoint == "/clip/embed_text"
    # bytes that pass the client's cheap checks but do not decode: sent untouched (client_resize
    # off), the server answers 400; with the client's resize on, they fail on the client, unsent
    fake_png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64 + b"IEND\xaeB`\x82"
    with pytest.raises(InferenceClientError) as undecodable:
        PerceptionEncoder(server=server, client_resize=False).embed_images([fake_png])
    assert undecodable.value.status_code == 400
    assert "Could not load input image" in undecodable.value.server_message
    with pytest.raises(InvalidImageError, match=r"images\[0\]"):
        PerceptionEncoder(server=server).embed_images([fake_png])


def test_retryable_statuses_are_retried_until_success(proxy: FaultProxy, proxied: InferenceServer) -> None:
    proxy.inject(Fault.status(503), Fault.status(502), Fault.status(504), path_prefix="/clip/embed_text")
    with record_responses() as infos:
        vectors = Clip(server=proxied).embed_texts(["a cat"])
    assert vectors.shape == (1, 512)
    assert proxy.count("/clip/embed_text") == 4
    assert infos[0].attempts == 4


def test_429_retry_after_is_honoured(proxy: FaultProxy, proxied: InferenceServer) -> None:
    proxy.inject(Fault.status(429, headers={"Retry-After": "1"}), path_prefix="/clip/embed_text")
    with record_responses() as infos:
        Clip(server=proxied).embed_texts(["a cat"])
    assert infos[0].attempts == 2
    assert infos[0].elapsed >= 1.0  # waited as asked, not the 50 ms backoff


@pytest.mark.parametrize(
    "fault", [Fault.reset(), Fault.close(), Fault.truncate(), Fault.stall(4.0)], ids=lambda f: f.kind
)
def test_transport_faults_are_retried(proxy: FaultProxy, image_paths: list[Path], fault: Fault) -> None:
    # CLIP image embedding answers in milliseconds, so a 2 s timeout only catches the stall
    server = InferenceServer(api_url=proxy.url, timeout_seconds=2.0, retry_backoff_seconds=0.05)
    expected = Clip(server=InferenceServer(api_url=proxy.upstream)).embed_images(image_paths[:2])
    proxy.clear()
    proxy.inject(fault, path_prefix="/clip/embed_image")
    with record_responses() as infos:
        vectors = Clip(server=server).embed_images(image_paths[:2])
    np.testing.assert_array_equal(vectors, expected)
    assert proxy.count("/clip/embed_image") == 3  # two images, one of them twice
    assert sorted(i.attempts for i in infos) == [1, 2]


@pytest.mark.parametrize(
    ("faults", "error"),
    [
        ([Fault.status(503)] * 5, ServerUnavailableError),
        ([Fault.status(429)] * 5, RateLimitedError),
        ([Fault.reset()] * 5, InferenceConnectionError),
        ([Fault.stall(6.0)] * 5, InferenceTimeoutError),
    ],
    ids=["503", "429", "reset", "stall"],
)
def test_persistent_faults_fail_clearly_after_the_retries(
    proxy: FaultProxy, inference_url: str, faults: list[Fault], error: type
) -> None:
    server = InferenceServer(api_url=proxy.url, timeout_seconds=1.0, retry_backoff_seconds=0.01, max_retries=2)
    proxy.inject(*faults, path_prefix="/clip/embed_text")
    with pytest.raises(error) as caught:
        Clip(server=server).embed_texts(["a cat"])
    assert caught.value.endpoint == "/clip/embed_text"
    assert proxy.count("/clip/embed_text") == 3  # first try + 2 retries


def test_non_retryable_errors_are_not_retried(proxy: FaultProxy, proxied: InferenceServer) -> None:
    proxy.inject(Fault.status(500, b'{"message":"Internal error."}'), path_prefix="/clip/embed_text")
    with pytest.raises(Exception, match="hides the cause"):
        Clip(server=proxied).embed_texts(["a cat"])
    assert proxy.count("/clip/embed_text") == 1


def test_one_bad_image_in_a_chunk_fails_alone(
    proxy: FaultProxy, proxied: InferenceServer, image_paths: list[Path]
) -> None:
    fake_png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64 + b"IEND\xaeB`\x82"
    images: list[Any] = [*image_paths[:5], fake_png, *image_paths[5:7]]
    outcomes = PerceptionEncoder(server=proxied, client_resize=False).embed_images_outcomes(images)  # as sent
    assert [type(o).__name__ for o in outcomes].count("ndarray") == 7
    assert isinstance(outcomes[5], InferenceClientError) and outcomes[5].status_code == 400
    # one chunk of 8 refused as a whole, then each image alone
    assert proxy.count("/perception_encoder/embed_image") == 1 + 8


def test_unsendable_images_become_outcomes_without_requests(
    proxy: FaultProxy, proxied: InferenceServer, image_paths: list[Path]
) -> None:
    outcomes = Clip(server=proxied).embed_images_outcomes([image_paths[0], b"", image_paths[1]])
    assert isinstance(outcomes[1], InvalidImageError) and outcomes[1].field == "images[1]"
    assert outcomes[0].shape == (512,) and outcomes[2].shape == (512,)
    assert proxy.count() == 2


def test_api_key_travels_in_header_and_body_never_the_url(proxy: FaultProxy, image_paths: list[Path]) -> None:
    sentinel = "rf-SENTINEL-key-0123456789"
    server = InferenceServer(api_url=proxy.url, api_key=sentinel)
    Clip(server=server).embed_images(image_paths[:1])
    OwlV2(server=server).detect(image_paths[0], GOOD_EXAMPLES, confidence=0.5)
    for request in proxy.requests:
        assert sentinel not in request.path and sentinel not in request.query
        assert request.headers["authorization"] == f"Bearer {sentinel}"
        assert f'"api_key":"{sentinel}"'.encode() in request.body
    assert sentinel not in repr(server) and sentinel not in str(server.model_dump())
    with server.get_client() as client:
        assert sentinel not in repr(client.headers)
