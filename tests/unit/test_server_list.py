"""`InferenceServer(api_url=[...])` and a flow's ``server=[...]``: normalised, checked, and a single
URL exactly as before (saved blocks, engines and cache keys of single-server users do not change)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from prefect_roboflow.blocks import Clip, InferenceServer, InvalidInputError
from prefect_roboflow.flows._steps.models import resolve_server


def test_one_url_in_a_list_is_the_plain_string_it_always_was() -> None:
    listed, plain = InferenceServer(api_url=["http://gpu-a:9001/"]), InferenceServer(api_url="http://gpu-a:9001")
    assert listed.api_url == plain.api_url == "http://gpu-a:9001"
    assert listed.model_dump()["api_url"] == "http://gpu-a:9001"  # what a saved block stores
    assert listed.http_settings() == plain.http_settings()  # hence the same engine
    assert listed.http_settings().api_url == "http://gpu-a:9001"
    assert Clip(server=listed).identity() == Clip(server=plain).identity()


def test_several_urls_keep_their_order_without_trailing_slashes() -> None:
    server = InferenceServer(api_url=["http://gpu-b:9001/", "https://gpu-a:9001"])
    assert server.api_urls == ("http://gpu-b:9001", "https://gpu-a:9001")
    assert server.http_settings().api_urls == server.api_urls
    again = InferenceServer.model_validate(server.model_dump())  # a saved block loads back the same
    assert again.api_urls == server.api_urls


@pytest.mark.parametrize(
    ("urls", "message"),
    [
        ([], "at least one server"),
        (["http://gpu-a:9001", "HTTP://GPU-A:9001/"], "listed twice"),
        (["http://gpu-a", "http://gpu-a:80"], "listed twice"),  # the default port filled in
        (["http://gpu-a:9001", "ftp://gpu-b:21"], "http"),
        (["http://gpu-a:9001", "http://gpu-b:9001/?api_key=SECRET"], "query string"),
        (["http://user:SECRET@gpu-a:99999"], "port"),
    ],
)
def test_a_malformed_list_is_refused_without_echoing_secrets(urls: list[str], message: str) -> None:
    with pytest.raises(ValidationError, match=message) as raised:
        InferenceServer(api_url=urls)
    assert "SECRET" not in str(raised.value)
    with pytest.raises(InvalidInputError, match=message) as typed:
        resolve_server(urls)
    assert typed.value.field == "server" and "SECRET" not in str(typed.value)


def test_a_flow_takes_host_and_port_without_a_scheme_as_http() -> None:
    """``server="localhost:9001"`` was looked up as a saved block's name; the block itself still
    wants a scheme (its URL is what it stores)."""
    assert resolve_server("localhost:9001").api_url == "http://localhost:9001"
    assert resolve_server(["http://gpu-a:9001", "gpu-b:9001/"]).api_urls == ("http://gpu-a:9001", "http://gpu-b:9001")
    assert resolve_server("10.0.0.5:9001").api_url == "http://10.0.0.5:9001"
    assert resolve_server("[::1]:9001").api_url == "http://[::1]:9001"
    with pytest.raises(ValidationError, match="http"):
        InferenceServer(api_url=["http://gpu-a:9001", "gpu-b:9001"])


@pytest.mark.parametrize("server", ["my server", "gpu-a:port", "http//gpu-a:9001", "gpu-a:9001?x=1"])
def test_text_that_is_neither_a_url_nor_a_block_name_names_server(server: str) -> None:
    with pytest.raises(InvalidInputError) as raised:
        resolve_server(server)
    assert raised.value.field == "server"


def test_a_name_no_saved_block_has_names_server() -> None:
    with pytest.raises(InvalidInputError, match="no saved InferenceServer block") as raised:
        resolve_server("no-such-server")
    assert raised.value.field == "server"


def test_a_list_with_something_else_than_urls_is_a_typed_error() -> None:
    with pytest.raises(InvalidInputError, match="expected a URL") as raised:
        resolve_server([1, 2])  # type: ignore[list-item]
    assert raised.value.field == "server"


def test_resolve_server_takes_a_list_of_urls_and_still_one_url() -> None:
    assert resolve_server(["http://gpu-a:9001", "http://gpu-b:9001"]).api_urls == (
        "http://gpu-a:9001",
        "http://gpu-b:9001",
    )
    assert resolve_server("http://gpu-a:9001/").api_url == "http://gpu-a:9001"
    with pytest.raises(InvalidInputError, match="query string"):
        resolve_server("http://gpu-a:9001/?x=1")
