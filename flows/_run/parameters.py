"""Every flow parameter checked in one place, before any request, listing or write.

Each shipped flow declares its parameters' contract here once, as a pydantic model (types,
ranges, non-empty values, rules across parameters); `FlowParameters.check` raises
`InvalidInputError` naming the parameter (a dotted path such as ``examples[0].boxes[1].w``). The
contract is checked once per call, where the parameters become objects: by the flow class
(`_run.flow`) before Prefect casts them (so ``batch_size=True`` is refused rather than read as 1),
for a call, a sub-flow, a deployment's run or a shard alike. The contract only checks: the flow
goes on with the values it was given. (``flow.fn(...)`` calls the bare function, without Prefect
and so without its parameter checks.)

Beside it, where a flow writes and the index it adds to, resolved and checked before any request.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from prefect.exceptions import ParameterTypeError
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from prefect_roboflow.blocks import Box, EmbeddingModel
from prefect_roboflow.blocks._model import ModelBlock
from prefect_roboflow.blocks.exceptions import InvalidInputError
from prefect_roboflow.blocks.owlv2 import check_examples

from .._outputs.dataset import EXPORT_FORMATS
from .._storage.access import check_output
from .._storage.locate import split_url
from .._video.sample import VideoSampling, check_sampling
from .fanout import FanOut, Shard

__all__ = [
    "CONTRACTS",
    "AutoLabelParameters",
    "ClassifyImagesParameters",
    "CurateImagesParameters",
    "DetectCropClassifyParameters",
    "EmbedImagesParameters",
    "FindDuplicatesParameters",
    "FlowParameterError",
    "FlowParameters",
    "MonitorDriftParameters",
    "SearchImagesParameters",
    "check_index",
    "contract_of",
    "ensure_out_dir",
    "resolve_out_dir",
]


class FlowParameterError(InvalidInputError, ParameterTypeError):
    """A flow parameter outside its contract: an `InvalidInputError` naming it, and the
    `ParameterTypeError` Prefect raises for parameters it cannot cast, so code catching either
    sees it."""

    def __init__(self, field: str, message: str) -> None:
        InvalidInputError.__init__(self, field, message)

    def __reduce__(self) -> tuple[Any, ...]:  # picklable, as Prefect keeps a failed run's error
        return (type(self), (self.field, self.reason))


# -- the values a contract is made of ------------------------------------------------------------


def _not_bool(value: Any) -> Any:
    """Refuse a bool where a number is meant (pydantic would read ``True`` as 1), and NaN or an
    infinity (which compare false with every bound)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value}")
    return value


def _text(value: Any) -> Any:
    if isinstance(value, str) and not value.strip():
        raise ValueError("must not be empty or blank")
    return value


def _unique(values: list[str]) -> list[str]:
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise ValueError(f"each value once; repeated: {repeated}")
    return values


#: A count: a whole number of at least 1 (``batch_size``, ``top_k``).
Count = Annotated[int, BeforeValidator(_not_bool), Field(ge=1)]
#: A share or probability, in [0, 1] (``max_failure_rate``, ``confidence``, auto_label's ``min_probability``).
Fraction = Annotated[float, BeforeValidator(_not_bool), Field(ge=0.0, le=1.0, allow_inf_nan=False)]
#: A rate above 0 (``video_fps``: frames per second of video time).
Rate = Annotated[float, BeforeValidator(_not_bool), Field(gt=0.0, allow_inf_nan=False)]
#: A cosine similarity, in [-1, 1] (every flow's ``min_score``).
Similarity = Annotated[float, BeforeValidator(_not_bool), Field(ge=-1.0, le=1.0, allow_inf_nan=False)]
#: Text that is not empty or blank (a prompt, a query, a path, a version).
Text = Annotated[str, AfterValidator(_text)]
#: Label prompts: at least one, none blank, none twice.
Prompts = Annotated[list[Text], Field(min_length=1), AfterValidator(_unique)]
Family = Literal["clip", "perception_encoder"]


def _image_source(value: Any, info: ValidationInfo) -> Any:
    """A folder, a glob, a URL, or a list of them: not empty, no blank reference."""
    if isinstance(value, (str, os.PathLike)):
        if not os.fspath(value).strip():
            raise ValueError("give a folder, a glob, a URL or a list of them, not an empty string")
        return value
    if not isinstance(value, Sequence):
        raise ValueError(f"expected a folder, a glob or a list of image references, got {type(value).__name__}")
    if len(value) == 0:
        raise ValueError("no images given")
    for i, ref in enumerate(value):
        if not isinstance(ref, (str, os.PathLike)) or not os.fspath(ref).strip():
            raise InvalidInputError(f"{info.field_name}[{i}]", f"expected a path or URL, got {ref!r:.80}")
    return value


def _classes(value: Any) -> Any:
    """auto_label's ``classes``: a list of prompts, or class name → a prompt or prompts."""
    if isinstance(value, str) or not isinstance(value, (Sequence, Mapping)) or not value:
        raise ValueError("give a list of prompts or a mapping of class name to prompts")
    if not isinstance(value, Mapping):
        for i, prompt in enumerate(value):
            _prompt(prompt, f"classes[{i}]")
        _unique(list(value))
        return value
    for name, given in value.items():
        listed = [given] if isinstance(given, str) else given
        if not isinstance(name, str) or not name.strip() or not isinstance(listed, Sequence) or not listed:
            raise InvalidInputError(f"classes[{name!r}]", "each class needs a name and at least one prompt")
        for prompt in listed:
            _prompt(prompt, f"classes[{name!r}]")
    return value


def _prompt(value: Any, field: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise InvalidInputError(field, f"expected a non-empty prompt, got {value!r:.80}")


def _formats(value: list[str]) -> list[str]:
    unknown = [f for f in value if f not in EXPORT_FORMATS]
    if unknown:
        raise ValueError(f"expected some of {list(EXPORT_FORMATS)}, got {unknown}")
    return value


ImageRefs = Annotated[Any, AfterValidator(_image_source)]
Classes = Annotated[Any, AfterValidator(_classes)]
Formats = Annotated[list[str], Field(min_length=1), AfterValidator(_formats)]


class Example(BaseModel):
    """A reference example as a flow takes it: an image reference and at least one box."""

    model_config = ConfigDict(from_attributes=True)

    image: Text
    boxes: list[Box] = Field(min_length=1)


# -- the contracts -----------------------------------------------------------------------------


class FlowParameters(BaseModel):
    """The contract of one flow's parameters; a subclass per flow, its fields named as the flow's
    parameters (a parameter the contract does not name is left to the flow's signature)."""

    model_config = ConfigDict(extra="ignore", frozen=True, from_attributes=True, arbitrary_types_allowed=True)

    #: The flow function's name, e.g. ``"embed_images"``.
    flow: ClassVar[str]

    @classmethod
    def check(cls, values: Mapping[str, Any]) -> None:
        """Check a flow's parameters (``locals()`` at the top of its body, or the call's).

        Raises:
            FlowParameterError: an `InvalidInputError` naming the first parameter that breaks the contract.
        """
        try:
            cls.model_validate(dict(values))
        except ValidationError as error:
            raise _first_error(error) from None


def _first_error(error: ValidationError) -> FlowParameterError:
    """The first error of a validation, as the parameter's path and a reason."""
    first = error.errors(include_url=False)[0]
    raised = first.get("ctx", {}).get("error")
    if isinstance(raised, InvalidInputError):  # a rule that names the parameter itself
        return FlowParameterError(raised.field, raised.reason)
    path = ""
    for part in first["loc"]:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    message = str(first["msg"]).removeprefix("Value error, ")
    if first["type"] != "value_error" and "input" in first and ", got" not in message:
        message += f", got {first['input']!r:.80}"
    return FlowParameterError(path or "parameters", message)


class _BatchFlowParameters(FlowParameters):
    """What every flow over a batch of images takes."""

    images: ImageRefs
    out_dir: Text
    model: Family
    version: Text | None
    batch_size: Count
    max_failure_rate: Fraction
    # a batch flow that fans out takes both (their default covers a flow that does not)
    fan_out: FanOut | None = None
    shard: Shard | None = None

    # video sources: how frames are sampled (see `check_video`)
    video_fps: Rate | None = 1.0
    video_sample: Literal["fps", "keyframes", "scene"] = "fps"

    @model_validator(mode="after")
    def _fan_out_or_shard(self) -> _BatchFlowParameters:
        if self.fan_out is not None and self.shard is not None:
            raise InvalidInputError("fan_out", "a shard's run does not fan out again: give fan_out or shard, not both")
        return self


class _DetectingParameters(_BatchFlowParameters):
    """What the flows that detect with OWLv2 examples take besides."""

    examples: Annotated[list[Example], Field(min_length=1)]
    detector_version: Text | None
    confidence: Fraction

    @model_validator(mode="after")
    def _a_positive_box_per_class(self) -> _DetectingParameters:
        check_examples([{"image": e.image, "boxes": e.boxes} for e in self.examples])
        return self


class EmbedImagesParameters(_BatchFlowParameters):
    """`embed_images`."""

    flow = "embed_images"
    index_path: Text | None


class ClassifyImagesParameters(_BatchFlowParameters):
    """`classify_images`."""

    flow = "classify_images"
    labels: Prompts
    min_score: Similarity | None
    index_path: Text | None


class DetectCropClassifyParameters(_DetectingParameters):
    """`detect_crop_classify`."""

    flow = "detect_crop_classify"
    labels: Prompts
    padding: Annotated[int, BeforeValidator(_not_bool), Field(ge=0)]
    min_score: Similarity | None


class AutoLabelParameters(_DetectingParameters):
    """`auto_label`."""

    flow = "auto_label"
    classes: Classes
    formats: Formats
    min_score: Similarity | None
    min_probability: Fraction


class FindDuplicatesParameters(FlowParameters):
    """`find_duplicates`."""

    flow = "find_duplicates"
    source: Text
    out_dir: Text
    threshold: Annotated[float, BeforeValidator(_not_bool), Field(gt=0.0, le=1.0, allow_inf_nan=False)]
    k: Annotated[int, BeforeValidator(_not_bool), Field(ge=1, le=100)]


class SearchImagesParameters(FlowParameters):
    """`search_images`."""

    flow = "search_images"
    query: Text
    embeddings_path: Text
    top_k: Count


class MonitorDriftParameters(FlowParameters):
    """`monitor_drift`."""

    flow = "monitor_drift"
    current: ImageRefs
    out_dir: Text
    reference: ImageRefs | None
    methods: Annotated[
        list[Literal["domain_classifier", "mean_cosine", "share_drifted", "mmd"]],
        Field(min_length=1),
        AfterValidator(_unique),
    ]
    alpha: Annotated[float, BeforeValidator(_not_bool), Field(gt=0.0, le=0.5, allow_inf_nan=False)]
    thresholds: dict[str, Annotated[float, BeforeValidator(_not_bool), Field(allow_inf_nan=False)]] | None
    permutations: Annotated[int, BeforeValidator(_not_bool), Field(ge=19, le=100_000)]
    save_baseline: bool
    baseline_dir: Text | None
    model: Family
    version: Text | None
    batch_size: Count
    cache_storage: Text | None
    seed: Annotated[int, BeforeValidator(_not_bool), Field(ge=0)]
    max_failure_rate: Fraction

    @model_validator(mode="after")
    def _rule_reachable(self) -> MonitorDriftParameters:
        unknown = sorted(set(self.thresholds or {}) - set(self.methods))
        if unknown:
            raise InvalidInputError("thresholds", f"for methods this run does not use: {unknown}")
        each = self.alpha / len(self.methods)  # each method's share of alpha
        if (self.permutations + 1) * each < 1:
            raise InvalidInputError(
                "permutations",
                f"{self.permutations} permutations cannot give a p-value of at most {each:g} "
                f"(alpha {self.alpha} over {len(self.methods)} method(s)): give at least {math.ceil(1 / each) - 1}",
            )
        return self


def _curation_source(value: Any) -> Any:
    """A table or index path, or split name → table or index path: none empty."""
    if isinstance(value, str):
        return _text(value)
    if not isinstance(value, Mapping) or not value:
        raise ValueError("give a table or index path, or a mapping of split name to one")
    for name, path in value.items():
        if not isinstance(name, str) or not name.strip() or not isinstance(path, str) or not path.strip():
            raise InvalidInputError(
                f"source[{name!r}]", f"expected a split name and a table or index path, got {path!r:.80}"
            )
    return value


class CurateImagesParameters(FlowParameters):
    """`curate_images`."""

    flow = "curate_images"
    source: Annotated[Any, AfterValidator(_curation_source)]
    out_dir: Text
    budget: Annotated[int, BeforeValidator(_not_bool), Field(ge=0)]
    threshold: Annotated[float, BeforeValidator(_not_bool), Field(gt=0.0, le=1.0, allow_inf_nan=False)]
    leak_threshold: Annotated[float, BeforeValidator(_not_bool), Field(gt=0.0, le=1.0, allow_inf_nan=False)] | None
    k: Annotated[int, BeforeValidator(_not_bool), Field(ge=3, le=100)]
    split_column: Text
    labels: Text | None
    reviewed: Text | None = None
    classes: Prompts | None
    cache_storage: Text | None
    gallery_rows: Annotated[int, BeforeValidator(_not_bool), Field(ge=0, le=1000)]
    seed: Annotated[int, BeforeValidator(_not_bool), Field(ge=0)]

    @model_validator(mode="after")
    def _reviewed_boxes_need_predictions(self) -> CurateImagesParameters:
        if self.reviewed is not None and self.labels is None:
            raise InvalidInputError(
                "reviewed", "reviewed boxes are judged against a labelled table's detections: give labels"
            )
        return self


#: Each shipped flow's contract, by the flow function's name.
CONTRACTS: dict[str, type[FlowParameters]] = {
    c.flow: c
    for c in (
        EmbedImagesParameters,
        ClassifyImagesParameters,
        DetectCropClassifyParameters,
        AutoLabelParameters,
        FindDuplicatesParameters,
        SearchImagesParameters,
        MonitorDriftParameters,
        CurateImagesParameters,
    )
}


def contract_of(fn: Callable[..., Any]) -> Callable[[Mapping[str, Any]], None] | None:
    """The check of a shipped flow function's contract, taking the call's parameters (its
    defaults filled in), or None for a function without one."""
    contract = CONTRACTS.get(getattr(fn, "__name__", ""))
    if contract is None or not getattr(fn, "__module__", "").startswith(__name__.rsplit(".", 2)[0]):
        return None
    signature = inspect.signature(fn)

    def check(parameters: Mapping[str, Any]) -> None:
        defaults = {n: p.default for n, p in signature.parameters.items() if p.default is not p.empty}
        contract.check({**defaults, **parameters})

    return check


def check_index(index_path: str | None, model: ModelBlock) -> None:
    """Open (or create) the vector index a run will add to, before any request, and refuse one
    that holds another model's or version's rows.

    Raises:
        InvalidInputError: naming ``index_path``.
    """
    if index_path is None:
        return
    from ..vector_index import VectorIndex

    try:
        index = VectorIndex.open(index_path, create=True)
    except InvalidInputError as error:
        raise InvalidInputError("index_path", error.reason) from None
    if index.family is not None and (index.family, index.version) != (model.family, model.version):
        raise InvalidInputError(
            "index_path", f"holds {index.family} {index.version} rows; this run embeds with {model.label}"
        )
    dim = index.dim
    if dim and isinstance(model, EmbeddingModel) and model.learn_dimension(dim) != dim:
        raise InvalidInputError(
            "index_path", f"holds {dim}-value rows; {model.label} embeddings have {model.dimension}"
        )


def ensure_out_dir(out_dir: str | os.PathLike[str]) -> Path:
    """The output folder, created.

    Raises:
        InvalidInputError: naming ``out_dir``, when it is a file or cannot be created.
    """
    path = Path(out_dir).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise InvalidInputError("out_dir", f"{out_dir} exists and is not a folder") from None
    except OSError as exc:
        raise InvalidInputError("out_dir", f"cannot create {out_dir}: {exc.strerror}") from None
    return path


def resolve_out_dir(out_dir: str | os.PathLike[str]) -> str:
    """Where a flow writes its outputs, checked before any request; output names are joined onto
    it with `_storage.join`.

    ``out_dir`` is a local folder (made absolute and created, as `ensure_out_dir` does; also as a
    ``file://`` URL) or an object-store location: ``s3://bucket/prefix/`` (the standard AWS
    configuration, ``AWS_ENDPOINT_URL`` included), any fsspec URL (``gs://``, ``az://``…), or a
    saved file-system block plus a path, ``block://s3-bucket/<name>/<prefix>``. A bucket is checked
    with one request; nothing is created in it until the run writes.

    Raises:
        InvalidInputError: naming ``out_dir``: a file, a folder that cannot be created, a bucket
            that does not exist or cannot be reached, no credentials, an unknown or read-only URL
            scheme, credentials in the URL.

    Examples:
        ```python
        resolve_out_dir("out/run-1")  # '/home/me/project/out/run-1'
        resolve_out_dir("s3://results/run-1/")  # 's3://results/run-1/'
        ```
    """
    location = os.fspath(out_dir)
    scheme, rest = split_url(location)
    if scheme == "file":
        host, _, path = rest.partition("/")
        if host not in {"", "localhost"}:
            raise InvalidInputError("out_dir", f"file:// URLs name this machine, not {host!r}")
        return str(ensure_out_dir("/" + path))
    if not scheme:
        return str(ensure_out_dir(location))
    if scheme in {"http", "https"}:
        raise InvalidInputError("out_dir", f"{scheme}:// URLs cannot be written to: give a folder or a bucket")
    check_output(location, field="out_dir")
    return location


def check_video(video_fps: float | None, video_sample: str) -> VideoSampling:
    """How a run samples its videos' frames (``video_fps``, ``video_sample``), checked before any request.

    Raises:
        InvalidInputError: naming ``video_fps`` (zero, negative, not finite) or ``video_sample``
            (not ``"fps"``, ``"keyframes"`` or ``"scene"``).
    """
    return check_sampling(video_fps, video_sample)
