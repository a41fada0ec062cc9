"""The `OwlV2` block: few-shot object detection from example boxes, via ``/owlv2/infer``."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ._compat import async_dispatch
from ._model import ModelBlock, Outcome, require_items
from ._resize import PreparedImage, ResizePlan, prepare_image, prepare_images
from .exceptions import InferenceError, InferenceResponseError, InvalidInputError
from .images import ImageInput
from .server import DOCS_URL, LOGO_URL

if TYPE_CHECKING:
    import supervision as sv

__all__ = ["Box", "OwlV2", "ReferenceExample"]

ENDPOINT = "/owlv2/infer"


class Box(BaseModel):
    """An example box on a reference image: **centre** ``x, y`` and size ``w, h`` in pixels, as the
    server's ``TrainBox`` takes it. Every box the library returns is corners (``xyxy``, as
    `supervision.Detections` holds them): give corners with ``xyxy=`` or `Box.from_xyxy`, and read
    a box's corners with `Box.xyxy`.

    The server takes whole pixels; fractional values are rounded when sent.

    Examples:
        ```python
        Box(x=160, y=120, w=80, h=80, cls="screw")  # centre (160, 120), 80 × 80
        Box(xyxy=(120, 80, 200, 160), cls="screw")  # the same box, by its corners
        Box.from_xyxy((120, 80, 200, 160), "screw")  # the same box
        Box(x=160, y=120, w=80, h=80, cls="screw").xyxy  # (120.0, 80.0, 200.0, 160.0)
        ```
    """

    model_config = ConfigDict(frozen=True)

    x: float = Field(description="Horizontal centre, in pixels of the reference image.")
    y: float = Field(description="Vertical centre, in pixels of the reference image.")
    w: float = Field(gt=0, description="Width in pixels.")
    h: float = Field(gt=0, description="Height in pixels.")
    cls: str = Field(min_length=1, description="Class name the box shows an example of.")
    negative: bool = Field(default=False, description="True for a counter-example of the class.")

    @model_validator(mode="before")
    @classmethod
    def _from_corners(cls, data: Any) -> Any:
        """``{"xyxy": (x1, y1, x2, y2), "cls": ...}`` (a dict, or YAML and JSON examples) as the centre box."""
        if not isinstance(data, dict) or "xyxy" not in data:
            return data
        if {"x", "y", "w", "h"} & data.keys():
            raise ValueError("give the box by its corners (xyxy) or by its centre and size (x, y, w, h), not both")
        corners = data["xyxy"]
        if isinstance(corners, (str, bytes)) or not isinstance(corners, Sequence) or len(corners) != 4:
            raise ValueError(f"xyxy must be four numbers (x1, y1, x2, y2), got {corners!r:.80}")
        x1, y1, x2, y2 = corners
        rest = {k: v for k, v in data.items() if k != "xyxy"}
        try:
            return {**rest, "x": (x1 + x2) / 2, "y": (y1 + y2) / 2, "w": x2 - x1, "h": y2 - y1}
        except TypeError:
            raise ValueError(f"xyxy must be four numbers (x1, y1, x2, y2), got {corners!r:.80}") from None

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        """The box's corners ``(x1, y1, x2, y2)``, as every box the library returns."""
        return (self.x - self.w / 2, self.y - self.h / 2, self.x + self.w / 2, self.y + self.h / 2)

    @field_validator("x", "y", "w", "h")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @classmethod
    def from_xyxy(cls, xyxy: Sequence[float], name: str, *, negative: bool = False) -> Box:
        """A box from corners ``(x1, y1, x2, y2)``, as `supervision.Detections.xyxy` holds them."""
        return cls.model_validate({"xyxy": tuple(float(v) for v in xyxy), "cls": name, "negative": negative})

    def to_request(self) -> dict[str, Any]:
        """The server's ``TrainBox``: whole pixels."""
        return {
            "x": round(self.x),
            "y": round(self.y),
            "w": max(1, round(self.w)),
            "h": max(1, round(self.h)),
            "cls": self.cls,
            "negative": self.negative,
        }


class ReferenceExample(BaseModel):
    """A reference image and the example boxes drawn on it.

    Examples:
        ```python
        ReferenceExample(image="shelf.jpg", boxes=[Box(x=160, y=120, w=80, h=80, cls="can")])
        ```
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    image: Any = Field(description="The reference image: path, bytes, https URL, BGR array or PIL image.")
    boxes: list[Box] = Field(min_length=1, description="Example boxes on that image.")


def check_examples(examples: Any, field: str = "examples") -> list[ReferenceExample]:
    """Validate reference examples; every class needs at least one positive box."""
    items = require_items(examples, field, "reference examples")
    checked: list[ReferenceExample] = []
    for i, example in enumerate(items):
        try:
            checked.append(
                example if isinstance(example, ReferenceExample) else ReferenceExample.model_validate(example)
            )
        except ValueError as exc:
            raise InvalidInputError(
                f"{field}[{i}]", str(exc).splitlines()[-1].strip() if str(exc) else "invalid"
            ) from None
    positives = {b.cls for e in checked for b in e.boxes if not b.negative}
    for i, example in enumerate(checked):
        for j, box in enumerate(example.boxes):
            if box.cls not in positives:
                # The 1.8.3 engine crashes (HTTP 500) on a class with only negative examples.
                raise InvalidInputError(
                    f"{field}[{i}].boxes[{j}].cls",
                    f"class {box.cls!r} has only negative examples; give at least one positive box",
                )
    return checked


def training_data(
    examples: Sequence[ReferenceExample], field: str = "examples", plan: ResizePlan | None = None
) -> list[dict[str, Any]]:
    """Encode reference examples once (resized per ``plan`` when big, their boxes scaled with
    them), checking each box lies on its image where its size is known."""
    data = []
    for i, example in enumerate(examples):
        prepared = prepare_image(example.image, f"{field}[{i}].image", plan)
        size = prepared.size
        for j, box in enumerate(example.boxes):
            if size is not None and not (0 <= box.x <= size[0] and 0 <= box.y <= size[1]):
                raise InvalidInputError(
                    f"{field}[{i}].boxes[{j}]",
                    f"box centre ({box.x}, {box.y}) lies outside the {size[0]}×{size[1]} reference image",
                )
        data.append({"image": prepared.image, "boxes": [_box_on(prepared, b) for b in example.boxes]})
    return data


def _box_on(prepared: PreparedImage, box: Box) -> dict[str, Any]:
    """A box of the original image as the server's ``TrainBox`` on the image actually sent."""
    if not prepared.resized:
        return box.to_request()
    sx, sy = prepared.scale
    return box.model_copy(update={"x": box.x / sx, "y": box.y / sy, "w": box.w / sx, "h": box.h / sy}).to_request()


def check_confidence(confidence: Any, field: str = "confidence") -> float:
    """A confidence threshold in [0, 1]."""
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)):
        raise InvalidInputError(field, f"expected a number in [0, 1], got {type(confidence).__name__}")
    if not math.isfinite(confidence) or not 0.0 <= confidence <= 1.0:
        raise InvalidInputError(field, f"must lie in [0, 1], got {confidence}")
    return float(confidence)


def to_detections(
    answer: dict[str, Any], class_names: Sequence[str], sent: PreparedImage | None = None
) -> sv.Detections:
    """`supervision.Detections` from an ``/owlv2/infer`` answer.

    ``class_id`` indexes ``class_names`` (the sorted positive classes of the examples), which
    stays stable between requests, unlike the server's own ``class_id``. When ``sent`` was
    resized on the client, boxes and image size are mapped back to the original image.
    """
    import numpy as np
    import supervision as sv

    predictions = answer.get("predictions")
    if not isinstance(predictions, list):
        raise InferenceResponseError("answer has no predictions list", endpoint=ENDPOINT)
    try:
        centres = np.array([[p["x"], p["y"], p["width"], p["height"]] for p in predictions], dtype=np.float32)
        names = [str(p["class"]) for p in predictions]
        confidence = np.array([p["confidence"] for p in predictions], dtype=np.float32)
        detection_ids = [str(p.get("detection_id", "")) for p in predictions]
    except (KeyError, TypeError, ValueError) as exc:
        raise InferenceResponseError(f"malformed prediction: {exc!r}", endpoint=ENDPOINT) from None
    index = {name: i for i, name in enumerate(class_names)}
    xyxy = np.empty((len(predictions), 4), dtype=np.float32)
    if len(predictions):
        xyxy[:, :2] = centres[:, :2] - centres[:, 2:] / 2
        xyxy[:, 2:] = centres[:, :2] + centres[:, 2:] / 2
    if sent is not None and sent.resized:
        xyxy *= np.array(sent.scale * 2, dtype=np.float32)
    image = answer.get("image")
    size: tuple[Any, Any] = (None, None)
    if sent is not None and sent.resized and sent.size is not None:
        size = sent.size
    elif isinstance(image, dict):
        size = (image.get("width"), image.get("height"))
    raw = xyxy.copy()
    if all(isinstance(v, int | float) and v > 0 for v in size):
        # The one box policy: boxes leave the library clipped to the image; the server's own box
        # (which may reach past the edges) is kept only in the "raw_xyxy" column.
        xyxy = sv.clip_boxes(xyxy, (int(size[0]), int(size[1]))).astype(np.float32)
    detections = sv.Detections(
        xyxy=xyxy,
        confidence=confidence,
        class_id=np.array([index.get(n, -1) for n in names], dtype=int),
        data={
            "class_name": np.array(names, dtype=str),
            "detection_id": np.array(detection_ids, dtype=str),
            "raw_xyxy": raw,
        },
    )
    detections.metadata["image_width"], detections.metadata["image_height"] = size
    return detections


def _detections_or_error(
    answer: dict[str, Any] | InferenceError, class_names: Sequence[str], sent: PreparedImage
) -> Outcome:
    if isinstance(answer, InferenceError):
        return answer
    try:
        return to_detections(answer, class_names, sent)
    except InferenceError as error:
        return error


class OwlV2(ModelBlock):
    """Few-shot object detection with OWLv2: draw a few example boxes, find the rest.

    Each class needs at least one positive example box; ``negative`` boxes mark
    counter-examples (on the 1.8.3 server's default engine they also create duplicate
    candidates, so use them sparingly). Scores are ``(cosine + 1) / 2``, which is why useful
    thresholds sit near 0.99.

    Examples:
        Load a saved block and find more objects like the one boxed on a reference image:
        ```python
        from prefect_roboflow.blocks import OwlV2
        from prefect_roboflow.blocks import Box, ReferenceExample

        owl = OwlV2.load("BLOCK_NAME")
        examples = [ReferenceExample(image="shelf.jpg", boxes=[Box(x=223, y=306, w=40, h=226, cls="post")])]
        detections = owl.detect("dock.jpg", examples, confidence=0.99)
        detections.xyxy.shape  # (n, 4)
        detections.data["class_name"]  # array(['post', ...])
        ```
    """

    _block_type_name = "Roboflow OWLv2"
    _block_type_slug = "roboflow-owlv2"
    _logo_url = LOGO_URL  # type: ignore[assignment]
    _documentation_url = DOCS_URL  # type: ignore[assignment]

    family: ClassVar[str] = "owlv2"

    version: str = Field(
        default="owlv2-large-patch14-ensemble",
        description="OWLv2 version, e.g. owlv2-large-patch14-ensemble or owlv2-base-patch16-ensemble.",
    )
    confidence: float = Field(
        default=0.99, ge=0.0, le=1.0, description="Default score threshold; OWLv2 scores cluster near 1."
    )

    def prepare(
        self, images: Any, examples: Any, confidence: float | None
    ) -> tuple[list[PreparedImage | InvalidInputError], dict[str, Any], list[str]]:
        """Validate and encode everything once: query images (resized when big, or their errors),
        the shared request body, and the sorted positive class names."""
        checked = check_examples(examples)
        threshold = check_confidence(self.confidence if confidence is None else confidence)
        plan = self.resize_plan()
        data = training_data(checked, plan=plan)
        body = {"training_data": data, "confidence": threshold, "owlv2_version_id": self.version}
        class_names = sorted({b.cls for e in checked for b in e.boxes if not b.negative})
        return prepare_images(require_items(images, "images", "images"), "images", plan), body, class_names

    async def _detect_prepared(
        self, prepared: Sequence[PreparedImage | InvalidInputError], body: dict[str, Any], class_names: list[str]
    ) -> list[Outcome]:
        async def send(sendable: list[PreparedImage]) -> list[Outcome]:
            # One query image per request: a list makes the 1.8.3 route fail its response validation.
            answers = await self._engine.post_many(ENDPOINT, [{**body, "image": p.image} for p in sendable])
            return [_detections_or_error(a, class_names, p) for a, p in zip(answers, sendable, strict=True)]

        return await self._send_prepared(prepared, send)

    def _prepare_or_raise(self, images: Any, examples: Any, confidence: float | None) -> tuple[Any, ...]:
        prepared, body, class_names = self.prepare(images, examples, confidence)
        return self._raise_first(prepared), body, class_names

    async def adetect_batch(
        self, images: Sequence[ImageInput], examples: Sequence[ReferenceExample], confidence: float | None = None
    ) -> list[sv.Detections]:
        """Async twin of `detect_batch`."""
        args = await asyncio.to_thread(self._prepare_or_raise, images, examples, confidence)
        return self._raise_first(await self._engine.arun(self._detect_prepared(*args)))

    @async_dispatch(adetect_batch)
    def detect_batch(
        self, images: Sequence[ImageInput], examples: Sequence[ReferenceExample], confidence: float | None = None
    ) -> list[sv.Detections]:
        """Detect in several images with the same examples; one `sv.Detections` per image.

        The examples are encoded once; query images go one per request, concurrently.

        Raises:
            InvalidInputError: bad images, examples or confidence; nothing is sent then.
            InferenceError: the server failed for an image after retries.
        """
        return self._raise_first(
            self._engine.run(self._detect_prepared(*self._prepare_or_raise(images, examples, confidence)))
        )

    async def adetect_outcomes(
        self, images: Sequence[ImageInput], examples: Sequence[ReferenceExample], confidence: float | None = None
    ) -> list[Outcome]:
        """Async twin of `detect_outcomes`."""
        args = await asyncio.to_thread(self.prepare, images, examples, confidence)
        return await self._engine.arun(self._detect_prepared(*args))

    @async_dispatch(adetect_outcomes)
    def detect_outcomes(
        self, images: Sequence[ImageInput], examples: Sequence[ReferenceExample], confidence: float | None = None
    ) -> list[Outcome]:
        """Like `detect_batch`, but one outcome per image: `sv.Detections` or its `InferenceError`.

        Bad examples or confidence still raise, since no image could be processed with them.
        """
        return self._engine.run(self._detect_prepared(*self.prepare(images, examples, confidence)))

    async def adetect(
        self, image: ImageInput, examples: Sequence[ReferenceExample], confidence: float | None = None
    ) -> sv.Detections:
        """Async twin of `detect`."""
        return (await self.adetect_batch([image], examples, confidence))[0]

    @async_dispatch(adetect)
    def detect(
        self, image: ImageInput, examples: Sequence[ReferenceExample], confidence: float | None = None
    ) -> sv.Detections:
        """Detect objects in one image like the boxed examples on the reference images.

        Args:
            image: The image to search: path, bytes, https URL, BGR array or PIL image.
            examples: Reference images with example boxes (see `ReferenceExample`, `Box`).
            confidence: Score threshold in [0, 1]; defaults to the block's `confidence`.

        Returns:
            `supervision.Detections` with ``xyxy``, ``confidence``, ``class_id`` (index into the
            sorted positive class names) and ``data["class_name"]``.
        """
        args = self._prepare_or_raise([image], examples, confidence)
        return self._raise_first(self._engine.run(self._detect_prepared(*args)))[0]
