"""Decoding untrusted image bytes: base64, format allow-list, pixel cap before decoding, EXIF orientation.

Every failure is an `InvalidRequest`/`PayloadTooLarge` that names the input (`param`), so a bad image fails
its own request only and never reaches the encoder's batch.
"""

import base64
import binascii
import io
import re
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from serve_app.config import ImageLimits
from serve_app.errors import InvalidRequest, PayloadTooLarge

# Formats CLIP users send. Pillow's JPEG opener also takes MPO, what many phone cameras write.
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP")

_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I)
_WHITESPACE = re.compile(r"\s+")


def decode_base64(data: str, param: str, limits: ImageLimits) -> bytes:
    """Bytes of a `data:` URI or bare base64 (standard or URL-safe alphabet, whitespace tolerated)."""
    match = _DATA_URI.match(data)
    if match:
        if not match.group("b64"):
            raise InvalidRequest("image data: URIs must be base64-encoded (data:image/...;base64,...)", param=param)
        data = data[match.end():]
    elif data[:5].lower() == "data:":
        raise InvalidRequest("malformed data: URI; expected data:image/<type>;base64,<data>", param=param)
    # base64 grows bytes by 4/3: reject oversized payloads before decoding them.
    if len(data) * 3 // 4 > limits.max_image_bytes:
        raise PayloadTooLarge(
            f"image is larger than the {limits.max_image_bytes} byte limit", param=param
        )
    if _WHITESPACE.search(data):
        data = _WHITESPACE.sub("", data)
    altchars = b"-_" if ("-" in data or "_" in data) else None
    try:
        raw = base64.b64decode(data, altchars=altchars, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("image is not valid base64", param=param) from None
    if not raw:
        raise InvalidRequest("image is empty", param=param)
    return raw


def open_image(raw: bytes, param: str, limits: ImageLimits) -> Image.Image:
    """Opens, checks size from the header alone, then decodes fully and applies EXIF orientation."""
    return load_image(probe_image(raw, param, limits), param)


def probe_image(raw: bytes, param: str, limits: ImageLimits) -> Image.Image:
    """Opens an image from its header alone (format allow-list, per-image pixel cap); nothing is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw), formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard (set to our limit in the Preprocessor) fired first; its message has the size.
        raise PayloadTooLarge(
            f"image has too many pixels; the limit is {limits.max_image_pixels} ({exc})", param=param
        ) from None
    except UnidentifiedImageError:
        raise InvalidRequest(
            f"input is not an image in a supported format ({', '.join(ALLOWED_FORMATS)})", param=param
        ) from None
    except Exception:  # Pillow raises many types on malformed headers
        raise InvalidRequest("image header is truncated or corrupt", param=param) from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidRequest("image has no pixels", param=param)
    if width * height > limits.max_image_pixels:
        raise PayloadTooLarge(
            f"image is {width}x{height} = {width * height} pixels; the limit is {limits.max_image_pixels}",
            param=param,
        )
    return image


def load_image(image: Image.Image, param: str) -> Image.Image:
    """Decodes a probed image (the first frame of an animation) and applies its EXIF orientation."""
    try:
        image.load()
        return ImageOps.exif_transpose(image)
    except Exception:
        raise InvalidRequest("image data is truncated or corrupt", param=param) from None


def check_request_pixels(images: list[Image.Image], params: list[str], budget: int) -> None:
    """All images of a request together, from their headers, before any is decoded."""
    total = 0
    for image, param in zip(images, params):
        total += image.size[0] * image.size[1]
        if total > budget:
            raise PayloadTooLarge(
                f"the request's images have more than {budget} pixels together (at {param})",
                param=_list_param(param),
            )


def _list_param(param: str) -> str:
    return param.split("[", 1)[0].split(".", 1)[0]


def decode_image(data: str, param: str, limits: ImageLimits) -> Image.Image:
    return open_image(decode_base64(data, param, limits), param, limits)
