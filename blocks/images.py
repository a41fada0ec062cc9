"""Turn the image inputs users have into the image objects the server accepts.

Accepted everywhere: a file path (``str`` or ``os.PathLike``), encoded bytes (JPEG, PNG, ...),
a numpy array (``H×W×3`` BGR as OpenCV gives, ``H×W`` grayscale, ``H×W×4`` BGRA; ``uint8``,
``uint16`` or ``float`` in ``[0, 1]``), a PIL image, or an ``https://`` URL that the server
downloads itself. Encoded bytes are sent as they are, never decoded and re-encoded; the blocks'
client-side resize of photos bigger than their model needs (``client_resize``) lives in `_resize`.
Arrays and PIL images are encoded as JPEG q95 (lossy); `encode_array` with ``format="png"`` gives
lossless bytes to send instead.

numpy and PIL are imported only when such an input is given, to keep the package light.
"""

from __future__ import annotations

import base64
import io
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeGuard, Union
from urllib.parse import urlsplit

from .exceptions import InvalidImageError

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image as PILImage

    ImageInput = Union[str, os.PathLike[str], bytes, np.ndarray, PILImage.Image]
else:
    ImageInput = Any

__all__ = [
    "ImageInput",
    "ORIENTED_FORMATS",
    "encode_array",
    "exif_orientation",
    "image_format",
    "image_size",
    "read_image_bytes",
    "to_request_image",
    "upright",
    "upright_size",
    "validate_encoded_image",
    "validate_url",
]

JPEG_QUALITY = 95

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)


def image_format(data: bytes) -> str | None:
    """The container format of encoded image bytes, from their magic number.

    Examples:
        ```python
        image_format(open("dog.jpg", "rb").read())  # 'jpeg'
        image_format(b"hello")  # None
        ```
    """
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    return None


def validate_encoded_image(data: bytes, field: str = "image") -> str:
    """Check that bytes look like a whole encoded image; return its format.

    Catches, without decoding: empty input, non-image bytes, and JPEG or PNG files cut short
    (no end-of-image marker, no ``IEND`` chunk) — the usual marks of a failed upload.

    Raises:
        InvalidImageError: naming ``field`` and the reason.
    """
    if not data:
        raise InvalidImageError(field, "image is empty (0 bytes)")
    fmt = image_format(data)
    if fmt is None:
        raise InvalidImageError(field, f"not a recognised image format (starts with {data[:8]!r})")
    # Some cameras append data after the end marker, so look near the end rather than at it.
    tail = data[-4096:]
    if fmt == "jpeg" and b"\xff\xd9" not in tail:
        raise InvalidImageError(field, "truncated JPEG (no end-of-image marker)")
    if fmt == "png" and b"IEND" not in tail:
        raise InvalidImageError(field, "truncated PNG (no IEND chunk)")
    return fmt


def validate_url(url: str, field: str = "image") -> str:
    """Check a URL the server will download: https, with a fully qualified host name.

    The server refuses plain http and hosts without a dot by default and answers such
    requests with an opaque error, so they are rejected here instead.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError as exc:
        raise InvalidImageError(field, f"malformed URL: {exc}") from None
    if parts.scheme.lower() != "https":
        raise InvalidImageError(
            field, f"only https:// URLs are accepted by the server, got {parts.scheme or 'no'} scheme"
        )
    if not host or "." not in host or any(c.isspace() for c in url):
        raise InvalidImageError(field, "malformed URL: it needs a fully qualified host name and no spaces")
    return url


def read_image_bytes(path: str | os.PathLike[str], field: str = "image") -> bytes:
    """Read an image file, raising `InvalidImageError` (not `OSError`) when it cannot be read."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise InvalidImageError(field, f"file not found: {os.fspath(path)}") from None
    except OSError as exc:
        raise InvalidImageError(field, f"cannot read {os.fspath(path)}: {exc.strerror}") from None


#: Formats whose EXIF orientation the server applies when it decodes (its OpenCV ``IMREAD_COLOR``,
#: checked against the server's OpenCV 4.12: JPEG, PNG and TIFF turn; WebP does not).
ORIENTED_FORMATS = frozenset({"JPEG", "PNG", "TIFF", "MPO"})
_EXIF_ORIENTATION = 0x0112


def exif_orientation(img: PILImage.Image) -> int:
    """The EXIF orientation (1–8) the server applies to an opened image: 1 for a format it does not
    turn (`ORIENTED_FORMATS`), for none, or for an unreadable one. Reads the header only."""
    if img.format not in ORIENTED_FORMATS:
        return 1
    if img.format == "PNG" and "exif" not in img.info:
        return 1  # no eXIf chunk before the pixels; PIL's getexif() would decode the image to look after them
    try:
        orientation = int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except (OSError, ValueError, SyntaxError, TypeError):
        return 1
    return orientation if 1 <= orientation <= 8 else 1


def upright(img: PILImage.Image, orientation: int | None = None) -> PILImage.Image:
    """An opened image turned as the server turns it (``orientation``: `exif_orientation`, read
    before the pixels are loaded when given): the one place photos are oriented, so boxes, crops,
    annotated copies and exports all share the server's frame of reference."""
    orientation = exif_orientation(img) if orientation is None else orientation
    if orientation == 1:
        return img
    from PIL import Image

    method = {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_270,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_90,
    }[orientation]
    return img.transpose(method)


def upright_size(img: PILImage.Image) -> tuple[int, int]:
    """An opened image's ``(width, height)`` once `upright` (from the header: nothing decoded)."""
    width, height = img.size
    return (height, width) if exif_orientation(img) in (5, 6, 7, 8) else (width, height)


def image_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from the image header as the server sees the image — after its EXIF
    orientation (`upright_size`: a portrait photo stored landscape with orientation 6 is taller than
    wide) — or None if the header is unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            return upright_size(img)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None


def _is_ndarray(value: object) -> TypeGuard[np.ndarray]:
    numpy = sys.modules.get("numpy")
    return numpy is not None and isinstance(value, numpy.ndarray)


def _is_pil_image(value: object) -> TypeGuard[PILImage.Image]:
    pil = sys.modules.get("PIL.Image")
    return pil is not None and isinstance(value, pil.Image)


def _to_uint8(array: np.ndarray, field: str) -> np.ndarray:
    import numpy as np

    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16:
        return (array >> 8).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InvalidImageError(field, "array contains NaN or infinite values")
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 255.0:
            raise InvalidImageError(field, f"float array values must lie in [0, 1] or [0, 255], got [{low}, {high}]")
        scale = 255.0 if high <= 1.0 else 1.0
        return np.rint(array * scale).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise InvalidImageError(field, f"{array.dtype} values must lie in [0, 255], got [{low}, {high}]")
        return array.astype(np.uint8)
    raise InvalidImageError(field, f"unsupported array dtype {array.dtype}")


def encode_array(
    array: np.ndarray, field: str = "image", quality: int = JPEG_QUALITY, format: Literal["jpeg", "png"] = "jpeg"
) -> bytes:
    """Encode a BGR (OpenCV-ordered) array as JPEG (q95, what arrays given as images become) or
    lossless PNG bytes.

    JPEG is small and fast but lossy: OWLv2's scores near its threshold can change, and with them
    the number of boxes found. For the exact pixels, pass ``encode_array(frame, format="png")``
    as the image instead of the array.

    Grayscale (``H×W`` or ``H×W×1``) and BGRA (``H×W×4``, alpha dropped) are converted;
    ``uint16`` and ``[0, 1]`` floats are scaled to 8 bits.

    Examples:
        ```python
        import numpy as np
        jpeg = encode_array(np.zeros((240, 320, 3), dtype=np.uint8))
        jpeg[:3]  # b'\\xff\\xd8\\xff'
        png = encode_array(frame, format="png")  # lossless: decodes to exactly ``frame``
        ```
    """
    if format not in ("jpeg", "png"):
        raise InvalidImageError(field, f"format must be 'jpeg' or 'png', got {format!r}")
    import numpy as np
    from PIL import Image

    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise InvalidImageError(field, f"array must be H×W, H×W×3 or H×W×4, got shape {array.shape}")
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise InvalidImageError(field, f"array has no pixels (shape {array.shape})")
    pixels = _to_uint8(array, field)
    if pixels.ndim == 3:
        pixels = np.ascontiguousarray(pixels[:, :, 2::-1])  # BGR(A) -> RGB, alpha dropped
    buffer = io.BytesIO()
    if format == "png":
        Image.fromarray(pixels).save(buffer, format="PNG")
    else:
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _encode_pil(image: PILImage.Image, field: str) -> bytes:
    import numpy as np

    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # PIL's own conversion clips high-bit-depth values instead of scaling them.
        array = np.asarray(image)
        if array.dtype.kind in "iu":
            array = array.astype(np.uint16 if int(array.max(initial=0)) <= 65535 else np.uint32)
            if array.dtype == np.uint32:
                raise InvalidImageError(field, f"PIL image of mode {image.mode} has values over 16 bits")
        return encode_array(array, field)
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _base64(data: bytes) -> dict[str, str]:
    return {"type": "base64", "value": base64.b64encode(data).decode("ascii")}


def to_request_image(image: ImageInput, field: str = "image") -> dict[str, str]:
    """The server's image object (``{"type": ..., "value": ...}``) for any accepted input.

    Raises:
        InvalidImageError: naming ``field``, for anything that cannot be sent as an image.

    Examples:
        ```python
        to_request_image("https://example.com/dog.jpg")
        # {'type': 'url', 'value': 'https://example.com/dog.jpg'}
        to_request_image(b"not an image")
        # InvalidImageError: image: not a recognised image format (starts with b'not an i')
        ```
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        validate_encoded_image(data, field)
        return _base64(data)
    if isinstance(image, str) and "://" in image:
        return {"type": "url", "value": validate_url(image, field)}
    if isinstance(image, (str, os.PathLike)):
        data = read_image_bytes(image, field)
        validate_encoded_image(data, field)
        return _base64(data)
    if _is_ndarray(image):
        return _base64(encode_array(image, field))
    if _is_pil_image(image):
        return _base64(_encode_pil(image, field))
    raise InvalidImageError(
        field,
        f"unsupported image type {type(image).__name__}: use a path, bytes, an https URL, a numpy array or a PIL image",
    )
