"""The flows' parameter contracts on their own, without a Prefect run: each accepts a correct call
and its defaults, names the parameter of any value outside it, and names only real parameters."""

from __future__ import annotations

import inspect
import pickle
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prefect.exceptions import ParameterTypeError
from support.parameter_mistakes import good_parameters, mistakes, names_parameter, of_flow

from prefect_roboflow.blocks import InvalidInputError
from prefect_roboflow.flows import (
    auto_label,
    classify_images,
    detect_crop_classify,
    embed_images,
    find_duplicates,
    search_images,
)
from prefect_roboflow.flows._run.parameters import CONTRACTS, FlowParameterError, FlowParameters, contract_of

FLOWS = {
    f.fn.__name__: f
    for f in (embed_images, classify_images, detect_crop_classify, auto_label, find_duplicates, search_images)
}
MISTAKES = {  # no image is read here
    flow: of_flow(strategies, inspect.signature(FLOWS[flow].fn).parameters)
    for flow, strategies in mistakes("reference.png", off_image=False).items()
}


def _check(flow: str) -> Any:
    check = contract_of(FLOWS[flow].fn)
    assert check is not None, f"{flow} has no parameter contract"
    return check


def _good(flow: str) -> dict[str, Any]:
    return good_parameters(flow, "photos/", "reference.png", Path("out"), "embeddings.parquet")


@pytest.mark.parametrize("flow", sorted(FLOWS))
def test_a_correct_call_with_the_defaults_keeps_its_contract(flow: str) -> None:
    _check(flow)(_good(flow))  # does not raise


@pytest.mark.parametrize("flow", sorted(FLOWS))
def test_the_contract_names_parameters_of_its_flow(flow: str) -> None:
    fields = CONTRACTS[flow].model_fields
    signature = set(inspect.signature(FLOWS[flow].fn).parameters)
    required = {name for name, field in fields.items() if field.is_required()}
    assert required <= signature, f"the contract requires no such parameter: {required - signature}"
    # only the fan-out pair may wait for a flow that does not fan out (yet)
    assert set(fields) - signature <= {"fan_out", "shard"}
    assert set(MISTAKES[flow]) <= set(fields)


@pytest.mark.parametrize("flow", sorted(FLOWS))
@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_value_outside_the_contract_is_refused_naming_its_parameter(flow: str, data: st.DataObject) -> None:
    parameter = data.draw(st.sampled_from(sorted(MISTAKES[flow])), label="parameter")
    value = data.draw(MISTAKES[flow][parameter], label="value")
    with pytest.raises(InvalidInputError) as caught:
        _check(flow)({**_good(flow), parameter: value})
    assert names_parameter(caught.value.field, parameter), caught.value.field
    assert isinstance(caught.value, ParameterTypeError)  # what Prefect raises for a parameter it cannot cast
    assert caught.value.reason


def test_a_bool_is_not_a_count_though_pydantic_reads_it_as_one() -> None:
    with pytest.raises(InvalidInputError, match="batch_size: expected a number, got True"):
        _check("embed_images")({**_good("embed_images"), "batch_size": True})


def test_a_missing_required_parameter_is_named() -> None:
    good = _good("classify_images")
    del good["labels"]
    with pytest.raises(InvalidInputError) as caught:
        _check("classify_images")(good)
    assert caught.value.field == "labels"


def test_fan_out_and_shard_together_are_refused() -> None:
    shard = {"index": 0, "manifest": "out/_shards/part-00000.json"}
    with pytest.raises(InvalidInputError) as caught:
        _check("embed_images")({**_good("embed_images"), "fan_out": {"shard_size": 10}, "shard": shard})
    assert caught.value.field == "fan_out"
    _check("embed_images")({**_good("embed_images"), "shard": shard})  # a shard's own run is fine


def test_the_error_survives_pickling_as_a_failed_run_keeps_it() -> None:
    error = pickle.loads(pickle.dumps(FlowParameterError("examples[0].boxes[1].w", "must be above 0")))
    assert (error.field, error.reason) == ("examples[0].boxes[1].w", "must be above 0")
    assert str(error) == "examples[0].boxes[1].w: must be above 0"


def test_a_function_without_a_contract_has_none() -> None:
    def embed_images_lookalike() -> None: ...

    assert contract_of(embed_images_lookalike) is None


def test_a_call_checks_its_contract_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The contract is checked where Prefect takes the parameters, not again in the flow body (a
    list of 100,000 image references was walked twice)."""
    checked: list[str] = []
    original = FlowParameters.check.__func__  # type: ignore[attr-defined]

    def counting(cls: type[FlowParameters], values: Any) -> None:
        checked.append(cls.flow)
        original(cls, values)

    monkeypatch.setattr(FlowParameters, "check", classmethod(counting))
    with pytest.raises(InvalidInputError) as caught:  # past the contract, the body finds no table there
        search_images("a cat", str(tmp_path / "no-such-table.parquet"))
    assert caught.value.field == "embeddings_path"
    assert checked == ["search_images"]
    checked.clear()
    with pytest.raises(InvalidInputError, match="video_fps"):  # a mistake: refused by that one check
        embed_images(str(tmp_path), str(tmp_path / "out"), video_fps="fast")
    assert checked == ["embed_images"] and not (tmp_path / "out").exists()
