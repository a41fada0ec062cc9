"""The reusable steps of every flow: Prefect tasks over one `Batch` of image records each.

``detect`` → ``crop`` → ``embed`` → ``classify`` (with ``embed_labels`` once per run) are the
steps the shipped flows chain; compose your own from the same ones. Each call is one task run
(a task costs ~90 ms to run and record, so never one per image) named after the step, the model
and the batch (``embed[clip ViT-B-16] batch 3/12``). Every item's result is cached by content —
the sha256 of its bytes, the model's family and version, and the parameters that change it;
never the API key, the URL or the run — in ``cache`` (a `ContentCache`, a folder, or a saved
file-system block as ``"type-slug/name"``; ``$PREFECT_HOME/prefect-roboflow-cache`` by default),
so a rerun sends nothing. A record that fails stays in the batch, failed, with its reason;
later steps pass it through.

```python
from prefect import flow
from prefect_roboflow.blocks import InferenceServer, PerceptionEncoder
from prefect_roboflow.flows.steps import Batch, embed

@flow
def my_flow(paths: list[str]) -> None:
    pe = PerceptionEncoder(server=InferenceServer(api_url="http://localhost:9001"))
    batch = embed(pe, Batch.of(paths))
    for record in batch:
        print(record.ref, record.embedding.shape if record.ok else record.failure.reason)
```
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture
from prefect.logging import get_run_logger
from pydantic import BaseModel

from prefect_roboflow.blocks import Box, EmbeddingModel, OwlV2, ReferenceExample
from prefect_roboflow.blocks._http import describe_responses
from prefect_roboflow.blocks.exceptions import InvalidInputError
from prefect_roboflow.blocks.owlv2 import training_data
from prefect_roboflow.blocks.tasks import retry_if_retryable, run_name

from ._steps import operations as ops
from ._steps.cache import CacheStorage, resolve_cache
from ._steps.sources import read_bytes
from .records import Batch, Crop, Failure, ImageRecord, Label, LabelSet, StepReport

__all__ = [
    "Batch",
    "Crop",
    "ExampleSpec",
    "Failure",
    "ImageRecord",
    "Label",
    "LabelSet",
    "StepReport",
    "check_example_boxes",
    "classify",
    "crop",
    "detect",
    "embed",
    "embed_labels",
    "reference_examples",
]


def _run_name(step: str) -> Callable[[], str]:
    """``"{step}[{model}] batch {i}/{n}"``, from the task run's own parameters."""

    def name() -> str:
        from prefect.runtime import task_run

        params = task_run.parameters
        model = params.get("model") or params.get("detector")
        who = model.label if model is not None else getattr(params.get("labels"), "model", "")
        batch = params.get("batch")
        if isinstance(batch, PrefectFuture):  # the runtime holds the future; it is resolved by now
            batch = batch.result()
        which = batch.label if isinstance(batch, Batch) else "1/1"
        return run_name(step, who, f"batch {which}")

    return name


def _after(batch: Batch, records: list[ImageRecord], report: StepReport, **kwargs: Any) -> Batch:
    """Log what the step did to the batch, and the batch it leaves."""
    _log(report, batch.label)
    return batch.then(records, report, **kwargs)


def _log(report: StepReport, label: str) -> None:
    get_run_logger().info("%s", describe_step(report, label))


def describe_step(report: StepReport, label: str) -> str:
    """One log line on what a step did to a batch: its counts, and the server's figures only when
    it sent requests (a cached detect or a local crop has none to tell).

    Examples:
        ```python
        describe_step(report, "3/12")
        # 'embed batch 3/12: 128 item(s), 120 from cache, 8 sent in 0.41s; 8 request(s), server model time ...'
        # 'crop batch 3/12: 40 item(s), 1 failed in 0.02s'
        ```
    """
    counts = [f"{report.items} item(s)"]
    counts += [f"{n} {what}" for n, what in ((report.cached, "from cache"), (report.sent, "sent")) if n]
    counts += [f"{report.failed} failed"] if report.failed else []
    line = f"{report.step} batch {label}: {', '.join(counts)} in {report.seconds:.2f}s"
    return f"{line}; {describe_responses(report.infos)}" if report.infos else line


#: Every step: retried once when it failed in a retryable way (the engine already retried each
#: request). The per-item content cache does the caching: inputs hold the server block and its key.
STEP_OPTIONS: dict[str, Any] = {
    "retries": 1,
    "retry_delay_seconds": 5,
    "retry_condition_fn": retry_if_retryable,
    "cache_policy": NO_CACHE,
}


@task(name="detect", task_run_name=_run_name("detect"), **STEP_OPTIONS)
def detect(
    detector: OwlV2,
    batch: Batch,
    examples: Sequence[ReferenceExample],
    confidence: float | None = None,
    cache: CacheStorage = None,
) -> Batch:
    """Find objects like the boxed examples in every image of the batch (``record.detections``).

    Args:
        detector: The `OwlV2` block.
        batch: Image records; unread ones are read here.
        examples: Reference images with example boxes (see `reference_examples`).
        confidence: Score threshold; the block's default when omitted. Part of the cache key.
        cache: Where per-image results are kept (see the module docs).
    """
    records, report = ops.detect_records(detector, batch.records, examples, confidence, resolve_cache(cache))
    return _after(batch, records, report)


@task(name="check_example_boxes", task_run_name=_run_name("check_example_boxes"), **STEP_OPTIONS)
def check_example_boxes(
    detector: OwlV2,
    examples: Sequence[ReferenceExample],
    confidence: float | None = None,
    cache: CacheStorage = None,
) -> list[str]:
    """Look for each positive example box in its own reference image, with all the examples: a
    warning (text, for the run's log and summary) for each box OWLv2 does not give back there (no
    detection of its class with IoU ≥ 0.5), as it will hardly find that object anywhere else. One
    request per distinct reference image, cached like `detect`'s (a rerun sends nothing).

    Args:
        detector: The `OwlV2` block.
        examples: Reference images with example boxes (see `reference_examples`).
        confidence: Score threshold, as the run's `detect` uses it.
        cache: Where per-image results are kept (see the module docs).
    """
    return ops.unfound_examples(detector, examples, confidence, resolve_cache(cache))


@task(name="crop", task_run_name=_run_name("crop"), **STEP_OPTIONS)
def crop(batch: Batch, padding: int = 0) -> Batch:
    """One crop record per detection (``record.crop`` says where from), as JPEG bytes of the box
    padded by ``padding`` pixels and clipped to the image. The batch's images become its ``parents``."""
    if padding < 0:
        raise InvalidInputError("padding", f"must be at least 0, got {padding}")
    crops, parents, report = ops.crop_records(batch.records, padding)
    return _after(batch, crops, report, parents=parents)


@task(name="embed", task_run_name=_run_name("embed"), **STEP_OPTIONS)
def embed(model: EmbeddingModel, batch: Batch, cache: CacheStorage = None) -> Batch:
    """Embed every image or crop of the batch with a `Clip` or `PerceptionEncoder` block (``record.embedding``)."""
    records, report = ops.embed_records(model, batch.records, resolve_cache(cache))
    return _after(batch, records, report)


@task(name="embed_labels", task_run_name=_run_name("embed_labels"), **STEP_OPTIONS)
def embed_labels(model: EmbeddingModel, labels: Sequence[str], cache: CacheStorage = None) -> LabelSet:
    """Embed the label prompts once per run (each cached by its text), for `classify`."""
    if isinstance(labels, str) or not labels:
        raise InvalidInputError("labels", "give a non-empty list of label prompts")
    label_set, report = ops.embed_label_texts(model, list(labels), resolve_cache(cache))
    _log(report, "1/1")
    return label_set


@task(name="classify", task_run_name=_run_name("classify"), **STEP_OPTIONS)
def classify(batch: Batch, labels: LabelSet, min_score: float | None = None) -> Batch:
    """Label every embedded record with the prompt it is most similar to (``record.label``); a best
    similarity under ``min_score`` gives ``"unknown"``."""
    records, report = ops.classify_records(batch.records, labels, min_score)
    return _after(batch, records, report)


class ExampleSpec(BaseModel):
    """A reference example as flow parameters: an image reference (path or https URL) and its boxes."""

    image: str
    boxes: list[Box]


def reference_examples(examples: Sequence[ExampleSpec | dict[str, Any]]) -> list[ReferenceExample]:
    """Reference examples with their images read, from flow parameters.

    Raises:
        InvalidInputError: naming ``examples[i]...``, for a missing list, an unreadable image or a bad box.
    """
    if not examples:
        raise InvalidInputError("examples", "give at least one reference example")
    built = []
    for i, example in enumerate(examples):
        spec = example if isinstance(example, ExampleSpec) else ExampleSpec.model_validate(example)
        data = read_bytes(spec.image, f"examples[{i}].image")
        built.append(ReferenceExample(image=data, boxes=spec.boxes))
    training_data(built)  # each box on its image, checked before any request (as the detect step will)
    return built
