"""Decompression-bomb images: small files whose valid headers claim huge sizes.

Each is a real, well-formed file of its format (correct chunk CRCs, markers and
bitstream headers) with only the size fields changed, so a decoder that trusts the
header would try to allocate width x height pixels. Used by the hostile-image tests
and benchmarks/bench_bombs.py.
"""
from __future__ import annotations

import io
import struct
import zlib

from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """PNG, 8-bit RGB, with a valid IHDR claiming width x height and a few rows of
    zero pixels in a valid IDAT (a full image of zeros would compress to ~30 MB)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress((b"\0" + b"\0" * 3 * width) * 4, 9)
    return PNG_SIGNATURE + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", rows) + _png_chunk(b"IEND", b"")


def _small(fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 140, 200)).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def jpeg_bomb(width: int = 65_000, height: int = 65_000) -> bytes:
    """A real baseline JPEG whose SOF0 frame header claims width x height."""
    data = bytearray(_small("JPEG", quality=90))
    sof = data.find(b"\xff\xc0")
    if sof < 0:
        raise AssertionError("no SOF0 marker in the JPEG")
    # SOF0: marker(2) length(2) precision(1) height(2) width(2)
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def webp_bomb(width: int = 16_383, height: int = 16_383) -> bytes:
    """A real lossy WebP whose VP8 key-frame header claims width x height (16383 is
    the format's largest side: 14 bits)."""
    data = bytearray(_small("WEBP", quality=80))
    chunk = data.find(b"VP8 ")
    if chunk < 0:
        raise AssertionError("no VP8 chunk in the WebP")
    frame = chunk + 8  # chunk id(4) + size(4)
    if data[frame + 3:frame + 6] != b"\x9d\x01\x2a":
        raise AssertionError("no VP8 start code")
    # 14-bit sizes, upper 2 bits are the (zero) scaling fields.
    struct.pack_into("<HH", data, frame + 6, width & 0x3FFF, height & 0x3FFF)
    return bytes(data)


BOMBS = {
    "png_100k_x_100k": png_bomb,
    "jpeg_65k_x_65k": jpeg_bomb,
    "webp_16k_x_16k": webp_bomb,
}
