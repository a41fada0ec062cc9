"""The `InferenceServer` block: where a Roboflow Inference server is and how to talk to it."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import httpx
from prefect.blocks.abstract import CredentialsBlock
from pydantic import Field, SecretStr, field_validator

from ._compat import async_dispatch
from ._http import HttpSettings, InferenceHTTP, client_options, get_engine

__all__ = ["InferenceServer"]

LOGO_URL = "https://github.com/roboflow.png?size=200"
DOCS_URL = "https://inference.roboflow.com/"


class InferenceServer(CredentialsBlock):
    """A Roboflow Inference server: its URL, API key, timeouts, retries and concurrency.

    Requests from every model block that uses this server share one pooled connection set and
    one adaptive concurrency limit, at most `max_concurrency` requests in flight. The API key
    travels in the ``Authorization`` header and the JSON body, never in a URL, a log line or an
    error.

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
    """

    _block_type_name = "Roboflow Inference Server"
    _block_type_slug = "roboflow-inference-server"
    _logo_url = LOGO_URL  # type: ignore[assignment]
    _documentation_url = DOCS_URL  # type: ignore[assignment]

    api_url: str = Field(
        default="http://localhost:9001",
        description="Base URL of the inference server, e.g. http://localhost:9001 or a dedicated deployment.",
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
    def _check_api_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"api_url must be an http(s) URL with a host, got {value!r}")
        if parts.query or parts.fragment:
            raise ValueError("api_url must not carry a query string or fragment")
        return value.rstrip("/")

    def http_settings(self) -> HttpSettings:
        """The transport settings this block stands for."""
        return HttpSettings(
            api_url=self.api_url,
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
        """A new sync `httpx.Client` configured for this server, for raw calls.

        The caller owns it and closes it (use it as a context manager). The model blocks do
        not need it: they share the block's pooled engine.
        """
        return httpx.Client(**client_options(self.http_settings()))

    async def ainfo(self) -> dict[str, Any]:
        """The server's ``GET /info`` answer (name, version, uuid)."""
        return await self.engine.arun(self.engine.get("/info"))

    @async_dispatch(ainfo)
    def info(self) -> dict[str, Any]:
        """The server's ``GET /info`` answer (name, version, uuid)."""
        return self.engine.run(self.engine.get("/info"))
