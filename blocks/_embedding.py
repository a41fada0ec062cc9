"""What CLIP and Perception Encoder share: the same three routes, differing only in names,
batch limits and text checks. `Clip` and `PerceptionEncoder` bind these to their routes; the
route prefix is the block's ``family``."""

from __future__ import annotations

import asyncio
from abc import ABC
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ._compat import async_dispatch
from ._model import ModelBlock, Outcome, Prepared, require_items
from ._resize import prepare_image
from .exceptions import InferenceError, InferenceResponseError, InferenceStatusError, InvalidInputError
from .images import ImageInput

if TYPE_CHECKING:
    import numpy as np

#: The server refuses more than this many images or prompts in one request (CLIP_MAX_BATCH_SIZE).
SERVER_MAX_ITEMS = 8


@dataclass(frozen=True)
class Routes:
    """How one model family's routes take their inputs."""

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


def _parse_vectors(answer: dict[str, Any], expected: int, endpoint: str, dim: int | None = None) -> list[np.ndarray]:
    """The answer's embeddings: ``expected`` finite vectors of one length (``dim`` when given), as float32."""
    import numpy as np

    vectors = answer.get("embeddings")
    if not isinstance(vectors, list) or len(vectors) != expected:
        got = len(vectors) if isinstance(vectors, list) else type(vectors).__name__
        raise InferenceResponseError(f"expected {expected} embeddings, got {got}", endpoint=endpoint)
    try:
        matrix = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError):
        raise InferenceResponseError("embeddings are not equal-length lists of numbers", endpoint=endpoint) from None
    if matrix.ndim != 2 or matrix.shape[1] == 0:
        raise InferenceResponseError(f"embeddings of shape {matrix.shape}, expected (n, dim)", endpoint=endpoint)
    if dim is not None and matrix.shape[1] != dim:
        raise InferenceResponseError(
            f"embeddings of {matrix.shape[1]} values, expected {dim} for this model version", endpoint=endpoint
        )
    if not np.isfinite(matrix).all():
        raise InferenceResponseError("embeddings hold NaN or infinite values", endpoint=endpoint)
    return list(matrix)


class EmbeddingModel(ModelBlock, ABC):
    """Base of the embedding blocks: embed images and texts and compare them, batched within the
    server's limits."""

    routes: ClassVar[Routes]
    #: Embedding size of each known version (contract §1.1, §2); answers of another size are errors.
    dimensions: ClassVar[dict[str, int]] = {}

    @property
    def dimension(self) -> int | None:
        """The embedding size this block's answers must have: the version's known one, else the
        first size a server answered for this family and version in this process (None until then)."""
        known = self.dimensions.get(self.version)
        return known if known is not None else self._engine.learned_dimensions.get((self.family, self.version))

    def learn_dimension(self, size: int) -> int:
        """The embedding size in force: the known or learned `dimension`, else ``size`` (learned now,
        for this family and version in this process: the first answer, cached vector or index met)."""
        known = self.dimension
        if known is not None:
            return known
        return self._engine.learned_dimensions.setdefault((self.family, self.version), size)

    def _parse_embeddings(self, answer: dict[str, Any], n: int, endpoint: str) -> list[np.ndarray]:
        """`_parse_vectors` against `dimension`; the first answer of an unknown version fixes it."""
        vectors = _parse_vectors(answer, n, endpoint, self.dimension)
        if vectors:
            self.learn_dimension(int(vectors[0].shape[0]))
        return vectors

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
        return f"/{self.family}/{action}"

    def _body(self, **fields: Any) -> dict[str, Any]:
        return {**fields, self.routes.version_field: self.version}

    # --- the one implementation, run on the engine's loop -------------------------------

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

    async def _embed_prepared(self, prepared: Sequence[Prepared]) -> list[Outcome]:
        endpoint = self._endpoint("embed_image")
        return await self._send_prepared(
            prepared,
            lambda sendable: self._send_chunks(
                endpoint,
                sendable,
                self.routes.images_per_request,
                lambda chunk: self._body(image=list(chunk)),
                lambda answer, n: self._parse_embeddings(answer, n, endpoint),
            ),
        )

    async def _embed_texts(self, texts: Sequence[str]) -> list[Outcome]:
        endpoint = self._endpoint("embed_text")
        return await self._send_chunks(
            endpoint,
            texts,
            self.routes.texts_per_request,
            lambda chunk: self._body(text=list(chunk)),
            lambda answer, n: self._parse_embeddings(answer, n, endpoint),
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

        return np.vstack(self._raise_first(outcomes)).astype(np.float32, copy=False)

    def _images_or_raise(self, images: Any) -> list[Prepared]:
        return self._raise_first(self.prepare_images(images))

    def _compare_inputs(self, image: ImageInput, prompts: Any) -> tuple[dict[str, str], list[str]]:
        return prepare_image(image, "image", self.resize_plan()).image, self._check_texts(prompts, "prompts")

    def _similarities(self, outcomes: Sequence[Outcome]) -> np.ndarray:
        import numpy as np

        return np.asarray(self._raise_first(outcomes), dtype=np.float32)

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
