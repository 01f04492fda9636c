"""Pure image ops against torchvision's PIL transforms and Pillow itself."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from helpers import (PHOTO_NAMES, TIFF_ASCII, TIFF_LONG, TIFF_RATIONAL, TIFF_SHORT, as_array, encode, exif_block,
                     photo, png16, with_app1, with_exif_orientation)
from service.ops import imaging
from service.ops import resize as resize_ops
from service.errors import InvalidArgument

MAX_PIXELS = 40_000_000


@pytest.fixture(scope="module")
def tv_transforms():
    from service.export import tvshim

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


# --- High bit depth: scaled to 8 bits, never clipped -----------------------------------

def _twin_samples(channels: int) -> np.ndarray:
    """8-bit samples k from a real photo (and a ramp for alpha), uint8 [H, W(, C)]."""
    rgb = as_array(photo("coffee.png", max_side=64))
    gray = np.asarray(photo("coffee.png", max_side=64).convert("L"))
    ramp = (np.arange(gray.size) % 256).astype(np.uint8).reshape(gray.shape)
    return {1: gray, 2: np.dstack([gray, ramp]), 3: rgb, 4: np.dstack([rgb, ramp])}[channels]


@pytest.mark.parametrize("channels,mode8", [(1, "L"), (2, "LA"), (3, "RGB"), (4, "RGBA")])
def test_16_bit_png_decodes_like_its_8_bit_twin(channels, mode8):
    """Samples k * 257 (16-bit grey, grey+alpha, 48-bit RGB, 64-bit RGBA) decode exactly
    like the 8-bit PNG with samples k, as Pillow decodes that twin."""
    k = _twin_samples(channels)
    expected = as_array(Image.open(io.BytesIO(encode(Image.fromarray(k, mode8), "PNG"))))
    decoded = imaging.decode_encoded(png16(k.astype(np.uint16) * 257), "f", MAX_PIXELS)
    assert decoded.image.mode == "RGB"
    np.testing.assert_array_equal(as_array(decoded.image), expected)
    assert expected.std() > 20  # a real photo, not the near-uniform white of clipping


def test_16_bit_grey_keeps_the_high_byte_like_pillows_48_bit_rgb():
    """Every 16-bit value v maps to v >> 8 (numpy reference), and grey v decodes exactly
    as 48-bit RGB (v, v, v), which Pillow's own PNG decoder reduces."""
    v = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    grey = as_array(imaging.decode_encoded(png16(v), "f", MAX_PIXELS).image)
    np.testing.assert_array_equal(grey, np.repeat((v >> 8).astype(np.uint8)[:, :, None], 3, axis=2))
    rgb48 = as_array(imaging.decode_encoded(png16(np.dstack([v, v, v])), "f", MAX_PIXELS).image)
    np.testing.assert_array_equal(grey, rgb48)


@pytest.mark.parametrize("mode", ["I;16", "I;16L", "I;16B", "I"])
def test_16_bit_in_every_pillow_integer_mode(mode):
    k = np.asarray(photo("chelsea.png", max_side=64).convert("L"))
    wide = k.astype(np.int64) * 257
    dtype = {"I;16": "<u2", "I;16L": "<u2", "I;16B": ">u2", "I": "<i4"}[mode]
    image = Image.frombytes(mode, (k.shape[1], k.shape[0]), wide.astype(dtype).tobytes())
    np.testing.assert_array_equal(as_array(imaging.to_rgb8(image)), as_array(Image.fromarray(k, "L")))


def test_32_bit_integer_samples_outside_16_bits_are_clipped_to_its_range():
    values = np.array([[-5, 0, 65535, 70000, 2**31 - 1]], dtype=np.int32)
    out = as_array(imaging.to_rgb8(Image.fromarray(values)))[..., 0]
    np.testing.assert_array_equal(out, [[0, 0, 255, 255, 255]])


def test_float_samples_are_taken_as_0_to_1():
    k = np.asarray(photo("chelsea.png", max_side=64).convert("L"))
    image = Image.fromarray((k / 255.0).astype(np.float32))
    assert image.mode == "F"
    np.testing.assert_array_equal(as_array(imaging.to_rgb8(image)), as_array(Image.fromarray(k, "L")))
    edges = Image.fromarray(np.array([[-1.0, np.nan, 0.5, 2.0, np.inf]], dtype=np.float32))
    np.testing.assert_array_equal(as_array(imaging.to_rgb8(edges))[..., 0], [[0, 0, 128, 255, 255]])


# --- EXIF: only a readable Orientation counts ------------------------------------------

# Where the upright image comes from, per EXIF Orientation (EXIF 2.32 section 4.6.4: the
# visual position of the stored row 0 / column 0), written with numpy alone.
NUMPY_UPRIGHT = {
    1: lambda s: s,
    2: lambda s: s[:, ::-1],                          # row 0 top, column 0 right
    3: lambda s: s[::-1, ::-1],                       # row 0 bottom, column 0 right
    4: lambda s: s[::-1],                             # row 0 bottom, column 0 left
    5: lambda s: s.transpose(1, 0, 2),                # row 0 left, column 0 top
    6: lambda s: np.rot90(s, k=-1),                   # row 0 right, column 0 top
    7: lambda s: s[::-1, ::-1].transpose(1, 0, 2),    # row 0 right, column 0 bottom
    8: lambda s: np.rot90(s, k=1),                    # row 0 left, column 0 bottom
}
_ORIENT_6 = (0x0112, TIFF_SHORT, 1, (6).to_bytes(2, "little"))


def _stored_and_decoded(entries, byte_order="<"):
    """A JPEG (non-square photo) with a hand-built EXIF block; its stored pixels (Pillow's
    decode, which ignores EXIF) and what the gateway decodes."""
    jpeg = with_app1(encode(photo("rocket.jpg", max_side=96), "JPEG", quality=90), exif_block(entries, byte_order))
    stored = as_array(Image.open(io.BytesIO(jpeg)))
    return stored, imaging.decode_encoded(jpeg, "images[0].encoded", MAX_PIXELS)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("byte_order", ["<", ">"])
def test_every_exif_orientation_against_numpy(orientation, byte_order):
    value = orientation.to_bytes(2, "little" if byte_order == "<" else "big")
    stored, decoded = _stored_and_decoded([(0x0112, TIFF_SHORT, 1, value)], byte_order)
    expected = NUMPY_UPRIGHT[orientation](stored)
    np.testing.assert_array_equal(as_array(decoded.image), expected)
    assert (decoded.width, decoded.height) == (expected.shape[1], expected.shape[0])


@pytest.mark.parametrize("other", [
    [(0x011A, TIFF_ASCII, 8, b"seventy\0")],                                # XResolution as text
    [(0x0131, TIFF_RATIONAL, 1, (1).to_bytes(4, "little") * 2)],            # Software as a number
    [(0x0128, TIFF_ASCII, 4, b"abc\0"), (0x011A, TIFF_RATIONAL, 1, bytes(8))],  # unit text, 0/0 dpi
    [(0x8769, TIFF_LONG, 1, (0xFFFFFF).to_bytes(4, "little"))],             # Exif IFD far past the end
], ids=["xresolution_ascii", "software_rational", "unit_ascii_zero_dpi", "exif_ifd_out_of_range"])
def test_readable_orientation_applied_whatever_else_is_broken(other):
    stored, decoded = _stored_and_decoded([_ORIENT_6] + other)
    np.testing.assert_array_equal(as_array(decoded.image), np.rot90(stored, k=-1))
    assert (decoded.width, decoded.height) == (stored.shape[0], stored.shape[1])  # turned a quarter


@pytest.mark.parametrize("entry", [
    (0x0112, TIFF_ASCII, 2, b"6\0"),
    (0x0112, TIFF_RATIONAL, 1, (6).to_bytes(4, "little") + (1).to_bytes(4, "little")),
    (0x0112, TIFF_SHORT, 1, (0).to_bytes(2, "little")),
    (0x0112, TIFF_SHORT, 1, (9).to_bytes(2, "little")),
    (0x0112, TIFF_SHORT, 1, (0xFFFF).to_bytes(2, "little")),
], ids=["ascii", "rational", "zero", "nine", "ffff"])
def test_unreadable_orientation_leaves_the_image_as_stored(entry):
    stored, decoded = _stored_and_decoded([entry, (0x011A, TIFF_ASCII, 4, b"72\0\0")])
    np.testing.assert_array_equal(as_array(decoded.image), stored)
    assert (decoded.width, decoded.height) == (stored.shape[1], stored.shape[0])


def test_garbage_exif_block_leaves_the_image_as_stored():
    jpeg = encode(photo("rocket.jpg", max_side=96), "JPEG", quality=90)
    for payload in [b"Exif\0\0" + b"II*\0" + b"\xff" * 40, b"Exif\0\0MM\0*\0\0\0\x08\xff\xff", b"Exif\0\0"]:
        decoded = imaging.decode_encoded(with_app1(jpeg, payload), "f", MAX_PIXELS)
        np.testing.assert_array_equal(as_array(decoded.image), as_array(Image.open(io.BytesIO(jpeg))))


# --- JPEG end marker --------------------------------------------------------------------

JPEG_VARIANTS = {
    "baseline": {"quality": 90},
    "progressive": {"quality": 90, "progressive": True},
    "optimized_444": {"quality": 95, "optimize": True, "subsampling": 0},
    "restart_markers": {"quality": 90, "restart_marker_blocks": 4},
    "restart_rows_progressive": {"quality": 90, "restart_marker_rows": 1, "progressive": True},
    "restart_grey_444": {"quality": 90, "mode": "L", "restart_marker_blocks": 3},
    "grey": {"quality": 90, "mode": "L"},
    "grey_progressive": {"quality": 90, "mode": "L", "progressive": True},
    "cmyk": {"quality": 90, "mode": "CMYK"},
}


def _jpeg(variant: str, max_side: int = 160) -> bytes:
    kwargs = dict(JPEG_VARIANTS[variant])
    image = photo("astronaut.png", max_side=max_side).convert(kwargs.pop("mode", "RGB"))
    return encode(image, "JPEG", **kwargs)


def _pillow(data: bytes) -> np.ndarray:
    return as_array(Image.open(io.BytesIO(data)))


@pytest.mark.parametrize("variant", sorted(JPEG_VARIANTS))
@pytest.mark.parametrize("missing", [1, 2])
def test_jpeg_missing_only_its_end_marker_decodes_whole(variant, missing):
    data = _jpeg(variant)
    assert data.endswith(b"\xff\xd9")
    decoded = imaging.decode_encoded(data[:-missing], "images[0].encoded", MAX_PIXELS)
    np.testing.assert_array_equal(as_array(decoded.image), _pillow(data))


@pytest.mark.parametrize("variant", sorted(JPEG_VARIANTS))
@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("end_marker", [b"", b"\xff\xd9"], ids=["cut", "cut_plus_end_marker"])
def test_jpeg_cut_inside_its_scan_data_is_refused(variant, fraction, end_marker):
    data = _jpeg(variant)
    scan_start = data.index(b"\xff\xda")
    cut = scan_start + int((len(data) - 2 - scan_start) * fraction)
    with pytest.raises(InvalidArgument) as info:
        imaging.decode_encoded(data[:cut] + end_marker, "images[0].encoded", MAX_PIXELS)
    assert info.value.field == "images[0].encoded"
    assert "corrupt or truncated image: " in info.value.message


@pytest.mark.parametrize("variant", ["progressive", "grey_progressive"])
def test_progressive_jpeg_cut_between_scans_is_refused(variant):
    """Cut right before any later scan (or the tables in front of it), with the end
    marker put back: a valid-looking JPEG of lower quality, refused."""
    data = _jpeg(variant)
    first_scan = data.index(b"\xff\xda")
    cuts = [i for i in range(first_scan + 2, len(data) - 2)
            if data[i] == 0xFF and data[i + 1] in (0xC4, 0xDA)]
    assert len(cuts) >= 4
    for cut in cuts:
        with pytest.raises(InvalidArgument, match="corrupt or truncated image"):
            imaging.decode_encoded(data[:cut] + b"\xff\xd9", "f", MAX_PIXELS)


@pytest.mark.parametrize("variant", sorted(JPEG_VARIANTS))
def test_jpeg_cut_anywhere_with_end_marker_put_back_never_gives_a_partial_image(variant):
    """Every cut point of a small JPEG, with FFD9 appended: refused, or (only when no
    image data was lost) exactly the whole file's pixels."""
    data = _jpeg(variant, max_side=40)
    whole = _pillow(data)
    accepted = []
    for cut in range(2, len(data)):
        try:
            decoded = imaging.decode_encoded(data[:cut] + b"\xff\xd9", "f", MAX_PIXELS)
        except InvalidArgument:
            continue
        np.testing.assert_array_equal(as_array(decoded.image), whole, err_msg=f"cut at {cut} of {len(data)}")
        accepted.append(cut)
    assert accepted and min(accepted) >= len(data) - 8, accepted


def test_bytes_after_the_jpeg_end_marker_are_ignored():
    data = _jpeg("baseline")
    decoded = imaging.decode_encoded(data + b"trailing bytes \x00\xff\x00", "f", MAX_PIXELS)
    np.testing.assert_array_equal(as_array(decoded.image), _pillow(data))


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


def test_complete_jpeg_with_extraneous_bytes_before_a_marker_is_accepted():
    """libjpeg warns "N extraneous bytes before marker 0xd9" for bytes between the last
    scan and the end marker, as some camera files have; the image is whole."""
    data = _jpeg("baseline")
    padded = data[:-2] + b"\x12\x34\x56" + data[-2:]
    decoded = imaging.decode_encoded(padded, "f", MAX_PIXELS)
    np.testing.assert_array_equal(as_array(decoded.image), _pillow(data))


def test_cut_jpeg_with_a_damaged_header_is_refused():
    """A JPEG cut inside its image data whose header also has flipped bits: libjpeg's
    first complaint is then about the header ("extraneous bytes before marker 0xdb"),
    which must not let the cut through."""
    import random

    seed = _jpeg("baseline", max_side=120)
    rng = random.Random(7)
    for _ in range(200):
        data = bytearray(seed)
        del data[rng.randrange(len(data) // 4, len(data) - 8):]
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(2, 40)] ^= 1 << rng.randrange(8)
        with pytest.raises(InvalidArgument):
            imaging.decode_encoded(bytes(data), "f", MAX_PIXELS)


@pytest.mark.parametrize("photo_name", PHOTO_NAMES)
@pytest.mark.parametrize("quality, subsampling, progressive", [(95, 0, False), (75, 2, False), (85, 1, True)])
def test_jpeg_pixels_equal_pillows(photo_name, quality, subsampling, progressive):
    """JPEGs decode to exactly Pillow's pixels (what torchvision's loaders see), grey
    ones included, whichever libjpeg-turbo build does the work."""
    image = photo(photo_name, max_side=160)
    for source in (image, image.convert("L")):
        buffer = io.BytesIO()
        source.save(buffer, "JPEG", quality=quality, subsampling=subsampling, progressive=progressive)
        data = buffer.getvalue()
        decoded = imaging.decode_encoded(data, "f", MAX_PIXELS)
        np.testing.assert_array_equal(as_array(decoded.image), as_array(Image.open(io.BytesIO(data)).convert("RGB")))


def test_marker_search_on_masked_bytes_equals_the_regex_on_the_file():
    # jpeg_body finds markers with bytes.find on the file whose stuffed 0xFF 0x00 bytes
    # are masked; the slow, obvious search is the marker regex over the file itself.
    from service.ops import _jpeg

    rng = np.random.default_rng(0)
    alphabet = np.array([0x00, 0xFF, 0xD9, 0xDA, 0xD0, 0x12], dtype=np.uint8)
    for _ in range(300):
        data = alphabet[rng.integers(0, len(alphabet), rng.integers(1, 40))].tobytes()
        masked = data.replace(_jpeg._STUFFED, _jpeg._MASKED)
        for pos in range(len(data) + 1):
            want = _jpeg._MARKER.search(data, pos)
            got = _jpeg._next_marker(masked, pos)
            assert (got and (got.start(), got.end(), got.group(1))) == \
                (want and (want.start(), want.end(), want.group(1))), (data, pos)
