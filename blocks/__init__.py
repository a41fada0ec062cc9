"""Prefect blocks for the foundation models of a Roboflow Inference server.

Importing this package stays light (pydantic, httpx, prefect): the Prefect server and workers
import it through the ``prefect.collections`` entry point. numpy, PIL and supervision load on
first use. Tasks live in `prefect_roboflow.blocks.tasks`.

`__all__` is what users call: the server, the model blocks and their `Box`/`ReferenceExample`
inputs, `encode_array` (exact pixels of an array), the typed errors, `ResponseInfo` and
`record_responses` (what the server said). The machinery model blocks share (`_model`) is private.
"""

from .. import __version__ as __version__  # the package's, kept here for code that read it from blocks
from ._embedding import EmbeddingModel
from ._http import ResponseInfo, record_responses
from .clip import CLIP_DIMENSIONS, Clip, ClipVersion
from .exceptions import (
    InferenceClientError,
    InferenceConnectionError,
    InferenceError,
    InferenceResponseError,
    InferenceServerError,
    InferenceStatusError,
    InferenceTimeoutError,
    InferenceTransportError,
    InvalidImageError,
    InvalidInputError,
    ModelNotFoundError,
    RateLimitedError,
    ServerUnavailableError,
    ServerUnreachableError,
)
from .images import encode_array
from .owlv2 import Box, OwlV2, ReferenceExample
from .perception_encoder import PE_DIMENSIONS, PerceptionEncoder, PerceptionEncoderVersion
from .server import InferenceServer

__all__ = [
    "CLIP_DIMENSIONS",
    "PE_DIMENSIONS",
    "Box",
    "Clip",
    "ClipVersion",
    "InferenceClientError",
    "InferenceConnectionError",
    "InferenceError",
    "InferenceResponseError",
    "EmbeddingModel",
    "InferenceServer",
    "InferenceServerError",
    "InferenceStatusError",
    "InferenceTimeoutError",
    "InferenceTransportError",
    "InvalidImageError",
    "InvalidInputError",
    "ModelNotFoundError",
    "OwlV2",
    "PerceptionEncoder",
    "PerceptionEncoderVersion",
    "RateLimitedError",
    "ReferenceExample",
    "ResponseInfo",
    "ServerUnavailableError",
    "ServerUnreachableError",
    "encode_array",
    "record_responses",
]
