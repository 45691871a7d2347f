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
# Formats libjpeg can decode at a reduced scale (`image_decode: fast`).
DRAFT_FORMATS = ("JPEG", "MPO")

_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I)
_WHITESPACE = re.compile(r"\s+")


def decode_base64(data: str, param: str, limits: ImageLimits) -> bytes:
    """Bytes of a `data:` URI or bare base64 (standard or URL-safe alphabet, whitespace tolerated).

    A 12 MP photo is ~3.3 MB of base64: plain standard base64 decodes straight from the string's own buffer
    (binascii reads an ASCII str in place), a data: URI costs one copy to cut off its prefix, and only the
    rare whitespace-wrapped or URL-safe forms are normalised (copied) first.
    """
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
    try:
        raw = binascii.a2b_base64(data, strict_mode=True)  # = base64.b64decode(data, validate=True), no copy
    except (binascii.Error, ValueError):
        raw = _decode_lenient_base64(data, param)
    if not raw:
        raise InvalidRequest("image is empty", param=param)
    return raw


def _decode_lenient_base64(data: str, param: str) -> bytes:
    """Base64 with line breaks or in the URL-safe alphabet (the standard alphabet's strict decode failed)."""
    if _WHITESPACE.search(data):
        data = _WHITESPACE.sub("", data)
    altchars = b"-_" if ("-" in data or "_" in data) else None
    try:
        return base64.b64decode(data, altchars=altchars, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("image is not valid base64", param=param) from None


# After a scan's header, its entropy-coded data runs to the next marker: 0xFF followed by anything but a stuffed
# zero or a restart marker (RST0-7), which belong to the data.
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7]")
# Markers without a length field: TEM, RST0-7, SOI, EOI.
_STANDALONE = {0x01, *range(0xD0, 0xD8), 0xD8, 0xD9}


def jpeg_scans(raw: bytes) -> int:
    """Scans (SOS segments) of a JPEG's first image, counted by walking its segments; nothing is decoded.

    Decoding costs time per scan over the whole image: a progressive JPEG has about ten, and a crafted one
    repeats a refinement scan thousands of times in a few kilobytes. Segments are skipped by their lengths
    (an EXIF thumbnail's own scans are not counted); the count ends at the first EOI or where the data does.
    """
    scans, pos, end = 0, 2, len(raw)
    while pos + 1 < end:
        if raw[pos] != 0xFF:  # not at a marker: resynchronise at the next one
            found = _NEXT_MARKER.search(raw, pos)
            if found is None:
                break
            pos = found.start()
        while pos < end and raw[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= end:
            break
        marker = raw[pos]
        pos += 1
        if marker == 0x00:  # not a marker: libjpeg skips these bytes and reads on, so the walk resynchronises
            continue
        if marker == 0xD9:
            break
        if marker in _STANDALONE:
            continue
        if pos + 2 > end:
            break
        pos += (raw[pos] << 8) | raw[pos + 1]
        if marker == 0xDA:
            scans += 1
            found = _NEXT_MARKER.search(raw, pos)
            if found is None:
                break
            pos = found.start()
    return scans


def draft_scale(width: int, height: int, min_side: int) -> int:
    """The largest libjpeg scale-down (8, 4, 2, else 1) that keeps both sides at least `min_side` and divides
    both exactly. Exactly: a side that is not a multiple of the scale decodes to a partial last pixel, and the
    decoded image is then not the photo scaled by 1/scale, which shifts the model's resize and crop by up to a
    pixel. Both sides count, so the result holds whichever way EXIF orientation turns the image afterwards."""
    for scale in (8, 4, 2):
        if width % scale == 0 and height % scale == 0 and min(width, height) // scale >= min_side:
            return scale
    return 1


def open_image(raw: bytes, param: str, limits: ImageLimits, draft_size: int | None = None) -> Image.Image:
    """Opens, checks size from the header alone, then decodes and applies EXIF orientation."""
    return load_image(probe_image(raw, param, limits), param, draft_size)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Chunks of a PNG other than its image data (IDAT, fdAT for APNG frames): a real file has a few dozen (text,
# ICC, EXIF, timing); Pillow reads each in Python, so a file of a million empty ones takes it seconds.
MAX_PNG_METADATA_CHUNKS = 512
MAX_PNG_CHUNKS = 65_536
_PIXEL_DATA = (b"IDAT", b"fdAT")


def check_png_chunks(raw: bytes, param: str) -> None:
    """Counts a PNG's chunks by their length fields, before Pillow reads them (at most MAX_PNG_CHUNKS steps)."""
    if not raw.startswith(PNG_SIGNATURE):
        return
    pos, chunks, metadata = len(PNG_SIGNATURE), 0, 0
    while pos + 8 <= len(raw):
        kind = raw[pos + 4 : pos + 8]
        chunks += 1
        metadata += kind not in _PIXEL_DATA
        if metadata > MAX_PNG_METADATA_CHUNKS or chunks > MAX_PNG_CHUNKS:
            raise InvalidRequest(
                f"PNG has more than {MAX_PNG_METADATA_CHUNKS if metadata > MAX_PNG_METADATA_CHUNKS else MAX_PNG_CHUNKS}"
                " chunks" + (" besides its image data" if metadata > MAX_PNG_METADATA_CHUNKS else ""),
                param=param,
            )
        if kind == b"IEND":
            return
        pos += 12 + int.from_bytes(raw[pos : pos + 4], "big")


def probe_image(raw: bytes, param: str, limits: ImageLimits) -> Image.Image:
    """Opens an image from its header alone (format allow-list, per-image pixel cap); nothing is decoded."""
    check_png_chunks(raw, param)
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
    if image.format in DRAFT_FORMATS:
        scans = jpeg_scans(raw)
        if scans > limits.max_jpeg_scans:
            raise InvalidRequest(
                f"JPEG has {scans} scans; the limit is {limits.max_jpeg_scans} (a progressive JPEG has about 10)",
                param=param,
            )
    if width * height > limits.max_image_pixels:
        raise PayloadTooLarge(
            f"image is {width}x{height} = {width * height} pixels; the limit is {limits.max_image_pixels}",
            param=param,
        )
    return image


def load_image(image: Image.Image, param: str, draft_size: int | None = None) -> Image.Image:
    """Decodes a probed image (the first frame of an animation) and applies its EXIF orientation.

    `draft_size`: a JPEG is decoded by libjpeg at a reduced scale (`draft_scale`) whose sides are at least
    `draft_size`; other formats decode in full."""
    try:
        width, height = image.size
        scale = draft_scale(width, height, draft_size) if draft_size and image.format in DRAFT_FORMATS else 1
        if scale > 1:  # before load: what libjpeg decodes. Pillow picks exactly `scale` for this request.
            image.draft("RGB", (width // scale, height // scale))  # "RGB" keeps CMYK and L JPEGs as they are
        image.load()  # first frame of an animation
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


def decode_image(data: str, param: str, limits: ImageLimits, draft_size: int | None = None) -> Image.Image:
    return open_image(decode_base64(data, param, limits), param, limits, draft_size)
