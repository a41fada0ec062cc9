"""The models and server a flow's parameters name: an `InferenceServer` from a block, a saved
block name, a URL or a list of URLs, and the model blocks at their versions."""

from __future__ import annotations

import os
import re
from typing import Literal, TypeAlias, cast, get_args

from prefect_roboflow.blocks import EmbeddingModel, InferenceServer, OwlV2
from prefect_roboflow.blocks._model import model_class
from prefect_roboflow.blocks.exceptions import InvalidInputError
from prefect_roboflow.blocks.server import normalise_api_urls

#: The ``model`` parameter of the flows: the ``family`` of an embedding block.
EmbeddingFamily = Literal["clip", "perception_encoder"]
DEFAULT_SERVER_URL = "http://localhost:9001"
#: A flow's ``server`` parameter: a saved block name, a URL, a list of URLs, a block, or None.
ServerSpec: TypeAlias = str | list[str] | InferenceServer | None


def resolve_server(server: ServerSpec) -> InferenceServer:
    """An `InferenceServer` from a block, a saved block name, a URL, or a list of URLs.

    ``None`` means the ``INFERENCE_SERVER_URL`` environment variable, then
    ``http://localhost:9001``. A list of URLs names interchangeable servers that share the load
    (see `InferenceServer`).

    A URL without a scheme, ``host:port`` (``localhost:9001``, ``10.0.0.5:9001/infer``), is
    taken as ``http://host:port``; a plain name (letters, digits, dashes) is a saved block's.

    Raises:
        InvalidInputError: naming ``server``, for a URL or list of URLs that is malformed (empty,
            a server twice, not http(s), a query string), a name no saved block has, or text that
            is neither, before any request.

    Examples:
        ```python
        resolve_server(["http://gpu-a:9001", "http://gpu-b:9001"]).api_urls
        # ('http://gpu-a:9001', 'http://gpu-b:9001')
        resolve_server([])  # InvalidInputError: server: expected at least one server URL, got an empty list
        ```
    """
    if isinstance(server, InferenceServer):
        return server
    if server is None:
        server = os.environ.get("INFERENCE_SERVER_URL") or DEFAULT_SERVER_URL
    name = server.removeprefix(f"{InferenceServer.get_block_type_slug()}/") if isinstance(server, str) else ""
    if not _BLOCK_NAME.fullmatch(name):
        return InferenceServer(api_url=_server_urls(server))
    try:
        loaded = InferenceServer.load(name, _sync=True)  # type: ignore[call-arg]  # sync even inside an async flow
    except ValueError as error:  # Prefect: "Unable to find block document named ..."
        raise InvalidInputError(
            "server", f"no saved InferenceServer block is named {name!r}; give a URL such as http://host:9001"
        ) from error
    return cast(InferenceServer, loaded)


#: A saved block's name as Prefect allows it; anything else is read as a URL.
_BLOCK_NAME = re.compile(r"[a-z0-9][a-z0-9-]*")
#: ``host:port`` (a name, an IPv4 address or a bracketed IPv6 one) with an optional path, no scheme.
_HOST_PORT = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):\d{1,5}(?:/\S*)?")


def _with_scheme(url: str) -> str:
    """``host:port`` as ``http://host:port``; any other text as it is (the URL check judges it)."""
    return f"http://{url}" if _HOST_PORT.fullmatch(url) else url


def _server_urls(server: object) -> str | list[str]:
    """The checked URL or URLs of a ``server`` parameter (see `normalise_api_urls`)."""
    if not isinstance(server, (str, list, tuple)) or not all(isinstance(url, str) for url in server):
        raise InvalidInputError("server", f"expected a URL, a list of URLs or a block, got {server!r:.200}")
    try:
        if isinstance(server, str):
            return normalise_api_urls(_with_scheme(server))
        return normalise_api_urls([_with_scheme(url) for url in server])
    except ValueError as error:
        raise InvalidInputError("server", str(error)) from None


def embedding_model(family: str, version: str | None, server: InferenceServer) -> EmbeddingModel:
    """The embedding block of a family (``"clip"``, ``"perception_encoder"``), at its default version
    unless one is given."""
    if family not in get_args(EmbeddingFamily):
        raise InvalidInputError("model", f"expected one of {list(get_args(EmbeddingFamily))}, got {family!r}")
    cls = model_class(family)
    # each family's class has a default version (the base class has none, hence the ignore)
    model = cls(server=server) if version is None else cls(server=server, version=version)  # type: ignore[call-arg]
    assert isinstance(model, EmbeddingModel)
    return model


def detector_model(version: str | None, server: InferenceServer) -> OwlV2:
    """The OWLv2 block, at its default version unless one is given."""
    return OwlV2(server=server) if version is None else OwlV2(server=server, version=version)
