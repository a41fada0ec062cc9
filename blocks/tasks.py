"""One Prefect task per endpoint, each taking a block and a whole batch.

A task run costs tens of milliseconds to record, so these tasks take a batch and let the
block's engine fan the batch out over concurrent requests; never map them over single images.
Every task logs what the server reported (engine, model time, attempts) for its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from ._embedding import EmbeddingModel
from ._http import ResponseInfo, describe_responses, record_responses
from .exceptions import InferenceError
from .images import ImageInput
from .owlv2 import OwlV2, ReferenceExample

if TYPE_CHECKING:
    import numpy as np
    import supervision as sv
    from prefect import Task
    from prefect.client.schemas.objects import TaskRun
    from prefect.states import State

__all__ = [
    "acompare",
    "adetect",
    "aembed_images",
    "aembed_texts",
    "compare",
    "detect",
    "embed_images",
    "embed_texts",
    "retry_if_retryable",
    "run_name",
]


def run_name(step: str, label: str | None = None, detail: str = "") -> str:
    """The one way task and flow runs are named: ``"step[label] detail"``.

    The blocks' tasks, the flows' steps and the flows themselves all name their runs through this,
    so the UI reads the same everywhere: ``embed_images[clip ViT-B-16] 32 images``,
    ``embed[clip ViT-B-16] batch 3/12``, ``embed-images[clip] part-00003 attempt 1``.

    Examples:
        ```python
        run_name("embed", "clip ViT-B-16", "batch 3/12")  # 'embed[clip ViT-B-16] batch 3/12'
        run_name("find-duplicates")  # 'find-duplicates'
        ```
    """
    head = f"{step}[{label}]" if label else step
    return f"{head} {detail}" if detail else head


def _run_name(step: str, items: str) -> Any:
    def name() -> str:
        from prefect.runtime import task_run

        params = task_run.parameters
        model = params.get("model") or params.get("detector")
        return run_name(step, model.label, f"{len(params.get(items) or ())} {items}")

    return name


def retry_if_retryable(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry a task only when it failed in a retryable way (the engine already retried each request)."""
    error = state.result(raise_on_failure=False)
    return isinstance(error, InferenceError) and error.retryable


def _log_responses(infos: Sequence[ResponseInfo], what: str) -> None:
    get_run_logger().info("%s: %s", what, describe_responses(infos))


_TASK_OPTIONS: dict[str, Any] = {
    "retries": 1,
    "retry_delay_seconds": 5,
    "retry_condition_fn": retry_if_retryable,
    # Inputs include the server block (and so its API key): never hash them into a cache key.
    "cache_policy": NO_CACHE,
}


# Each endpoint has a sync task (for sync flows) and an async one (``a`` prefix, for async
# flows); both are real Task objects, so ``.submit()``, ``.map()`` and ``.with_options()`` work.


@task(name="embed_images", task_run_name=_run_name("embed_images", "images"), **_TASK_OPTIONS)
def embed_images(model: EmbeddingModel, images: Sequence[ImageInput]) -> np.ndarray:
    """Embed a batch of images with a `Clip` or `PerceptionEncoder` block.

    Returns:
        float32 array ``(len(images), dim)``.

    Examples:
        ```python
        from prefect import flow
        from prefect_roboflow.blocks import Clip
        from prefect_roboflow.blocks.tasks import embed_images

        @flow
        def embed(paths: list[str]):
            return embed_images(Clip.load("BLOCK_NAME"), paths)
        ```
    """
    with record_responses() as infos:
        vectors = model.embed_images(images)
    _log_responses(infos, f"embedded {len(images)} image(s) with {model.label}")
    return vectors


@task(name="embed_images", task_run_name=_run_name("embed_images", "images"), **_TASK_OPTIONS)
async def aembed_images(model: EmbeddingModel, images: Sequence[ImageInput]) -> np.ndarray:
    """Async twin of `embed_images`, for async flows."""
    with record_responses() as infos:
        vectors = await model.aembed_images(images)
    _log_responses(infos, f"embedded {len(images)} image(s) with {model.label}")
    return vectors


@task(name="embed_texts", task_run_name=_run_name("embed_texts", "texts"), **_TASK_OPTIONS)
def embed_texts(model: EmbeddingModel, texts: Sequence[str]) -> np.ndarray:
    """Embed a batch of texts with a `Clip` or `PerceptionEncoder` block: ``(len(texts), dim)``."""
    with record_responses() as infos:
        vectors = model.embed_texts(texts)
    _log_responses(infos, f"embedded {len(texts)} text(s) with {model.label}")
    return vectors


@task(name="embed_texts", task_run_name=_run_name("embed_texts", "texts"), **_TASK_OPTIONS)
async def aembed_texts(model: EmbeddingModel, texts: Sequence[str]) -> np.ndarray:
    """Async twin of `embed_texts`, for async flows."""
    with record_responses() as infos:
        vectors = await model.aembed_texts(texts)
    _log_responses(infos, f"embedded {len(texts)} text(s) with {model.label}")
    return vectors


@task(name="compare", task_run_name=_run_name("compare", "prompts"), **_TASK_OPTIONS)
def compare(model: EmbeddingModel, image: ImageInput, prompts: Sequence[str]) -> np.ndarray:
    """Similarity of one image to each prompt: float32 ``(len(prompts),)``."""
    with record_responses() as infos:
        similarities = model.compare(image, prompts)
    _log_responses(infos, f"compared an image with {len(prompts)} prompt(s) using {model.label}")
    return similarities


@task(name="compare", task_run_name=_run_name("compare", "prompts"), **_TASK_OPTIONS)
async def acompare(model: EmbeddingModel, image: ImageInput, prompts: Sequence[str]) -> np.ndarray:
    """Async twin of `compare`, for async flows."""
    with record_responses() as infos:
        similarities = await model.acompare(image, prompts)
    _log_responses(infos, f"compared an image with {len(prompts)} prompt(s) using {model.label}")
    return similarities


@task(name="detect", task_run_name=_run_name("detect", "images"), **_TASK_OPTIONS)
def detect(
    detector: OwlV2,
    images: Sequence[ImageInput],
    examples: Sequence[ReferenceExample],
    confidence: float | None = None,
) -> list[sv.Detections]:
    """Few-shot detection over a batch of images: one `sv.Detections` per image."""
    with record_responses() as infos:
        detections = detector.detect_batch(images, examples, confidence)
    _log_detections(infos, detections, detector)
    return detections


@task(name="detect", task_run_name=_run_name("detect", "images"), **_TASK_OPTIONS)
async def adetect(
    detector: OwlV2,
    images: Sequence[ImageInput],
    examples: Sequence[ReferenceExample],
    confidence: float | None = None,
) -> list[sv.Detections]:
    """Async twin of `detect`, for async flows."""
    with record_responses() as infos:
        detections = await detector.adetect_batch(images, examples, confidence)
    _log_detections(infos, detections, detector)
    return detections


def _log_detections(infos: Sequence[ResponseInfo], detections: Sequence[sv.Detections], detector: OwlV2) -> None:
    found = sum(len(d) for d in detections)
    _log_responses(infos, f"found {found} object(s) in {len(detections)} image(s) with {detector.label}")
