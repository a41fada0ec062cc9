"""The `InferenceServer` block: where a Roboflow Inference server is and how to talk to it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx
from prefect.blocks.abstract import CredentialsBlock
from pydantic import ConfigDict, Field, SecretStr, field_validator

from ._balancer import server_label
from ._compat import async_dispatch
from ._http import HttpSettings, InferenceHTTP, client_options, get_engine

__all__ = ["InferenceServer", "normalise_api_urls"]

LOGO_URL = "https://github.com/roboflow.png?size=200"
DOCS_URL = "https://inference.roboflow.com/"


def _shown(url: str) -> str:
    """A URL as an error may show it: any user and password masked."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return repr(url)
    return repr(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]).geturl())


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http(s) URL with a host, got {_shown(url)}")
    if parts.query or parts.fragment:
        raise ValueError(f"a server URL must not carry a query string or fragment ({server_label(url)} has one)")
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number from 0 to 65535
    except ValueError:
        raise ValueError(f"invalid port in {_shown(url)}") from None
    return url.rstrip("/")


def _same_server_key(url: str) -> tuple[str, str, int, str]:
    parts = urlsplit(url)
    default_port = 443 if parts.scheme == "https" else 80
    return parts.scheme, (parts.hostname or "").lower(), parts.port or default_port, parts.path.rstrip("/")


def normalise_api_urls(value: str | Sequence[str]) -> str | list[str]:
    """One URL (or a list of one) as the plain string it always was; several as a checked list.

    Each URL must be http(s) with a host and no query string or fragment; a trailing slash is
    dropped. The list must not be empty nor name a server twice (compared without the trailing
    slash, with the scheme and host in lower case and the default port filled in).

    Raises:
        ValueError: saying what is wrong (the block's validation error, or the flows'
            ``InvalidInputError("server", ...)``).

    Examples:
        ```python
        normalise_api_urls(["http://a:9001/"])  # 'http://a:9001'
        normalise_api_urls(["http://a:9001", "http://b:9001"])  # ['http://a:9001', 'http://b:9001']
        normalise_api_urls(["http://a:9001", "HTTP://A:9001/"])  # ValueError: ... twice
        ```
    """
    if isinstance(value, str):
        return _check_url(value)
    urls = [_check_url(url) for url in value]
    if not urls:
        raise ValueError("expected at least one server URL, got an empty list")
    seen: dict[tuple[str, str, int, str], str] = {}
    for url in urls:
        key = _same_server_key(url)
        if key in seen:
            raise ValueError(f"the same server is listed twice: {server_label(seen[key])} and {server_label(url)}")
        seen[key] = url
    return urls[0] if len(urls) == 1 else urls


class InferenceServer(CredentialsBlock):
    """A Roboflow Inference server (or several): URLs, API key, timeouts, retries and concurrency.

    Requests from every model block that uses this server share one pooled connection set and
    one adaptive concurrency limit per server URL, at most `max_concurrency` requests in flight to
    each. The API key travels in the ``Authorization`` header and the JSON body, never in a URL, a
    log line or an error.

    Several URLs make one pool of interchangeable servers (same models and weights): each request
    goes to the least-loaded healthy one (fewest requests per place its adaptive limit allows); a
    server whose connections fail, or that answers 502-504 or times out repeatedly, is taken out
    and probed back in with ``GET /info``; a request that failed on one server in a retryable way
    is retried at once on another, within `max_retries` and `retry_budget_seconds`. A request that
    succeeded is never sent again. `ResponseInfo.server` says which server answered.

    Examples:
        Load a saved server and ask what it runs:
        ```python
        from prefect_roboflow.blocks import InferenceServer

        server = InferenceServer.load("BLOCK_NAME")
        server.info()["version"]  # '1.8.3'
        ```

        Point at a local server started with `deployments/inference_server/up`:
        ```python
        server = InferenceServer(api_url="http://localhost:9001")
        ```

        Share the load between two GPU servers:
        ```python
        server = InferenceServer(api_url=["http://gpu-a:9001", "http://gpu-b:9001"])
        server.api_urls  # ('http://gpu-a:9001', 'http://gpu-b:9001')
        Clip(server=server).embed_images(paths)  # each request to the least-loaded server
        ```
    """

    _block_type_name = "Roboflow Inference Server"
    _block_type_slug = "roboflow-inference-server"
    _logo_url = LOGO_URL  # type: ignore[assignment]
    _documentation_url = DOCS_URL  # type: ignore[assignment]
    # A rejected URL may carry a password or a key: validation errors do not echo the input.
    model_config = ConfigDict(hide_input_in_errors=True)

    api_url: str | list[str] = Field(
        default="http://localhost:9001",
        description="Base URL of the inference server, e.g. http://localhost:9001 or a dedicated deployment; "
        "or a list of URLs of interchangeable servers (same models) that share the load.",
    )
    api_key: SecretStr | None = Field(
        default=None,
        description="Roboflow API key; a self-hosted server with local weights needs none.",
    )
    timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        description="Seconds to wait for an answer; long enough for a model's first load.",
    )
    connect_timeout_seconds: float = Field(default=5.0, gt=0, description="Seconds to wait for a connection to open.")
    max_retries: int = Field(
        default=6,
        ge=0,
        le=20,
        description="Retries of a request that failed in a retryable way (429, 502-504, timeouts, resets).",
    )
    retry_backoff_seconds: float = Field(
        default=0.5,
        ge=0,
        description="First retry delay; it doubles each retry, with jitter, up to 10 seconds.",
    )
    retry_budget_seconds: float = Field(
        default=120.0,
        gt=0,
        description="Seconds after which a request stops retrying and its last error is raised.",
    )
    max_concurrency: int = Field(
        default=64,
        ge=1,
        le=256,
        description="Cap on requests in flight at once to this server, across all threads. Below it the "
        "limit adapts: it starts at 4, grows while latency holds, and backs off on rising latency, "
        "429, 502-504 and timeouts. 1 sends one request at a time.",
    )

    @field_validator("api_url")
    @classmethod
    def _check_api_url(cls, value: str | list[str]) -> str | list[str]:
        return normalise_api_urls(value)

    @property
    def api_urls(self) -> tuple[str, ...]:
        """The server base URLs, one or more.

        Examples:
            ```python
            InferenceServer(api_url="http://localhost:9001/").api_urls  # ('http://localhost:9001',)
            ```
        """
        return (self.api_url,) if isinstance(self.api_url, str) else tuple(self.api_url)

    def http_settings(self) -> HttpSettings:
        """The transport settings this block stands for."""
        return HttpSettings(
            api_url=self.api_url if isinstance(self.api_url, str) else tuple(self.api_url),
            api_key=self.api_key.get_secret_value() if self.api_key else None,
            timeout=self.timeout_seconds,
            connect_timeout=self.connect_timeout_seconds,
            max_retries=self.max_retries,
            retry_backoff=self.retry_backoff_seconds,
            retry_budget=self.retry_budget_seconds,
            max_concurrency=self.max_concurrency,
        )

    @property
    def engine(self) -> InferenceHTTP:
        """The process-wide HTTP engine (pool, retries, limits) for this configuration."""
        return get_engine(self.http_settings())

    def get_client(self) -> httpx.Client:
        """A new sync `httpx.Client` configured for this server (the first of several), for raw calls.

        The caller owns it and closes it (use it as a context manager). The model blocks do
        not need it: they share the block's pooled engine.
        """
        return httpx.Client(**client_options(self.http_settings()))

    async def ainfo(self) -> dict[str, Any]:
        """The server's ``GET /info`` answer (name, version, uuid); of the least-loaded one of several."""
        return await self.engine.arun(self.engine.get("/info"))

    @async_dispatch(ainfo)
    def info(self) -> dict[str, Any]:
        """The server's ``GET /info`` answer (name, version, uuid); of the least-loaded one of several."""
        return self.engine.run(self.engine.get("/info"))
