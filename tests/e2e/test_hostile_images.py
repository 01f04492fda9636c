"""Hostile images through the real gateway: mutated files, decompression bombs and an
oversized image all get INVALID_ARGUMENT naming the image, the gateway's memory stays
bounded, and it keeps serving. Odd but whole images (16-bit PNG, broken EXIF, a JPEG
without its end marker) are served."""
from __future__ import annotations

import random

import grpc
import numpy as np
import pytest
from PIL import Image

from bombs import BOMBS
from helpers import TIFF_ASCII, TIFF_SHORT, encode, exif_block, photo, png16, with_app1
from memory import MIB, peak_rss_bytes, reset_peak, rss_bytes
from service._proto import vision_pb2

pytestmark = pytest.mark.e2e

MALFORMED = 40
RSS_GROWTH_LIMIT = 50 * MIB


def _malformed(rng: random.Random, seeds: list[bytes]) -> bytes:
    """A real file cut short, with flipped bits in its first bytes (so it cannot still
    be a complete, valid image)."""
    data = bytearray(rng.choice(seeds))
    del data[rng.randrange(16, len(data) // 2):]
    for _ in range(rng.randrange(1, 4)):
        data[rng.randrange(2, 16)] ^= 1 << rng.randrange(8)
    return bytes(data)


def _classify(vision, data: bytes, index: int = 0):
    good = vision_pb2.Image(encoded=encode(photo("chelsea.png", max_side=64), "PNG"))
    images = [good] * index + [vision_pb2.Image(encoded=data)]
    return vision.Classify(vision_pb2.ClassifyRequest(model="resnet18", images=images), timeout=30)


def _still_serving(vision):
    answer = _classify(vision, encode(photo("coffee.png"), "JPEG"))
    assert answer.results and answer.results[0].labels


def test_malformed_images_are_invalid_argument_and_the_gateway_keeps_serving(stack, vision):
    image = photo("rocket.jpg")
    seeds = [encode(image, "JPEG"), encode(image, "PNG"), encode(image, "WEBP"), encode(image, "BMP")]
    rng = random.Random(7)
    codes = {}
    for i in range(MALFORMED):
        index = i % 3
        try:
            _classify(vision, _malformed(rng, seeds), index)
            codes["OK"] = codes.get("OK", 0) + 1
        except grpc.RpcError as error:
            codes[error.code().name] = codes.get(error.code().name, 0) + 1
            if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                assert error.details().startswith(f"images[{index}].encoded: "), error.details()
    assert codes == {"INVALID_ARGUMENT": MALFORMED}, codes
    assert stack.gateway.poll() is None
    _still_serving(vision)


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_bomb_through_the_gateway(stack, vision, name):
    _still_serving(vision)  # warm: the first call's allocations are not the bomb's
    pid = stack.gateway.pid
    peak = reset_peak(pid)
    before = peak_rss_bytes(pid) if peak else rss_bytes(pid)
    with pytest.raises(grpc.RpcError) as info:
        _classify(vision, BOMBS[name](), 1)
    after = peak_rss_bytes(pid) if peak else rss_bytes(pid)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("images[1].encoded: image is over the limit of")
    assert after - before < RSS_GROWTH_LIMIT, f"gateway peak RSS grew {(after - before) / MIB:.1f} MB"
    _still_serving(vision)


def test_image_over_the_byte_limit(vision):
    # 33 MiB: under the 64 MiB message limit, over the 32 MiB per-image limit.
    with pytest.raises(grpc.RpcError) as info:
        _classify(vision, b"\xff\xd8" + bytes(33 * MIB), 2)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == (
        f"images[2].encoded: {33 * MIB + 2} bytes is over the limit of {32 * MIB} bytes per image")


@pytest.mark.parametrize("delta", [-1, 1])
def test_raw_image_with_the_wrong_data_size(vision, delta):
    good = vision_pb2.Image(encoded=encode(photo("chelsea.png", max_side=64), "PNG"))
    raw = vision_pb2.Image(raw=vision_pb2.RawImage(data=bytes(4 * 5 * 3 + delta), height=4, width=5))
    with pytest.raises(grpc.RpcError) as info:
        vision.Classify(vision_pb2.ClassifyRequest(model="resnet18", images=[good, raw]), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == (
        f"images[1].raw: data has {60 + delta} bytes, expected height*width*3 = 4*5*3 = 60")


def test_16_bit_png_classifies_like_its_8_bit_twin(vision):
    k = np.asarray(photo("coffee.png"), dtype=np.uint8)
    twin = _classify(vision, encode(Image.fromarray(k), "PNG"))
    wide = _classify(vision, png16(k.astype(np.uint16) * 257))
    assert wide.results[0] == twin.results[0]
    grey = np.asarray(photo("coffee.png").convert("L"), dtype=np.uint8)
    assert _classify(vision, png16(grey.astype(np.uint16) * 257)).results[0] == \
        _classify(vision, encode(Image.fromarray(grey), "PNG")).results[0]


def test_malformed_exif_with_orientation_6_is_applied(vision):
    """Orientation 6 readable, XResolution stored as text: OK, and the answer's image
    size is the upright one (stored width and height swapped)."""
    stored = photo("rocket.jpg")
    exif = exif_block([(0x0112, TIFF_SHORT, 1, (6).to_bytes(2, "little")), (0x011A, TIFF_ASCII, 8, b"seventy\0")])
    data = with_app1(encode(stored, "JPEG", quality=90), exif)
    answer = vision.Detect(vision_pb2.DetectRequest(model="yolo", images=[vision_pb2.Image(encoded=data)]), timeout=120)
    assert (answer.results[0].image_width, answer.results[0].image_height) == (stored.height, stored.width)


def test_jpeg_without_its_end_marker_is_served_and_a_cut_one_refused(vision):
    data = encode(photo("coffee.png"), "JPEG", quality=90)
    assert _classify(vision, data[:-2]).results[0] == _classify(vision, data).results[0]
    scan = data.index(b"\xff\xda")
    for cut in (data[:scan + (len(data) - scan) // 2], data[:scan + (len(data) - scan) // 2] + b"\xff\xd9"):
        with pytest.raises(grpc.RpcError) as info:
            _classify(vision, cut, 1)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith("images[1].encoded: corrupt or truncated image: "), \
            info.value.details()
