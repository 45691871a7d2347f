"""Broken and bomb variants of every accepted image format, made from small real images.

A bomb declares a huge size in its header (the header alone must be enough to refuse it); a broken one is a
real image cut short.
"""

import struct

from tests.conftest import encode, random_image
from tests.unit.test_preprocess import png_header_only

SMALL = random_image(64, 48, seed=7)
REAL = {
    "PNG": encode(SMALL, "PNG"),
    "JPEG": encode(SMALL, "JPEG", quality=90),
    "GIF": encode(SMALL.convert("P"), "GIF"),
    "WEBP": encode(SMALL, "WEBP", quality=80),
    "BMP": encode(SMALL, "BMP"),
}


def truncated(fmt: str) -> bytes:
    raw = REAL[fmt]
    return raw[: max(len(raw) // 2, 40)]


def _jpeg_bomb() -> bytes:
    raw = bytearray(REAL["JPEG"])
    for marker in (b"\xff\xc0", b"\xff\xc2", b"\xff\xc1"):  # SOF0/SOF2/SOF1: length, precision, height, width
        at = raw.find(marker)
        if at >= 0:
            raw[at + 5 : at + 9] = struct.pack(">HH", 60000, 60000)
            return bytes(raw)
    raise AssertionError("no SOF marker")


def _gif_bomb() -> bytes:
    raw = bytearray(REAL["GIF"])
    raw[6:10] = struct.pack("<HH", 65535, 65535)  # logical screen
    return bytes(raw)


def _webp_bomb() -> bytes:
    raw = bytearray(REAL["WEBP"])
    assert raw[12:16] == b"VP8 " and raw[23:26] == b"\x9d\x01\x2a"
    raw[26:30] = struct.pack("<HH", 16383, 16383)  # 14-bit width and height of a lossy frame
    return bytes(raw)


def _bmp_bomb() -> bytes:
    raw = bytearray(REAL["BMP"])
    raw[18:26] = struct.pack("<ii", 40000, 40000)
    return bytes(raw)


BOMBS = {
    "PNG": lambda: png_header_only(20000, 20000),
    "JPEG": _jpeg_bomb,
    "GIF": _gif_bomb,
    "WEBP": _webp_bomb,
    "BMP": _bmp_bomb,
}
