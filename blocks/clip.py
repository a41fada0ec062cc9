"""The `Clip` block: OpenAI CLIP image and text embeddings from ``/clip/*``."""

from __future__ import annotations

from enum import Enum
from typing import Any, ClassVar

from pydantic import Field

from ._embedding import EmbeddingModel, Routes
from .exceptions import InvalidInputError
from .server import DOCS_URL, LOGO_URL

__all__ = ["CLIP_DIMENSIONS", "Clip", "ClipVersion"]


class ClipVersion(str, Enum):
    """CLIP versions a Roboflow Inference server knows."""

    VIT_B_16 = "ViT-B-16"
    VIT_B_32 = "ViT-B-32"
    VIT_L_14 = "ViT-L-14"
    VIT_L_14_336PX = "ViT-L-14-336px"
    RN50 = "RN50"
    RN101 = "RN101"
    RN50X4 = "RN50x4"
    RN50X16 = "RN50x16"
    RN50X64 = "RN50x64"


#: Embedding size of each version.
CLIP_DIMENSIONS: dict[str, int] = {
    "ViT-B-16": 512,
    "ViT-B-32": 512,
    "ViT-L-14": 768,
    "ViT-L-14-336px": 768,
    "RN50": 1024,
    "RN101": 512,
    "RN50x4": 640,
    "RN50x16": 768,
    "RN50x64": 1024,
}


class Clip(EmbeddingModel):
    """CLIP embeddings and image–text similarity from a Roboflow Inference server.

    Embeddings come back as the server computes them (not L2-normalised); `compare` gives
    raw cosine similarities in [-1, 1].

    Examples:
        Load a saved block and embed two images and a prompt:
        ```python
        from prefect_roboflow.blocks import Clip

        clip = Clip.load("BLOCK_NAME")
        clip.embed_images(["dog.jpg", "cat.jpg"]).shape  # (2, 512)
        clip.embed_texts(["a photo of a dog"]).shape  # (1, 512)
        clip.compare("dog.jpg", ["a dog", "a cat"])  # array([0.29, 0.19], dtype=float32)
        ```

        Or build one in code:
        ```python
        from prefect_roboflow.blocks import Clip, InferenceServer

        clip = Clip(server=InferenceServer(api_url="http://localhost:9001"), version="ViT-B-16")
        ```
    """

    _block_type_name = "Roboflow CLIP"
    _block_type_slug = "roboflow-clip"
    _logo_url = LOGO_URL  # type: ignore[assignment]
    _documentation_url = DOCS_URL  # type: ignore[assignment]

    family: ClassVar[str] = "clip"
    # The 1.8.3 engine stacks a list of images into one tall image and answers one
    # embedding, so CLIP images go one per request.
    routes: ClassVar[Routes] = Routes(version_field="clip_version_id", images_per_request=1)
    dimensions: ClassVar[dict[str, int]] = CLIP_DIMENSIONS

    version: str = Field(
        default=ClipVersion.VIT_B_16.value,
        description="CLIP version, e.g. ViT-B-16 (512-d), ViT-L-14 (768-d) or RN50 (1024-d).",
    )

    def _check_text(self, text: Any, field: str) -> str:
        from ._clip_tokenizer import CLIP_CONTEXT_LENGTH, count_clip_tokens

        text = super()._check_text(text, field)
        tokens = count_clip_tokens(text)
        if tokens + 2 > CLIP_CONTEXT_LENGTH:
            raise InvalidInputError(
                field,
                f"text is {tokens} tokens; CLIP takes at most {CLIP_CONTEXT_LENGTH - 2}",
            )
        return text
