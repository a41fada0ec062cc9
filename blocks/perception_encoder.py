"""The `PerceptionEncoder` block: Meta's Perception Encoder embeddings from ``/perception_encoder/*``."""

from __future__ import annotations

from enum import Enum
from typing import ClassVar

from pydantic import Field

from ._embedding import EmbeddingModel, Routes
from .server import DOCS_URL, LOGO_URL

__all__ = ["PE_DIMENSIONS", "PerceptionEncoder", "PerceptionEncoderVersion"]


class PerceptionEncoderVersion(str, Enum):
    """Perception Encoder versions with a text tower (the ones these routes support)."""

    PE_CORE_B16_224 = "PE-Core-B16-224"
    PE_CORE_L14_336 = "PE-Core-L14-336"
    PE_CORE_G14_448 = "PE-Core-G14-448"


#: Embedding size of each version.
PE_DIMENSIONS: dict[str, int] = {"PE-Core-B16-224": 1024, "PE-Core-L14-336": 1024, "PE-Core-G14-448": 1280}


class PerceptionEncoder(EmbeddingModel):
    """Perception Encoder embeddings and image–text similarity from a Roboflow Inference server.

    Embeddings come back L2-normalised. Text longer than the model's context is truncated by
    the server, not rejected.

    Examples:
        Load a saved block and embed images and text:
        ```python
        from prefect_roboflow.blocks import PerceptionEncoder

        pe = PerceptionEncoder.load("BLOCK_NAME")
        pe.embed_images(["dog.jpg", "cat.jpg"]).shape  # (2, 1024)
        pe.compare("dog.jpg", ["a dog", "a cat"]).shape  # (2,)
        ```
    """

    _block_type_name = "Roboflow Perception Encoder"
    _block_type_slug = "roboflow-perception-encoder"
    _logo_url = LOGO_URL  # type: ignore[assignment]
    _documentation_url = DOCS_URL  # type: ignore[assignment]

    family: ClassVar[str] = "perception_encoder"
    routes: ClassVar[Routes] = Routes(version_field="perception_encoder_version_id", images_per_request=8)
    dimensions: ClassVar[dict[str, int]] = PE_DIMENSIONS

    version: str = Field(
        default=PerceptionEncoderVersion.PE_CORE_L14_336.value,
        description="Perception Encoder version, e.g. PE-Core-L14-336 (1024-d) or PE-Core-G14-448 (1280-d).",
    )
