"""Every public flow, called as a new user would with a mistake in one parameter (a count, a range,
an empty value, an example box, a fan-out rate), refuses it with an `InvalidInputError` naming
that parameter before anything happens: no request reaches the server behind a counting proxy,
and nothing is written to ``out_dir``."""

from __future__ import annotations

import inspect
import math
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.fault_proxy import FaultProxy
from support.images import make_image
from support.parameter_mistakes import BOX, good_parameters, mistakes, names_parameter, of_flow

from prefect_roboflow.blocks import InvalidInputError
from prefect_roboflow.flows import (
    auto_label,
    classify_images,
    detect_crop_classify,
    embed_images,
    find_duplicates,
    search_images,
)

pytestmark = pytest.mark.server

FLOWS = {
    f.fn.__name__: f
    for f in (embed_images, classify_images, detect_crop_classify, auto_label, find_duplicates, search_images)
}
SERVED = {"embed_images", "classify_images", "detect_crop_classify", "auto_label", "search_images"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 320×240 reference image for the example boxes."""
    path = tmp_path_factory.mktemp("reference") / "reference.png"
    path.write_bytes(make_image(100))
    return str(path)


def _call(flow: str, parameters: dict[str, Any], proxy: FaultProxy, scratch: Path) -> InvalidInputError:
    """Call the flow through the proxy; the `InvalidInputError` it raises, after checking that no
    request was sent and nothing written."""
    extra: dict[str, Any] = {"server": proxy.url} if flow in SERVED else {}
    if flow not in {"find_duplicates", "search_images"}:
        extra["cache_storage"] = str(scratch / "cache")
    proxy.clear()
    with pytest.raises(InvalidInputError) as caught:
        FLOWS[flow](**{**parameters, **extra})
    assert proxy.count() == 0, f"{proxy.count()} request(s) sent before {caught.value.field} was refused"
    assert not (scratch / "out").exists(), "out_dir was written to"
    assert not (scratch / "cache").exists(), "the cache was written to"
    return caught.value


def _scratch(tmp_path: Path) -> Path:
    folder = tmp_path / uuid.uuid4().hex[:12]
    folder.mkdir()
    return folder


@pytest.mark.parametrize("flow", sorted(FLOWS))
@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_mistake_in_any_parameter_is_refused_before_any_request(
    flow: str, data: st.DataObject, proxy: FaultProxy, image_dir: Path, reference: str, tmp_path: Path
) -> None:
    scratch = _scratch(tmp_path)
    strategies = of_flow(mistakes(reference)[flow], inspect.signature(FLOWS[flow].fn).parameters)
    parameter = data.draw(st.sampled_from(sorted(strategies)), label="parameter")
    value = data.draw(strategies[parameter], label="value")
    good = good_parameters(flow, str(image_dir), reference, scratch / "out", str(scratch / "embeddings.parquet"))
    error = _call(flow, {**good, parameter: value}, proxy, scratch)
    assert names_parameter(error.field, parameter), f"{parameter}={value!r} refused as {error.field}: {error.reason}"


def _catalogue(reference: str) -> list[tuple[str, str, str, dict[str, Any]]]:
    """The mistakes tried by hand (issue 16): name, flow, the parameter to be named, the change."""

    def box(**changes: Any) -> list[dict[str, Any]]:
        return [{"image": reference, "boxes": [{**BOX, **changes}]}]

    no_cls = [{"image": reference, "boxes": [{k: v for k, v in BOX.items() if k != "cls"}]}]
    cases = [
        ("embed_images", "batch_size", [0, 1.5, True]),
        ("classify_images", "batch_size", [-1]),
        ("detect_crop_classify", "batch_size", [0]),
        ("auto_label", "batch_size", [0]),
        ("search_images", "top_k", [0, True]),
        ("find_duplicates", "k", [0]),
        ("find_duplicates", "threshold", [1.5, -0.1, math.nan]),
        ("classify_images", "min_score", [math.nan, 2.0]),
        ("detect_crop_classify", "min_score", [-3.0]),
        ("auto_label", "min_score", [1.5, math.nan]),
        ("detect_crop_classify", "confidence", [1.5, math.nan]),
        ("auto_label", "confidence", [-0.1]),
        ("detect_crop_classify", "padding", [-5]),
        ("embed_images", "max_failure_rate", [2.0]),
        ("classify_images", "max_failure_rate", [-0.5]),
        ("detect_crop_classify", "max_failure_rate", [math.nan]),
        ("classify_images", "labels", [[], [""], ["a", "a"]]),
        ("detect_crop_classify", "labels", [[], ["  "]]),
        ("auto_label", "classes", [[], [""]]),
        ("search_images", "query", [""]),
        ("detect_crop_classify", "examples", [[], [{"image": reference, "boxes": []}], box(w=0), box(x=5000, y=5000)]),
        ("detect_crop_classify", "examples", [no_cls, [{"image": "", "boxes": [BOX]}]]),
        ("auto_label", "examples", [[], box(cls=""), box(negative=True)]),
        ("auto_label", "formats", [[], ["voc"], "coco"]),
        ("embed_images", "images", [[]]),
        ("classify_images", "images", [""]),
        ("embed_images", "out_dir", [""]),
        ("find_duplicates", "source", [""]),
        ("search_images", "embeddings_path", [""]),
        ("embed_images", "fan_out", [{"shard_size": 0}, {"shard_size": -1}, {"shard_size": 2.5}]),
        ("embed_images", "fan_out", [{"shard_size": 2, "retries": -1}]),
        ("embed_images", "version", [""]),
        ("embed_images", "model", ["resnet"]),
    ]
    return [(f"{flow} {p}={v!r:.40}", flow, p, {p: v}) for flow, p, values in cases for v in values]


def test_the_catalogue_of_mistakes_tried_by_hand(
    proxy: FaultProxy, image_dir: Path, reference: str, tmp_path: Path
) -> None:
    failures = []
    catalogue = _catalogue(reference)
    for name, flow, parameter, change in catalogue:
        scratch = _scratch(tmp_path)
        good = good_parameters(flow, str(image_dir), reference, scratch / "out", str(scratch / "embeddings.parquet"))
        try:
            error = _call(flow, {**good, **change}, proxy, scratch)
            assert names_parameter(error.field, parameter), f"named {error.field!r}: {error.reason}"
        except BaseException as failure:  # collect every mismatch, then report them together
            failures.append(f"{name}: {type(failure).__name__}: {failure}")
    assert len(catalogue) == 55
    assert not failures, f"{len(failures)} of {len(catalogue)} slipped through:\n" + "\n".join(failures)
