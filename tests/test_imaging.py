"""Pure image ops against torchvision's PIL transforms and Pillow itself."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from helpers import PHOTO_NAMES, as_array, encode, photo, with_exif_orientation
from service.ops import imaging
from service.ops import resize as resize_ops
from service.errors import InvalidArgument

MAX_PIXELS = 40_000_000


@pytest.fixture(scope="module")
def tv_transforms():
    from service import tvshim

    tvshim.install()
    from torchvision import transforms

    return transforms


@pytest.mark.parametrize("name", PHOTO_NAMES)
@pytest.mark.parametrize("resize,crop", [(256, 224), (232, 224), (160, 128)])
def test_resize_center_crop_matches_torchvision(tv_transforms, name, resize, crop):
    # Full-size photos: this is where the resize really reduces.
    image = photo(name, max_side=1024)
    reference = tv_transforms.Compose([
        tv_transforms.Resize(resize), tv_transforms.CenterCrop(crop), tv_transforms.PILToTensor()])(image).numpy()
    ours = resize_ops.resize_center_crop(image, resize, crop, crop)
    assert ours.shape == reference.shape == (3, crop, crop)
    diff = np.abs(ours.astype(np.int16) - reference.astype(np.int16))
    assert diff.mean() <= 1.0, f"mean abs diff {diff.mean():.3f} levels"
    assert diff.max() <= 2


def test_resized_size_rounds_like_torchvision(tv_transforms):
    for w, h in [(451, 300), (300, 451), (640, 427), (1000, 999), (257, 256)]:
        expected = tv_transforms.Resize(256)(Image.new("RGB", (w, h))).size
        assert resize_ops.resized_size_shorter_side(w, h, 256) == expected


@pytest.mark.parametrize("fmt,kwargs", [("PNG", {}), ("JPEG", {"quality": 95}), ("WEBP", {"lossless": True}),
                                        ("BMP", {})])
def test_decode_allowed_formats(fmt, kwargs):
    image = photo("chelsea.png")
    decoded = imaging.decode_encoded(encode(image, fmt, **kwargs), "images[0].encoded", MAX_PIXELS)
    assert decoded.image.mode == "RGB"
    assert (decoded.width, decoded.height) == image.size
    if fmt != "JPEG":
        np.testing.assert_array_equal(as_array(decoded.image), as_array(image))


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied(orientation):
    image = photo("rocket.jpg")
    decoded = imaging.decode_encoded(with_exif_orientation(image, orientation), "f", MAX_PIXELS)
    assert decoded.image.size == image.size
    diff = np.abs(as_array(decoded.image).astype(int) - as_array(image).astype(int)).mean()
    assert diff < 4, f"upright image differs by {diff:.1f} levels on average"


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA"])
def test_grayscale_alpha_and_palette_become_rgb(mode):
    source = photo("coffee.png").convert(mode)
    decoded = imaging.decode_encoded(encode(source, "PNG"), "f", MAX_PIXELS)
    assert decoded.image.mode == "RGB"
    np.testing.assert_array_equal(as_array(decoded.image), as_array(source.convert("RGB")))


def test_raw_image_round_trip():
    image = photo("astronaut.png")
    array = as_array(image)
    decoded = imaging.decode_raw(array.tobytes(), array.shape[0], array.shape[1], "images[1].raw", MAX_PIXELS)
    np.testing.assert_array_equal(as_array(decoded.image), array)


@pytest.mark.parametrize("data,needle", [
    (b"", "empty"),
    (b"definitely not an image", "not a decodable image"),
    (b"GIF89a" + bytes(64), "not a decodable image"),
])
def test_bad_bytes_name_the_field(data, needle):
    with pytest.raises(InvalidArgument) as info:
        imaging.decode_encoded(data, "images[3].encoded", MAX_PIXELS)
    assert info.value.field == "images[3].encoded"
    assert needle in info.value.message


def test_truncated_jpeg_is_refused():
    data = encode(photo("chelsea.png"), "JPEG")
    with pytest.raises(InvalidArgument) as info:
        imaging.decode_encoded(data[: len(data) // 2], "images[0].encoded", MAX_PIXELS)
    assert "truncated" in info.value.message or "corrupt" in info.value.message


def test_pixel_limit_checked_from_header():
    data = encode(Image.new("RGB", (400, 300)), "PNG")
    with pytest.raises(InvalidArgument, match="over the limit of 100000"):
        imaging.decode_encoded(data, "images[0].encoded", 100_000)


def test_raw_size_mismatch_names_sizes():
    with pytest.raises(InvalidArgument, match=r"expected height\*width\*3 = 2\*2\*3 = 12"):
        imaging.decode_raw(bytes(11), 2, 2, "images[0].raw", MAX_PIXELS)


def test_normalize_matches_formula():
    batch = np.random.default_rng(0).integers(0, 256, (2, 3, 4, 5), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    expected = (batch / 255.0 - np.array(mean).reshape(1, 3, 1, 1)) / np.array(std).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(imaging.normalize(batch, mean, std), expected, rtol=1e-5, atol=1e-5)


def test_softmax_and_top_k_against_reference():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 1000)).astype(np.float32) * 10
    probs = imaging.softmax(logits)
    reference = np.exp(logits - logits.max(1, keepdims=True))
    reference /= reference.sum(1, keepdims=True)
    np.testing.assert_allclose(probs, reference, rtol=1e-5, atol=1e-7)
    for row in probs:
        idx, values = imaging.top_k(row, 5)
        expected = np.argsort(-row, kind="stable")[:5]
        np.testing.assert_array_equal(idx, expected)
        np.testing.assert_array_equal(values, row[expected])


def test_top_k_ties_keep_index_order():
    idx, _ = imaging.top_k(np.array([0.1, 0.5, 0.5, 0.2, 0.5], dtype=np.float32), 3)
    assert idx.tolist() == [1, 2, 4]
    assert imaging.top_k(np.array([1.0, 2.0], dtype=np.float32), 10)[0].tolist() == [1, 0]
