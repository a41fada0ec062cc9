"""Prefect blocks for the foundation models of a Roboflow Inference server.

Importing this package stays light (pydantic, httpx, prefect): the Prefect server and workers
import it through the ``prefect.collections`` entry point. numpy, PIL and supervision load on
first use. Tasks live in `prefect_roboflow.blocks.tasks`.
"""

from .. import __version__ as __version__  # the package's, kept here for code that read it from blocks
from ._embedding import EmbeddingModel
from ._http import ResponseInfo, record_responses
from ._model import ModelBlock, model_class, model_families
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
)
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
    "ModelBlock",
    "ModelNotFoundError",
    "OwlV2",
    "PerceptionEncoder",
    "PerceptionEncoderVersion",
    "RateLimitedError",
    "ReferenceExample",
    "ResponseInfo",
    "ServerUnavailableError",
    "model_class",
    "model_families",
    "record_responses",
]
