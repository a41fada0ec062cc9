"""What CLIP and Perception Encoder share: the same three routes, differing only in names,
batch limits and text checks. `Clip` and `PerceptionEncoder` bind these to their routes."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ._compat import async_dispatch
from ._resize import ResizePlan, plan_for, prepare_image, resize_settings
from ._resize import prepare_images as prepare_resized
from .exceptions import InferenceError, InferenceResponseError, InferenceStatusError, InvalidInputError
from .images import ImageInput

if TYPE_CHECKING:
    import numpy as np

    from ._http import InferenceHTTP
    from .server import InferenceServer

#: The server refuses more than this many images or prompts in one request (CLIP_MAX_BATCH_SIZE).
SERVER_MAX_ITEMS = 8

Outcome = Any  # a vector (np.ndarray) or the InferenceError that prevented it


@dataclass(frozen=True)
class Routes:
    """How one model family is reached."""

    family: str  # route prefix, e.g. "clip"
    version_field: str  # body field naming the version, e.g. "clip_version_id"
    images_per_request: int
    texts_per_request: int = SERVER_MAX_ITEMS
    prompts_per_request: int = SERVER_MAX_ITEMS


def chunked(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """Split a sequence into consecutive chunks of at most ``size`` items, order kept.

    Examples:
        ```python
        chunked([1, 2, 3, 4, 5], 2)  # [[1, 2], [3, 4], [5]]
        ```
    """
    if size < 1:
        raise ValueError("size must be at least 1")
    return [items[i : i + size] for i in range(0, len(items), size)]


def require_items(items: Any, field: str, kind: str) -> list[Any]:
    """A non-empty list from a sequence argument; a lone str/bytes/path is a mistake, not a list."""
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise InvalidInputError(field, f"expected a list of {kind}, got {type(items).__name__}")
    if len(items) == 0:
        raise InvalidInputError(
            field, f"expected at least one {kind[:-1] if kind.endswith('s') else kind}, got an empty list"
        )
    return list(items)


def prepare_images(
    images: Any, field: str = "images", plan: ResizePlan | None = None
) -> list[dict[str, str] | InvalidInputError]:
    """Each image of a non-empty list as the server's image object (resized per ``plan`` when big),
    or the error that makes it unsendable."""
    prepared = prepare_resized(require_items(images, field, "images"), field, plan)
    return [p if isinstance(p, InvalidInputError) else p.image for p in prepared]


def _first_error(outcomes: Sequence[Outcome]) -> InferenceError | None:
    return next((o for o in outcomes if isinstance(o, InferenceError)), None)


def _vectors(answer: dict[str, Any], expected: int, endpoint: str) -> list[list[float]]:
    vectors = answer.get("embeddings")
    if not isinstance(vectors, list) or len(vectors) != expected:
        got = len(vectors) if isinstance(vectors, list) else type(vectors).__name__
        raise InferenceResponseError(f"expected {expected} embeddings, got {got}", endpoint=endpoint)
    return vectors


class EmbeddingMixin:
    """Embed images and texts and compare them, batched within the server's limits."""

    routes: ClassVar[Routes]
    server: InferenceServer
    version: str
    client_resize: bool

    # --- input checks, per model family -------------------------------------------------

    def _check_text(self, text: Any, field: str) -> str:
        if not isinstance(text, str):
            raise InvalidInputError(field, f"expected str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidInputError(field, f"text is not valid Unicode ({exc.reason} at {exc.start})") from None
        return text

    def _check_texts(self, texts: Any, field: str) -> list[str]:
        return [self._check_text(t, f"{field}[{i}]") for i, t in enumerate(require_items(texts, field, "texts"))]

    # --- payloads ------------------------------------------------------------------------

    def _endpoint(self, action: str) -> str:
        return f"/{self.routes.family}/{action}"

    def _body(self, **fields: Any) -> dict[str, Any]:
        return {**fields, self.routes.version_field: self.version}

    def resize_plan(self) -> ResizePlan | None:
        """How images are resized on the client before sending; None when they go untouched."""
        return plan_for(self.routes.family, self.version) if self.client_resize else None

    def output_settings(self) -> dict[str, Any]:
        """Settings besides family and version that change results: part of a cache key."""
        return resize_settings(self.client_resize)

    def prepare_images(self, images: Any, field: str = "images") -> list[dict[str, str] | InvalidInputError]:
        """Each image as the server's image object, or the error that makes it unsendable."""
        return prepare_images(images, field, self.resize_plan())

    # --- the one implementation, run on the engine's loop -------------------------------

    @property
    def _engine(self) -> InferenceHTTP:
        return self.server.engine

    async def _send_chunks(
        self, endpoint: str, items: Sequence[Any], per_request: int, make_body: Any, parse: Any
    ) -> list[Outcome]:
        """Send items in chunks; n in, n out, in order. A chunk the server refuses as a whole
        is re-sent item by item, so one bad item fails alone."""
        chunks = chunked(items, per_request)
        answers = await self._engine.post_many(endpoint, [make_body(c) for c in chunks])
        outcomes: list[Outcome] = []
        for chunk, answer in zip(chunks, answers, strict=True):
            if isinstance(answer, InferenceStatusError) and len(chunk) > 1 and not answer.retryable:
                outcomes.extend(await self._send_chunks(endpoint, chunk, 1, make_body, parse))
            elif isinstance(answer, InferenceError):
                outcomes.extend([answer] * len(chunk))
            else:
                try:
                    outcomes.extend(parse(answer, len(chunk)))
                except InferenceError as error:
                    outcomes.extend([error] * len(chunk))
        return outcomes

    async def _embed_prepared(self, prepared: Sequence[dict[str, str] | InvalidInputError]) -> list[Outcome]:
        import numpy as np

        endpoint = self._endpoint("embed_image")
        sendable = [p for p in prepared if not isinstance(p, InvalidInputError)]
        sent = await self._send_chunks(
            endpoint,
            sendable,
            self.routes.images_per_request,
            lambda chunk: self._body(image=list(chunk)),
            lambda answer, n: [np.asarray(v, dtype=np.float32) for v in _vectors(answer, n, endpoint)],
        )
        results = iter(sent)
        return [p if isinstance(p, InvalidInputError) else next(results) for p in prepared]

    async def _embed_texts(self, texts: Sequence[str]) -> list[Outcome]:
        import numpy as np

        endpoint = self._endpoint("embed_text")
        return await self._send_chunks(
            endpoint,
            texts,
            self.routes.texts_per_request,
            lambda chunk: self._body(text=list(chunk)),
            lambda answer, n: [np.asarray(v, dtype=np.float32) for v in _vectors(answer, n, endpoint)],
        )

    async def _compare(self, subject: dict[str, str], prompts: Sequence[str]) -> list[Outcome]:
        endpoint = self._endpoint("compare")

        def parse(answer: dict[str, Any], n: int) -> list[float]:
            similarity = answer.get("similarity")
            if not isinstance(similarity, list) or len(similarity) != n:
                raise InferenceResponseError(f"expected {n} similarities, got {similarity!r:.80}", endpoint=endpoint)
            return [float(s) for s in similarity]

        return await self._send_chunks(
            endpoint,
            prompts,
            self.routes.prompts_per_request,
            lambda chunk: self._body(subject=subject, subject_type="image", prompt=list(chunk), prompt_type="text"),
            parse,
        )

    # --- shared front halves of the public twins ----------------------------------------

    def _stack(self, outcomes: Sequence[Outcome]) -> np.ndarray:
        import numpy as np

        error = _first_error(outcomes)
        if error is not None:
            raise error
        return np.vstack(outcomes).astype(np.float32, copy=False)

    def _images_or_raise(self, images: Any) -> list[dict[str, str]]:
        prepared = self.prepare_images(images)
        error = _first_error(prepared)
        if error is not None:
            raise error
        return prepared  # type: ignore[return-value]

    def _compare_inputs(self, image: ImageInput, prompts: Any) -> tuple[dict[str, str], list[str]]:
        return prepare_image(image, "image", self.resize_plan()).image, self._check_texts(prompts, "prompts")

    @staticmethod
    def _similarities(outcomes: Sequence[Outcome]) -> np.ndarray:
        import numpy as np

        error = _first_error(outcomes)
        if error is not None:
            raise error
        return np.asarray(outcomes, dtype=np.float32)

    # --- public API: one async implementation each, and its sync twin -----------------

    async def aembed_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Async twin of `embed_images`."""
        prepared = await asyncio.to_thread(self._images_or_raise, images)
        return self._stack(await self._engine.arun(self._embed_prepared(prepared)))

    @async_dispatch(aembed_images)
    def embed_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Embed images: paths, bytes, https URLs, BGR arrays or PIL images.

        Requests go out concurrently, within the server's per-request item limit.

        Returns:
            float32 array of shape ``(len(images), dim)``, rows in input order.

        Raises:
            InvalidInputError: an image cannot be sent; nothing is sent then.
            InferenceError: the server failed for an image after retries.
        """
        prepared = self._images_or_raise(images)
        return self._stack(self._engine.run(self._embed_prepared(prepared)))

    async def aembed_images_outcomes(self, images: Sequence[ImageInput]) -> list[Outcome]:
        """Async twin of `embed_images_outcomes`."""
        prepared = await asyncio.to_thread(self.prepare_images, images)
        return await self._engine.arun(self._embed_prepared(prepared))

    @async_dispatch(aembed_images_outcomes)
    def embed_images_outcomes(self, images: Sequence[ImageInput]) -> list[Outcome]:
        """Embed images, one outcome each: a float32 vector, or the `InferenceError` for that image.

        For pipelines that record failed items and carry on; unsendable images are never sent.
        """
        return self._engine.run(self._embed_prepared(self.prepare_images(images)))

    async def aembed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Async twin of `embed_texts`."""
        checked = self._check_texts(texts, "texts")
        return self._stack(await self._engine.arun(self._embed_texts(checked)))

    @async_dispatch(aembed_texts)
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts.

        Returns:
            float32 array of shape ``(len(texts), dim)``, rows in input order.

        Raises:
            InvalidInputError: a text is not a str, not valid Unicode, or too long for the model.
        """
        checked = self._check_texts(texts, "texts")
        return self._stack(self._engine.run(self._embed_texts(checked)))

    async def acompare(self, image: ImageInput, prompts: Sequence[str]) -> np.ndarray:
        """Async twin of `compare`."""
        subject, checked = await asyncio.to_thread(self._compare_inputs, image, prompts)
        return self._similarities(await self._engine.arun(self._compare(subject, checked)))

    @async_dispatch(acompare)
    def compare(self, image: ImageInput, prompts: Sequence[str]) -> np.ndarray:
        """Cosine similarity of one image to each text prompt, computed by the server.

        Returns:
            float32 array of shape ``(len(prompts),)``, in prompt order, values in [-1, 1].
        """
        subject, checked = self._compare_inputs(image, prompts)
        return self._similarities(self._engine.run(self._compare(subject, checked)))
