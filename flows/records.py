"""The typed objects that carry images through the steps: `ImageRecord`, `Failure`, `Batch`.

One `ImageRecord` per image (or crop) travels through every step; each step returns new
records with its result filled in (records are immutable), or with a `Failure` saying why not.
A failed record stays in its batch, and later steps pass it through untouched, so every input
ends as a row. A `Batch` is one task's worth of records plus what each step reported of it.

```python
batch = Batch.of(["a.jpg", "b.jpg"])          # references; bytes are read by the first step
Batch.of(["clip.mp4"], video_fps=0.5)         # a video: its sampled frames (clip.mp4#frame=N), as the flows take them
batch = embed(clip, batch)                    # a Prefect task: one run, cached per image
[r.embedding.shape for r in batch.ok]        # [(512,), (512,)]
[r.failure.reason for r in batch.failed]     # []
```
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from prefect_roboflow.blocks import InferenceError, InvalidInputError, ResponseInfo

if TYPE_CHECKING:
    import numpy as np
    import supervision as sv

__all__ = ["Batch", "Crop", "Failure", "ImageRecord", "Label", "LabelSet", "StepReport"]

#: How `Batch.of` turns references into records (a video into its sampled frames): the one
#: expansion the flows use, `_steps.sources.expand_refs`, which registers itself here when it is
#: imported (it imports this module, so this one cannot import it back).
_expand: Callable[[Iterable[str], float | None, str], Iterator[ImageRecord]] | None = None


def register_expansion(expand: Callable[[Iterable[str], float | None, str], Iterator[ImageRecord]]) -> None:
    """Set how `Batch.of` expands references (see `_expand`)."""
    global _expand
    _expand = expand


@dataclass(frozen=True)
class Failure:
    """Why a record has no result: the step that failed it and the reason, as a user reads it.

    Attributes:
        step: ``"read"``, ``"detect"``, ``"crop"``, ``"embed"``...
        reason: The input problem (``"image is empty (0 bytes)"``) or the server's error
            (``"InferenceServerError: /clip/embed_image: HTTP 500 ..."``).
        error_type: The exception class name, for filtering.
    """

    step: str
    reason: str
    error_type: str = ""

    @classmethod
    def of(cls, step: str, error: InferenceError) -> Failure:
        """The failure an error stands for: an input problem by its reason, a server error by type and message."""
        if isinstance(error, InvalidInputError):
            return cls(step, error.reason, type(error).__name__)
        return cls(step, f"{type(error).__name__}: {error}", type(error).__name__)


@dataclass(frozen=True)
class Crop:
    """Where a crop came from: its parent image and the detection it shows.

    Attributes:
        parent_sha256: sha256 of the parent image's bytes.
        detection_index: Index of the detection in the parent's `sv.Detections`.
        xyxy: The detected box in the parent's pixels, clipped to the image (before padding).
        detector_class: The class the detector gave it.
        detector_confidence: The detector's score.
        tracker_id: For a crop of a video frame, the tracked object it shows (same id in every
            frame of that video where the tracker follows it); None elsewhere.
    """

    parent_sha256: str
    detection_index: int
    xyxy: tuple[float, float, float, float]
    detector_class: str
    detector_confidence: float | None
    tracker_id: int | None = None


@dataclass(frozen=True)
class Label:
    """A zero-shot label: the best prompt, its cosine similarity, and the similarity to every prompt."""

    name: str
    score: float
    scores: tuple[float, ...]


@dataclass(frozen=True)
class LabelSet:
    """Label prompts and their embeddings, made by one model (what `classify` compares with).

    Attributes:
        model: The model that embedded them, e.g. ``"clip ViT-B-16"``; only embeddings of the
            same model can be classified against them.
        names: The prompts, in order.
        vectors: float32 ``(len(names), dim)``.
    """

    model: str
    names: tuple[str, ...]
    vectors: np.ndarray = field(repr=False, compare=False)


@dataclass(frozen=True)
class ImageRecord:
    """One image or crop on its way through the steps.

    Attributes:
        ref: The image's reference as given (path or URL); a crop keeps its parent's.
        sha256: sha256 of the bytes (the image's, or the crop's JPEG); keys every cache.
        data: The encoded bytes, once read (never in reprs).
        crop: For a crop, where it came from; None for a whole image.
        detections: What `detect` found in the image.
        embedding: What `embed` returned (float32).
        label: What `classify` chose.
        failure: Why a step could not produce its result; later steps skip the record.
        frame_index: For a frame of a video (``ref`` ``clip.mp4#frame=120``), its index in the
            decoded stream; None for a photo.
        frame_time_s: For a frame of a video, its presentation time in seconds; None for a photo.

    A whole image's bytes do not travel with it: pickled (to a Dask worker, to the flow process
    from one, to a result store), a record keeps its ``ref`` and ``sha256`` and the step that
    needs the bytes reads them again where it runs, checked against that ``sha256``. A crop and a
    video frame keep their bytes: they cannot be read again from a reference.

    Examples:
        ```python
        record = load(ImageRecord("a.jpg"))   # bytes and sha256 read here
        pickle.loads(pickle.dumps(record))    # ImageRecord(ref='a.jpg', sha256='9f2c...'): no bytes
        ```
    """

    ref: str
    sha256: str | None = None
    data: bytes | None = field(default=None, repr=False, compare=False)
    crop: Crop | None = None
    detections: sv.Detections | None = field(default=None, compare=False)
    embedding: np.ndarray | None = field(default=None, repr=False, compare=False)
    label: Label | None = None
    failure: Failure | None = None
    frame_index: int | None = None
    frame_time_s: float | None = None

    def __getstate__(self) -> dict[str, Any]:
        """What pickling keeps: everything but a whole image's bytes (references travel, not pixels)."""
        state = dict(self.__dict__)
        if self.crop is None and self.frame_index is None:
            state["data"] = None
        return state

    def __copy__(self) -> ImageRecord:
        return replace(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> ImageRecord:
        return replace(self, **{name: copy.deepcopy(value, memo) for name, value in self.__dict__.items()})

    @property
    def ok(self) -> bool:
        """Whether no step has failed this record."""
        return self.failure is None

    @property
    def loaded(self) -> bool:
        """Whether its bytes and hash are at hand."""
        return self.data is not None and self.sha256 is not None

    def with_result(self, **results: Any) -> ImageRecord:
        """A copy with step results filled in."""
        return replace(self, **results)

    def failed(self, failure: Failure) -> ImageRecord:
        """A copy that carries ``failure``."""
        return replace(self, failure=failure)


@dataclass
class StepReport:
    """What one step did to one batch: counts, time, and the server's answers.

    ``dropped``: for ``detect``, the boxes that lay wholly outside their image (OWLv2's padding),
    left out of the detections.
    """

    step: str
    model: str = ""
    items: int = 0
    cached: int = 0
    sent: int = 0
    failed: int = 0
    seconds: float = 0.0
    infos: list[ResponseInfo] = field(default_factory=list, repr=False)
    dropped: int = 0


class Batch(Sequence[ImageRecord]):
    """Records processed together by one task run, and the reports of the steps they went through.

    Attributes:
        records: The records, in input order (crops in their parents' order).
        label: Which batch of the run, e.g. ``"3/12"``; task-run names show it.
        reports: One `StepReport` per step this batch went through, in order.
        parents: For a batch of crops, the images they were cut from (every image of the batch
            that `crop` took, failed ones and ones without detections included); else empty.

    Not a dataclass, on purpose: Prefect walks a task's parameters (twice per task run) through
    lists, dicts, dataclasses and pydantic models, looking for futures to resolve. A batch holds
    none, and walking its records' fields cost ~10 ms of CPU per task run; Prefect stops at this
    class.
    """

    __slots__ = ("label", "parents", "records", "reports")

    def __init__(
        self,
        records: list[ImageRecord],
        label: str = "1/1",
        reports: list[StepReport] | None = None,
        parents: list[ImageRecord] | None = None,
    ) -> None:
        self.records = records
        self.label = label
        self.reports = [] if reports is None else reports
        self.parents = [] if parents is None else parents

    def __repr__(self) -> str:
        return (
            f"Batch(records={self.records!r}, label={self.label!r}, reports={self.reports!r}, parents={self.parents!r})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Batch):
            return NotImplemented
        return (self.records, self.label, self.reports, self.parents) == (
            other.records,
            other.label,
            other.reports,
            other.parents,
        )

    __hash__ = None  # type: ignore[assignment]  # mutable, as the dataclass it replaces

    def __getstate__(self) -> tuple[list[ImageRecord], str, list[StepReport], list[ImageRecord]]:
        return self.records, self.label, self.reports, self.parents

    def __setstate__(self, state: tuple[list[ImageRecord], str, list[StepReport], list[ImageRecord]]) -> None:
        self.records, self.label, self.reports, self.parents = state

    @classmethod
    def of(
        cls, refs: Iterable[str], label: str = "1/1", *, video_fps: float | None = 1.0, video_sample: str = "fps"
    ) -> Batch:
        """A batch of image references, not yet read; a video (``.mp4 .mov .avi .mkv .webm .m4v``)
        becomes its sampled frames (``clip.mp4#frame=N``, read as they decode), exactly as the flows
        take it: ``video_fps`` frames per second of video time (None: every frame), ``video_sample``
        ``"fps"``, ``"keyframes"`` or ``"scene"``.

        Raises:
            InvalidInputError: naming ``video_fps`` or ``video_sample``, before anything is read.
        """
        if _expand is None:  # set when the flows package is imported, before any caller can get here
            raise RuntimeError("prefect_roboflow.flows was not imported")
        return cls(list(_expand(refs, video_fps, video_sample)), label)

    def then(self, records: list[ImageRecord], report: StepReport, parents: list[ImageRecord] | None = None) -> Batch:
        """The batch after a step: its new records, one more report, and the parents kept unless given."""
        return Batch(records, self.label, [*self.reports, report], self.parents if parents is None else parents)

    def by_parent(self) -> list[tuple[ImageRecord, list[ImageRecord]]]:
        """Each parent image with its crops (one per detection, in detection order)."""
        crops = iter(self.records)
        grouped = []
        for parent in self.parents:
            count = len(parent.detections) if parent.ok and parent.detections is not None else 0
            grouped.append((parent, [next(crops) for _ in range(count)]))
        return grouped

    @property
    def ok(self) -> list[ImageRecord]:
        """The records no step has failed."""
        return [r for r in self.records if r.ok]

    @property
    def failed(self) -> list[ImageRecord]:
        """The records some step failed."""
        return [r for r in self.records if not r.ok]

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[ImageRecord]:
        return iter(self.records)

    def __getitem__(self, index: Any) -> Any:
        return self.records[index]
