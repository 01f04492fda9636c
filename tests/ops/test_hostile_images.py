"""Decompression bombs and size limits, in the gateway's own decode path.

The bombs are tiny files with valid headers claiming huge sizes (tests/bombs.py).
Refusal must come from the header: the peak RSS of this process may not grow by more
than 50 MB while one is refused. How fast they are refused (goal: < 50 ms) is measured
by benchmarks/bench_bombs.py, not asserted here.
"""
from __future__ import annotations

import asyncio

import pytest

from bombs import BOMBS, jpeg_bomb, png_bomb, webp_bomb
from memory import MIB, peak_rss_bytes, reset_peak, rss_bytes
from service.gateway.dataplane import DataPlane
from service.errors import InvalidArgument
from service.pipelines.common import ImageInput, decode_image
from service.settings import load_settings

RSS_GROWTH_LIMIT = 50 * MIB
MAX_PIXELS = 40_000_000


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_bomb_refused_from_the_header(name):
    data = BOMBS[name]()
    assert len(data) < 4096  # a bomb is small on the wire
    peak_tracked = reset_peak()
    before = peak_rss_bytes() if peak_tracked else rss_bytes()
    with pytest.raises(InvalidArgument) as info:
        decode_image(ImageInput(encoded=data), 2, MAX_PIXELS)
    after = peak_rss_bytes() if peak_tracked else rss_bytes()
    assert info.value.field == "images[2].encoded"
    assert "over the limit" in info.value.message and "pixels" in info.value.message
    assert after - before < RSS_GROWTH_LIMIT, f"{(after - before) / MIB:.1f} MB"


@pytest.mark.parametrize("make", [png_bomb, jpeg_bomb, webp_bomb])
def test_header_just_over_the_limit_names_its_size(make):
    # 7000 x 7000 = 49 MP: over our 40 MP limit, under Pillow's own; our check refuses.
    with pytest.raises(InvalidArgument, match="image is 7000x7000 = 49000000 pixels, over the limit of 40000000"):
        decode_image(ImageInput(encoded=make(7000, 7000)), 0, MAX_PIXELS)


def test_bombs_are_real_files_of_their_format():
    # With Pillow's limit lifted, each opens as its format at the claimed size.
    import io

    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        sizes = {name: Image.open(io.BytesIO(make())) for name, make in BOMBS.items()}
        assert {n: (im.format, im.size) for n, im in sizes.items()} == {
            "png_100k_x_100k": ("PNG", (100_000, 100_000)),
            "jpeg_65k_x_65k": ("JPEG", (65_000, 65_000)),
            "webp_16k_x_16k": ("WEBP", (16_383, 16_383)),
        }
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def test_image_byte_limit_checked_before_decoding():
    plane = DataPlane(load_settings(max_image_bytes=4096), triton=None)
    try:
        ok = ImageInput(encoded=b"\0" * 4096)
        plane.check_images([ok, ok])  # at the limit: decoding decides
        with pytest.raises(InvalidArgument) as info:
            plane.check_images([ok, ImageInput(encoded=b"\0" * 4097)])
        assert info.value.field == "images[1].encoded"
        assert "4097 bytes is over the limit of 4096 bytes per image" in info.value.message
        # The whole run stops there: no model lookup (there is no Triton here at all).
        with pytest.raises(InvalidArgument, match="images\\[0\\].encoded"):
            asyncio.run(plane.run(None, "m", "", [ImageInput(encoded=bytes(5000))], {}, None))
    finally:
        plane.close()


def test_pixel_limit_setting_bounded_by_pillow():
    from pydantic import ValidationError

    from service.ops.imaging import PILLOW_MAX_PIXELS

    assert load_settings(max_image_pixels=PILLOW_MAX_PIXELS).max_image_pixels == PILLOW_MAX_PIXELS
    with pytest.raises(ValidationError):
        load_settings(max_image_pixels=PILLOW_MAX_PIXELS + 1)


def test_image_byte_limit_read_from_the_environment(monkeypatch):
    from pydantic import ValidationError

    monkeypatch.setenv("CONVSERVE_MAX_IMAGE_BYTES", "2097152")
    assert load_settings().max_image_bytes == 2 * MIB
    monkeypatch.setenv("CONVSERVE_MAX_IMAGE_BYTES", "0")
    with pytest.raises(ValidationError):
        load_settings()
