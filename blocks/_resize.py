"""Client-side pre-resize: send big photos at the size the model needs, not at 12 MP.

The server decodes every image and resizes it to its model's input before anything else, so a
4000×3000 JPEG costs it ~0.2 s of decode and resize, and the network 4.4 MB of base64, for a
224×224 input. Here the client does that resize once, the way the server would, and the server's
own resize then has (almost) nothing left to do:

| family | server preprocessing | sent instead |
|---|---|---|
| CLIP | short side to N (bicubic, antialiased), centre crop N×N | the same N×N crop |
| Perception Encoder | squash to N×N (bilinear, antialiased) | the same N×N squash |
| OWLv2 | pad to a square, resize to N×N | long side N, aspect kept; boxes mapped back |

JPEGs are decoded in draft mode (libjpeg's DCT scaling by 1/2, 1/4 or 1/8, never below the
size needed): a 12 MP photo decodes ~3× faster. EXIF orientation is applied the way the server's
OpenCV ``IMREAD_COLOR`` applies it (JPEG, PNG and TIFF; not WebP). Alpha is dropped, as
``IMREAD_COLOR`` drops it, and the result is sent as a JPEG of quality 95 without chroma
subsampling.

**When it pays.** An image is resized only when it is big for the model *and* big in absolute terms:
its relevant side more than `MARGIN` (1.5) times the model's input, and its file over
`SMALL_FILE_BYTES` (256 KiB) or its pixels over `SMALL_IMAGE_PIXELS` (1 MP). Anything else goes as
it is, bytes untouched. Resizing a 640×480, 30 KB JPEG costs the client ~2 ms of CPU to save at
most its 30 KB: a loss on loopback or a LAN (1 Gbit/s moves 30 KB in 0.25 ms), and a 224×224 JPEG
at q95 without subsampling is often no smaller than such a file. Past 256 KiB or 1 MP the bytes saved (and
the server's decode of every pixel: ~0.2 s for 12 MP) outweigh the client's CPU at any link speed
short of loopback. The rule reads only the image (its header and size), never a measured link
speed, so the same image is always sent the same way and cached results stay comparable.

The decodes and resizes run on one bounded thread pool per process (`resize_workers` threads:
every core by default, ``PREFECT_ROBOFLOW_RESIZE_WORKERS`` to change it); Pillow releases the GIL
while it decodes, resamples and encodes, so a batch of big photos uses every core, and at most
that many decoded images are in memory at once.
"""

from __future__ import annotations

import base64
import io
import os
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .exceptions import InvalidImageError, InvalidInputError
from .images import (
    JPEG_QUALITY,
    ImageInput,
    exif_orientation,
    read_image_bytes,
    to_request_image,
    upright,
    upright_size,
    validate_encoded_image,
)

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = [
    "JPEG_QUALITY",
    "MARGIN",
    "SMALL_FILE_BYTES",
    "SMALL_IMAGE_PIXELS",
    "PreparedImage",
    "ResizePlan",
    "Resized",
    "header_size",
    "pixel_limit",
    "plan_for",
    "prepare_image",
    "prepare_images",
    "resize_encoded",
    "resize_settings",
    "resize_workers",
]

#: Resize only images whose relevant side is more than this many times the model's input size.
MARGIN = 1.5
#: An image whose file is at most this many bytes and whose pixels are at most `SMALL_IMAGE_PIXELS`
#: is sent as it is, whatever its size relative to the model's input: resizing it would not pay.
SMALL_FILE_BYTES = 256 * 1024
SMALL_IMAGE_PIXELS = 1_000_000
#: Bumped whenever the resize's output changes, so caches keyed on `resize_settings` notice.
#: 2: small images (`SMALL_FILE_BYTES`, `SMALL_IMAGE_PIXELS`) are no longer resized.
RESIZE_REVISION = 2
#: Sets how many threads decode and resize (default: every core).
WORKERS_ENV = "PREFECT_ROBOFLOW_RESIZE_WORKERS"

#: Input side of each CLIP version (``visual.onnx``'s input shape; OpenAI's published sizes).
CLIP_INPUT: dict[str, int] = {
    "ViT-B-16": 224,
    "ViT-B-32": 224,
    "ViT-L-14": 224,
    "ViT-L-14-336px": 336,
    "RN50": 224,
    "RN101": 224,
    "RN50x4": 288,
    "RN50x16": 384,
    "RN50x64": 448,
}
#: Input side of each Perception Encoder version (the number ending its name).
PE_INPUT: dict[str, int] = {"PE-Core-B16-224": 224, "PE-Core-L14-336": 336, "PE-Core-G14-448": 448}
#: OWLv2's processor sizes: 960 for the base (patch 16) models, 1008 for the large (patch 14)
#: ones. The larger is the safe guess: sending more than needed costs a little, less costs detail.
OWLV2_INPUT = {"base": 960, "large": 1008}


Mode = Literal["crop", "squash", "fit"]


@dataclass(frozen=True)
class ResizePlan:
    """How one model wants its images: ``mode`` and input side ``size`` in pixels.

    ``crop``: short side to ``size``, centre crop (CLIP). ``squash``: ``size``×``size``, aspect
    not kept (Perception Encoder). ``fit``: long side to ``size``, aspect kept (OWLv2).

    Examples:
        ```python
        plan = ResizePlan("crop", 224, "bicubic")
        plan.output_size(4000, 3000)  # (224, 224)
        plan.output_size(320, 240)  # None: small enough, sent as it is
        ResizePlan("fit", 960, "bilinear").output_size(3000, 4000)  # (720, 960)
        ```
    """

    mode: Mode
    size: int
    resample: Literal["bicubic", "bilinear"]

    def output_size(self, width: int, height: int) -> tuple[int, int] | None:
        """The ``(width, height)`` to send, or None when the image goes as it is."""
        if self.mode == "fit":
            if max(width, height) <= self.size * MARGIN:
                return None
            return self.scaled_size(width, height)
        if min(width, height) <= self.size * MARGIN:
            return None
        return self.size, self.size

    def target_size(self, width: int, height: int, nbytes: int) -> tuple[int, int] | None:
        """The ``(width, height)`` to send an image of ``nbytes`` as, or None when resizing it does
        not pay: too small for the model (`output_size`), or small in bytes and pixels alike.

        Examples:
            ```python
            plan = ResizePlan("crop", 224, "bicubic")
            plan.target_size(640, 480, 30_000)  # None: a 0.3 MP, 30 KB photo goes as it is
            plan.target_size(640, 480, 400_000)  # (224, 224): 400 KB is worth shrinking
            plan.target_size(4000, 3000, 3_000_000)  # (224, 224)
            ```
        """
        if nbytes <= SMALL_FILE_BYTES and width * height <= SMALL_IMAGE_PIXELS:
            return None
        return self.output_size(width, height)

    def scaled_size(self, width: int, height: int) -> tuple[int, int]:
        """The size before any crop: what the decoder must deliver at least."""
        if self.mode == "squash":
            return self.size, self.size
        if self.mode == "fit":
            r = self.size / max(width, height)
            return max(1, round(width * r)), max(1, round(height * r))
        # torchvision's Resize(int): the short side becomes size, the long one int(size * long / short).
        if width <= height:
            return self.size, int(self.size * height / width)
        return int(self.size * width / height), self.size


def plan_for(family: str, version: str) -> ResizePlan | None:
    """The resize plan of a model family (``clip``, ``perception_encoder``, ``owlv2``) and version.

    None for a version whose input size is not known: its images are sent as they are.

    Examples:
        ```python
        plan_for("clip", "ViT-L-14-336px")  # ResizePlan(mode='crop', size=336, resample='bicubic')
        plan_for("perception_encoder", "PE-Core-G14-448").size  # 448
        plan_for("owlv2", "owlv2-base-patch16-ensemble").size  # 960
        ```
    """
    if family == "clip" and version in CLIP_INPUT:
        return ResizePlan("crop", CLIP_INPUT[version], "bicubic")
    if family == "perception_encoder" and version in PE_INPUT:
        return ResizePlan("squash", PE_INPUT[version], "bilinear")
    if family == "owlv2":
        for kind, size in OWLV2_INPUT.items():
            if f"-{kind}-" in f"-{version}-":
                return ResizePlan("fit", size, "bilinear")
    return None


def resize_settings(enabled: bool) -> dict[str, Any]:
    """What the resize setting adds to a cache key: results differ with and without it.

    Examples:
        ```python
        resize_settings(True)  # {'client_resize': 1}
        resize_settings(False)  # {'client_resize': 0}
        ```
    """
    return {"client_resize": RESIZE_REVISION if enabled else 0}


def pixel_limit() -> int | None:
    """The decompression-bomb limit in pixels: Pillow's ``Image.MAX_IMAGE_PIXELS`` (None: no limit)."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    return None if limit is None else int(limit)


def header_size(data: bytes, field: str = "image") -> tuple[int, int] | None:
    """The upright ``(width, height)`` read from the header (EXIF orientation applied as the server
    applies it), or None when the header cannot be read. Nothing is decoded.

    Raises:
        InvalidImageError: naming ``field``, when the header claims more pixels than `pixel_limit`.
    """
    from PIL import Image, UnidentifiedImageError

    limit = pixel_limit()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                size = upright_size(img)
    except Image.DecompressionBombError:
        raise InvalidImageError(field, f"image header claims more than {limit} pixels (decompression bomb)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None
    if limit is not None and width * height > limit:
        raise InvalidImageError(
            field, f"image header claims {width}×{height} = {width * height} pixels, over the limit of {limit}"
        )
    return size


@dataclass(frozen=True)
class Resized:
    """A resized image: JPEG ``data`` of ``size``, and the ``decoded_size`` the decoder delivered
    (smaller than the file's when JPEG draft mode scaled the decode down)."""

    data: bytes
    size: tuple[int, int]
    decoded_size: tuple[int, int]


def resize_encoded(data: bytes, plan: ResizePlan, field: str = "image") -> Resized:
    """Decode, orient, resize (and crop) one encoded image per ``plan``; JPEG q95 out.

    Call it for images `ResizePlan.target_size` says are worth resizing.

    Raises:
        InvalidImageError: naming ``field``, when the image cannot be decoded.
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format == "JPEG":
                # Both sides of the decode stay at least the size needed (rotation does not matter).
                img.draft("RGB", plan.scaled_size(*img.size))
            decoded_size = img.size
            orientation = exif_orientation(img)  # read before decoding (see `exif_orientation`)
            img.load()
            out = _apply(_to_8bit(upright(img, orientation)), plan)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InvalidImageError(field, f"cannot decode the image to resize it: {exc}") from None
    buffer = io.BytesIO()
    out.save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return Resized(buffer.getvalue(), out.size, decoded_size)


def _to_8bit(img: PILImage.Image) -> PILImage.Image:
    """RGB, or L for grayscale; alpha dropped and 16-bit scaled down as ``IMREAD_COLOR`` does."""
    from PIL import Image

    if img.mode in ("RGB", "L"):
        return img
    if img.mode.startswith("I") or img.mode == "F":
        import numpy as np

        array = np.asarray(img)
        if array.dtype.kind in "iu" and int(array.max(initial=0)) > 255:
            array = array >> 8
        return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
    return img.convert("L" if img.mode == "LA" else "RGB")


def _apply(img: PILImage.Image, plan: ResizePlan) -> PILImage.Image:
    from PIL import Image

    resample = Image.Resampling.BICUBIC if plan.resample == "bicubic" else Image.Resampling.BILINEAR
    width, height = plan.scaled_size(*img.size)
    resized = img.resize((width, height), resample)
    if plan.mode != "crop":
        return resized
    # torchvision's CenterCrop: offsets int(round((side - size) / 2)).
    left, top = round((width - plan.size) / 2), round((height - plan.size) / 2)
    return resized.crop((left, top, left + plan.size, top + plan.size))


@dataclass(frozen=True)
class PreparedImage:
    """An image ready to send: the server's image object, and the sizes to map boxes back.

    Attributes:
        image: ``{"type": "base64" | "url", "value": ...}``.
        size: Upright ``(width, height)`` of the original, None when unknown (URLs).
        sent_size: ``(width, height)`` of what is sent, None when unknown.
    """

    image: dict[str, str]
    size: tuple[int, int] | None = None
    sent_size: tuple[int, int] | None = None

    @property
    def resized(self) -> bool:
        """True when the image was resized on the client."""
        return self.size is not None and self.sent_size is not None and self.size != self.sent_size

    @property
    def scale(self) -> tuple[float, float]:
        """``(sx, sy)``: a point ``(x, y)`` of the sent image is ``(x * sx, y * sy)`` on the original."""
        if not self.resized:
            return 1.0, 1.0
        assert self.size is not None and self.sent_size is not None
        return self.size[0] / self.sent_size[0], self.size[1] / self.sent_size[1]


def _base64(data: bytes) -> dict[str, str]:
    return {"type": "base64", "value": base64.b64encode(data).decode("ascii")}


def _encoded(image: ImageInput, field: str) -> bytes | None:
    """The encoded bytes of a bytes/path/array/PIL input (validated), None for a URL."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    elif isinstance(image, str) and "://" in image:
        return None
    elif isinstance(image, (str, os.PathLike)):
        data = read_image_bytes(image, field)
    else:
        # Arrays and PIL images are encoded (JPEG q95) exactly as without resizing.
        return base64.b64decode(to_request_image(image, field)["value"])
    validate_encoded_image(data, field)
    return data


def _plan_one(image: ImageInput, field: str, plan: ResizePlan | None) -> tuple[PreparedImage, bytes | None]:
    """The cheap half: read, validate, check the header; (prepared, bytes still to resize or None)."""
    data = _encoded(image, field)
    if data is None:
        return PreparedImage(to_request_image(image, field)), None
    size = header_size(data, field)
    target = None if plan is None or size is None else plan.target_size(*size, len(data))
    if plan is not None and size is None:
        raise InvalidImageError(field, "cannot read the image header")
    if target is not None:
        return PreparedImage({}, size, target), data  # the image object comes with the resize
    return PreparedImage(_base64(data), size, size), None


def prepare_image(image: ImageInput, field: str = "image", plan: ResizePlan | None = None) -> PreparedImage:
    """One image as the server's image object, resized per ``plan`` when it is big enough.

    With ``plan=None`` the bytes go untouched (only the decompression-bomb check is added).
    URLs always go as they are: the server downloads them itself.

    Raises:
        InvalidImageError: naming ``field``: unreadable, corrupt, or a decompression bomb.

    Examples:
        ```python
        prepared = prepare_image("photo.jpg", "images[0]", plan_for("clip", "ViT-B-16"))
        prepared.sent_size  # (224, 224)
        ```
    """
    prepared, pending = _plan_one(image, field, plan)
    if pending is None or plan is None:
        return prepared
    resized = resize_encoded(pending, plan, field)
    return PreparedImage(_base64(resized.data), prepared.size, resized.size)


def prepare_images(
    images: Sequence[ImageInput], field: str = "images", plan: ResizePlan | None = None
) -> list[PreparedImage | InvalidInputError]:
    """`prepare_image` for each image, n in, n out: an image that fails is its `InvalidInputError`.

    Headers are checked in order; the decodes and resizes run on the process's resize pool
    (`resize_workers` threads, shared by every caller: at most that many decodes at once).
    """
    results: list[PreparedImage | InvalidInputError] = []
    pending: dict[int, bytes] = {}
    for i, image in enumerate(images):
        try:
            prepared, data = _plan_one(image, f"{field}[{i}]", plan)
        except InvalidInputError as error:
            results.append(error)
            continue
        results.append(prepared)
        if data is not None:
            pending[i] = data
    if not pending or plan is None:
        return results

    def resize(i: int) -> PreparedImage | InvalidInputError:
        done = results[i]
        assert isinstance(done, PreparedImage)
        try:
            resized = resize_encoded(pending[i], plan, f"{field}[{i}]")
        except InvalidInputError as error:
            return error
        return PreparedImage(_base64(resized.data), done.size, resized.size)

    # Always on the pool, one image or one worker too: callers in several threads (a flow's
    # pipelined batch tasks) share it, so at most `resize_workers` decodes run at once.
    finished = list(_pool().map(resize, pending))
    for i, outcome in zip(pending, finished, strict=True):
        results[i] = outcome
    return results


def resize_workers() -> int:
    """How many threads decode and resize: ``PREFECT_ROBOFLOW_RESIZE_WORKERS``, else every core.

    Raises:
        InvalidInputError: naming the variable, when it is not a whole number of at least 1.
    """
    value = os.environ.get(WORKERS_ENV, "").strip()
    if not value:
        return max(1, os.cpu_count() or 1)
    try:
        workers = int(value)
    except ValueError:
        workers = 0
    if workers < 1:
        raise InvalidInputError(WORKERS_ENV, f"expected a whole number of at least 1, got {value!r}")
    return workers


_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """The process's resize pool of `resize_workers` threads (a new one when the setting changes,
    or in a forked child: threads do not cross a fork)."""
    key = (os.getpid(), resize_workers())
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None:
            pool = _pools[key] = ThreadPoolExecutor(max_workers=key[1], thread_name_prefix="prefect-roboflow-resize")
        return pool
