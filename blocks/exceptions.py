"""Errors raised by prefect-roboflow.

Every error carries the endpoint it concerns; none ever carries the API key.

```
InferenceError
├── InvalidInputError (also a ValueError)   bad input, caught before any request is sent
│   └── InvalidImageError                   an image that cannot be read or sent
├── InferenceTransportError                 no usable HTTP answer          [retryable]
│   ├── InferenceTimeoutError
│   └── InferenceConnectionError
│       └── ServerUnreachableError          no server has answered yet     [not retried]
├── InferenceResponseError                  a 2xx answer we cannot parse   [retryable]
└── InferenceStatusError                    the server answered 4xx or 5xx
    ├── ModelNotFoundError                  unknown model or version (404, or the 500 saying so)
    ├── InferenceClientError                4xx
    │   └── RateLimitedError                429                            [retryable]
    └── InferenceServerError                5xx
        └── ServerUnavailableError          502, 503, 504                  [retryable]
```
"""

from __future__ import annotations

__all__ = [
    "InferenceClientError",
    "InferenceConnectionError",
    "InferenceError",
    "InferenceResponseError",
    "InferenceServerError",
    "InferenceStatusError",
    "InferenceTimeoutError",
    "InferenceTransportError",
    "InvalidImageError",
    "InvalidInputError",
    "ModelNotFoundError",
    "RateLimitedError",
    "ServerUnavailableError",
    "ServerUnreachableError",
]


class InferenceError(Exception):
    """Base class of every error raised by prefect-roboflow."""

    retryable: bool = False

    def __init__(self, message: str, *, endpoint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.endpoint = endpoint

    def __str__(self) -> str:
        return f"{self.endpoint}: {self.message}" if self.endpoint else self.message


class InvalidInputError(InferenceError, ValueError):
    """Input rejected on the client, before any request was sent.

    Attributes:
        field: Dotted path of the offending input, e.g. ``examples[0].boxes[2].w``.
    """

    def __init__(self, field: str, message: str, *, endpoint: str | None = None) -> None:
        super().__init__(f"{field}: {message}", endpoint=endpoint)
        self.field = field
        self.reason = message


class InvalidImageError(InvalidInputError):
    """An image that cannot be read, decoded or sent (empty, corrupt, wrong type, bad URL)."""


class InferenceTransportError(InferenceError):
    """The request got no usable HTTP answer."""

    retryable = True


class InferenceTimeoutError(InferenceTransportError):
    """The server did not answer within the configured timeout."""


class InferenceConnectionError(InferenceTransportError):
    """The connection could not be made, or was reset before an answer arrived."""


class ServerUnreachableError(InferenceConnectionError):
    """No server could be reached, and none of the engine's servers has answered yet: a URL that is
    wrong or a server that is not running. Raised after a short grace (a server still starting),
    never retried further and never a failed row: no request of the run can succeed."""

    retryable = False


class InferenceResponseError(InferenceError):
    """A success status whose body is not the JSON the endpoint promises (e.g. truncated)."""

    retryable = True


class InferenceStatusError(InferenceError):
    """The server answered with an error status.

    Attributes:
        status_code: The HTTP status.
        server_message: The server's own message (``message`` or ``detail`` of its body).
        request_id: The ``X-Request-ID`` the server gave the request, if any.
    """

    def __init__(
        self,
        status_code: int,
        server_message: str,
        *,
        endpoint: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(f"HTTP {status_code}: {server_message}", endpoint=endpoint)
        self.status_code = status_code
        self.server_message = server_message
        self.request_id = request_id


class InferenceClientError(InferenceStatusError):
    """The server rejected the request (4xx)."""


class ModelNotFoundError(InferenceStatusError):
    """The server does not have the requested model or version."""


class RateLimitedError(InferenceClientError):
    """The server asked us to slow down (429).

    Attributes:
        retry_after: Seconds the server asked us to wait, if it said.
    """

    retryable = True

    def __init__(self, *args: object, retry_after: float | None = None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.retry_after = retry_after


class InferenceServerError(InferenceStatusError):
    """The server failed (5xx). A bare ``Internal error.`` often hides a bad input."""


class ServerUnavailableError(InferenceServerError):
    """The server or a gateway is temporarily unable to answer (502, 503, 504).

    Attributes:
        retry_after: Seconds the server asked us to wait, if it said.
    """

    retryable = True

    def __init__(self, *args: object, retry_after: float | None = None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.retry_after = retry_after
