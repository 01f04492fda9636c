"""Fuzzing the gateway's decode path with hypothesis.

Real JPEG/PNG/WebP/BMP files are mutated (bit flips, truncation, overwritten header
fields, inserted and random bytes) and fed to `decode_image`, the function the data
plane calls for every request image. The only allowed outcomes are a fully decoded
RGB image or `InvalidArgument` naming the field: any other exception is a crash.

CI runs a bounded, derandomized set (CONVSERVE_FUZZ_EXAMPLES, default 250 per test);
`make fuzz` raises it for a longer run.
"""
from __future__ import annotations

import io
import os
import re
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import encode, exif_block, photo, png16, with_app1
from service.errors import InvalidArgument
from service.ops.resize import to_chw
from service.pipelines.common import ImageInput, decode_image

EXAMPLES = int(os.environ.get("CONVSERVE_FUZZ_EXAMPLES", "250"))
MAX_PIXELS = 40_000_000
FIELD = "images[5].encoded"
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Small real images (a photo at 48 px) in every allowed format and in the variants
# their decoders branch on: progressive JPEG, palette/grey/alpha PNG, lossy/lossless
# WebP, EXIF-tagged JPEG.
def _seeds() -> dict[str, bytes]:
    from PIL import Image

    image = photo("chelsea.png", max_side=48)
    exif = Image.Exif()
    exif[0x0112] = 6
    return {
        "jpeg": encode(image, "JPEG", quality=85),
        "jpeg_progressive": encode(image, "JPEG", quality=85, progressive=True),
        "jpeg_exif": encode(image, "JPEG", quality=85, exif=exif.tobytes()),
        "png": encode(image, "PNG"),
        "png_palette": encode(image.convert("P"), "PNG"),
        "png_gray_alpha": encode(image.convert("LA"), "PNG"),
        "webp_lossy": encode(image, "WEBP", quality=80),
        "webp_lossless": encode(image, "WEBP", lossless=True),
        "bmp": encode(image, "BMP"),
        "bmp_palette": encode(image.convert("P"), "BMP"),
        "png_16bit_rgb": png16(np.asarray(image, dtype=np.uint16) * 257),
    }


SEEDS = _seeds()
# Values that break size and offset arithmetic in headers.
INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 65_000, 100_000]
# Internals that must never reach a client in an error message.
LEAKS = re.compile(r"Traceback|File \"|site-packages|\.py\b|<_io\.|object at 0x")


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "header_field", "overwrite", "insert", "delete"]))
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "header_field":
            # Sizes, offsets and lengths live in the first bytes of every format.
            pos = draw(st.integers(0, min(len(data), 64) - 1))
            value = draw(st.sampled_from(INTERESTING))
            width = draw(st.sampled_from([(1, "B"), (2, ">H"), (2, "<H"), (4, ">I"), (4, "<I")]))
            packed = struct.pack(width[1], value & ((1 << (8 * width[0])) - 1))
            data[pos:pos + width[0]] = packed
        elif kind == "overwrite":
            data[pos:pos + 8] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=32))
        else:
            del data[pos:pos + draw(st.integers(1, 64))]
    return bytes(data)


def check_decode(data: bytes) -> None:
    """The property: a usable RGB image, or InvalidArgument naming the field."""
    try:
        decoded = decode_image(ImageInput(encoded=data), 5, MAX_PIXELS)
    except InvalidArgument as exc:
        assert exc.field == FIELD
        assert not LEAKS.search(exc.message), exc.message
        return
    assert decoded.image.mode == "RGB" and decoded.width > 0 and decoded.height > 0
    chw = to_chw(decoded.image)  # every pixel is there: nothing lazy or partial remains
    assert chw.shape == (3, decoded.height, decoded.width) and chw.dtype == np.uint8


@FUZZ
@given(mutated())
def test_mutated_real_images(data):
    check_decode(data)


@FUZZ
@given(st.sampled_from([b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF", b"BM", b""]), st.binary(max_size=512))
def test_random_bytes_behind_real_magic(magic, tail):
    check_decode(magic + tail)


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_seeds_decode(name):
    # The corpus itself must decode, or the mutations above test nothing.
    decoded = decode_image(ImageInput(encoded=SEEDS[name]), 0, MAX_PIXELS)
    size = photo("chelsea.png", max_side=48).size
    # EXIF orientation 6 turns the image a quarter.
    assert decoded.image.size == (size[::-1] if name == "jpeg_exif" else size)


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_truncation_never_gives_a_partial_image(name):
    """Every cut point of every seed: InvalidArgument, or (when only bytes after the
    pixel data were cut, e.g. a PNG's IEND) exactly the pixels of the whole file."""
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    data = SEEDS[name]
    whole = to_chw(decode_image(ImageInput(encoded=data), 0, MAX_PIXELS).image)
    refused = 0
    for cut in range(len(data)):
        try:
            decoded = decode_image(ImageInput(encoded=data[:cut]), 0, MAX_PIXELS)
        except InvalidArgument as exc:
            assert exc.field == "images[0].encoded"
            refused += 1
            continue
        np.testing.assert_array_equal(to_chw(decoded.image), whole, err_msg=f"cut at {cut} of {len(data)}")
    assert refused >= len(data) - 64  # only a short tail may go without changing pixels


@pytest.mark.parametrize("name", ["jpeg", "jpeg_progressive", "jpeg_exif"])
def test_truncation_with_the_end_marker_put_back_never_gives_a_partial_image(name):
    """The same, with FFD9 appended at every cut: libjpeg would pad the missing scan
    data with grey without an error."""
    data = SEEDS[name]
    whole = to_chw(decode_image(ImageInput(encoded=data), 0, MAX_PIXELS).image)
    for cut in range(len(data)):
        try:
            decoded = decode_image(ImageInput(encoded=data[:cut] + b"\xff\xd9"), 0, MAX_PIXELS)
        except InvalidArgument:
            continue
        np.testing.assert_array_equal(to_chw(decoded.image), whole, err_msg=f"cut at {cut} of {len(data)}")


# EXIF tags that Pillow or a viewer reads (Orientation, resolutions, unit, Software,
# DateTime, the Exif and GPS IFD pointers), and any tag.
EXIF_TAGS = [0x0112, 0x011A, 0x011B, 0x0128, 0x0131, 0x0132, 0x8769, 0x8825, 0x0201, 0x0202]
EXIF_JPEG = encode(photo("chelsea.png", max_side=48), "JPEG", quality=85)


@st.composite
def exif_entries(draw) -> bytes:
    """An EXIF block of random IFD entries: tag, type (valid 1..12 and not), count and
    value/offset field, each drawn among values that break parsers and at random."""
    entries = []
    for _ in range(draw(st.integers(0, 6))):
        tag = draw(st.sampled_from(EXIF_TAGS) | st.integers(0, 0xFFFF))
        kind = draw(st.integers(0, 14))
        count = draw(st.sampled_from(INTERESTING) | st.integers(0, 16))
        value = draw(st.binary(min_size=0, max_size=4) | st.binary(min_size=5, max_size=24)
                     | st.sampled_from([v.to_bytes(4, "little") for v in INTERESTING]))
        entries.append((tag, kind, count, value))
    block = bytearray(exif_block(entries, draw(st.sampled_from(["<", ">"]))))
    for _ in range(draw(st.integers(0, 2))):  # and a few bytes of the block itself
        pos = draw(st.integers(6, len(block) - 1))
        block[pos] = draw(st.integers(0, 255))
    return bytes(block)


@FUZZ
@given(exif_entries(), st.sampled_from(["jpeg", "png", "webp"]))
def test_random_exif_blocks(exif, container):
    """Whatever the EXIF says, the image decodes (turned or as stored): the pixel data
    is intact, and EXIF is metadata that never fails a request."""
    if container == "jpeg":
        data = with_app1(EXIF_JPEG, exif)
    else:
        from PIL import Image

        # Pillow writes the block as PNG's eXIf chunk / WebP's EXIF chunk.
        image = photo("chelsea.png", max_side=48)
        data = encode(image, container.upper(), exif=exif[6:]) if container == "png" else \
            encode(image, "WEBP", lossless=True, exif=exif)
        assert Image.open(io.BytesIO(data)).info.get("exif")
    decoded = decode_image(ImageInput(encoded=data), 5, MAX_PIXELS)
    assert sorted(decoded.image.size) == sorted(photo("chelsea.png", max_side=48).size)
    check_decode(data)


def test_load_truncated_images_switched_on_is_refused(monkeypatch):
    """If anything in the process turns Pillow's LOAD_TRUNCATED_IMAGES on, the gateway
    fails closed (INTERNAL) instead of padding truncated images with grey."""
    from PIL import ImageFile

    from service.errors import Internal

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(Internal):
        decode_image(ImageInput(encoded=SEEDS["png"]), 0, MAX_PIXELS)
