"""Mask ops against pycocotools, torchvision's `paste_masks_in_image`, and a slow,
obvious reference of torchvision's paste algorithm."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from helpers import photo
from service.ops import masks

MASK_SIZE = 28  # Mask R-CNN's mask head output, M x M


# ------------------------------------------------------------------------ helpers
def coco_decode(height, width, counts) -> np.ndarray:
    rle = coco_mask.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    return coco_mask.decode(rle).astype(bool)


def coco_compressed(mask: np.ndarray) -> bytes:
    return coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"]


def assert_rle_matches_coco(mask: np.ndarray):
    height, width, counts = masks.encode_rle(mask)
    assert (height, width) == mask.shape
    assert sum(counts) == mask.size
    np.testing.assert_array_equal(coco_decode(height, width, counts), mask.astype(bool))
    ours = coco_mask.frPyObjects({"size": [height, width], "counts": counts}, height, width)["counts"]
    assert ours == coco_compressed(mask)
    np.testing.assert_array_equal(masks.decode_rle(height, width, counts), mask.astype(bool))
    assert masks.rle_area(counts) == int(mask.astype(bool).sum())


def random_instances(rng, height, width, n, max_side=None):
    """n mask-probability maps and boxes like Mask R-CNN's: boxes clipped to the image,
    of all sizes, some touching or crossing its borders before clipping."""
    probs = rng.random((n, MASK_SIZE, MASK_SIZE), dtype=np.float32)
    centre = rng.uniform(-10, [width + 10, height + 10], size=(n, 2))
    max_side = max_side or max(height, width)
    size = rng.uniform(0.3, max_side, size=(n, 2)) * rng.random((n, 1)) ** 2
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1).astype(np.float32)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    return probs, boxes


def slow_paste(probs: np.ndarray, box, height: int, width: int) -> np.ndarray:
    """torchvision's paste of one mask, written out pixel by pixel in float64."""
    m = probs.shape[-1]
    padded = np.zeros((m + 2, m + 2))
    padded[1:-1, 1:-1] = probs
    scale = (m + 2) / m
    x1, y1, x2, y2 = (float(v) for v in box)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    half_w, half_h = (x2 - x1) / 2 * scale, (y2 - y1) / 2 * scale
    bx1, by1, bx2, by2 = (int(v) for v in (cx - half_w, cy - half_h, cx + half_w, cy + half_h))  # toward zero
    box_w, box_h = max(bx2 - bx1 + 1, 1), max(by2 - by1 + 1, 1)
    src = m + 2

    def taps(i, out_size):
        # bilinear, align_corners=False: sample at (i + 0.5) * in / out - 0.5, clamped
        position = max((i + 0.5) * src / out_size - 0.5, 0.0)
        i0 = min(int(math.floor(position)), src - 1)
        i1 = min(i0 + 1, src - 1)
        frac = position - i0
        return i0, i1, 1 - frac, frac

    out = np.zeros((height, width))
    for y in range(height):
        for x in range(width):
            ly, lx = y - by1, x - bx1
            if not (0 <= ly < box_h and 0 <= lx < box_w) or x > bx2 or y > by2:
                continue
            y0, y1_, wy0, wy1 = taps(ly, box_h)
            x0, x1_, wx0, wx1 = taps(lx, box_w)
            out[y, x] = (wy0 * (wx0 * padded[y0, x0] + wx1 * padded[y0, x1_])
                         + wy1 * (wx0 * padded[y1_, x0] + wx1 * padded[y1_, x1_]))
    return out


@pytest.fixture(scope="module")
def torchvision_paste():
    from service.export import tvshim

    tvshim.install()
    import torch
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    def paste(probs, boxes, height, width):
        with torch.inference_mode():
            pasted = paste_masks_in_image(torch.from_numpy(probs)[:, None], torch.from_numpy(boxes), (height, width))
        return pasted[:, 0].numpy()

    return paste


# ----------------------------------------------------------------------------- RLE
@pytest.mark.parametrize("shape", [(1, 1), (1, 17), (13, 1), (7, 5), (64, 48), (101, 203)])
@pytest.mark.parametrize("density", [0.02, 0.5, 0.98])
def test_rle_matches_pycocotools_on_random_masks(shape, density):
    rng = np.random.default_rng(hash((shape, density)) % 2**32)
    assert_rle_matches_coco(rng.random(shape) < density)


@pytest.mark.parametrize("name,level", [("camera.png", 100), ("coins.png", 120), ("horse.png", 128),
                                        ("chelsea.png", 90)])
def test_rle_matches_pycocotools_on_photo_regions(name, level):
    gray = np.asarray(photo(name).convert("L"))
    assert_rle_matches_coco(gray > level)
    assert_rle_matches_coco(gray[:, ::-1] > level)  # ends set instead of unset


@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (480, 640)])
def test_rle_empty_and_full(shape):
    h, w = shape
    assert masks.encode_rle(np.zeros(shape, bool)) == (h, w, [h * w])
    assert masks.encode_rle(np.ones(shape, np.uint8)) == (h, w, [0, h * w])
    assert_rle_matches_coco(np.zeros(shape, bool))
    assert_rle_matches_coco(np.ones(shape, bool))


def test_rle_is_column_major_and_starts_with_zeros():
    mask = np.array([[1, 0, 0],
                     [1, 1, 0]], dtype=np.uint8)
    # column-major: 1 1 | 0 1 | 0 0
    assert masks.encode_rle(mask) == (2, 3, [0, 2, 1, 1, 2])


def test_decode_rle_rejects_wrong_total():
    with pytest.raises(ValueError, match=r"counts sum to 5, expected height\*width = 2\*3 = 6"):
        masks.decode_rle(2, 3, [2, 3])
    with pytest.raises(ValueError, match="non-negative"):
        masks.decode_rle(2, 3, [7, -1])


# ---------------------------------------------------------------------- mask paste
def test_resize_matches_torch_interpolate_bit_for_bit():
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(3)
    src = rng.random((30, 30), dtype=np.float32)
    # both torch kernels (out_h + out_w <= 128 and above), up- and downscaling, 1 px
    sizes = [(1, 1), (1, 90), (5, 30), (30, 30), (29, 31), (60, 64), (64, 65), (17, 250), (200, 7), (333, 181)]
    for out_h, out_w in sizes:
        ref = F.interpolate(torch.from_numpy(src)[None, None], size=(out_h, out_w), mode="bilinear",
                            align_corners=False)[0, 0].numpy()
        np.testing.assert_array_equal(masks.resize_bilinear(src, out_h, out_w), ref, err_msg=f"{out_h}x{out_w}")
        window = masks.resize_bilinear(src, out_h, out_w, rows=slice(out_h // 3, out_h), cols=slice(1, out_w))
        np.testing.assert_array_equal(window, ref[out_h // 3:, 1:])


@pytest.mark.parametrize("height,width", [(40, 30), (23, 57)])
def test_paste_matches_slow_reference(height, width):
    rng = np.random.default_rng(height * width)
    probs, boxes = random_instances(rng, height, width, 6)
    boxes[0] = (0, 0, width, height)            # whole image: expanded box leaves it
    boxes[1] = (width - 3.5, 2.2, width, 4.9)   # tiny, on the right border
    boxes[2] = (3.0, 3.0, 3.0, 3.0)             # zero-size
    pasted = masks.paste_masks(probs, boxes, height, width, threshold=None)
    binary = masks.paste_masks(probs, boxes, height, width)
    for i in range(len(boxes)):
        reference = slow_paste(probs[i], boxes[i], height, width)
        np.testing.assert_allclose(pasted[i], reference, rtol=0, atol=2e-6, err_msg=f"instance {i}")
        decided = np.abs(reference - 0.5) > 1e-5  # float32 rounding cannot flip these
        np.testing.assert_array_equal(binary[i][decided], (reference > 0.5)[decided])


@pytest.mark.parametrize("height,width,max_side", [(48, 64, None), (480, 640, None), (37, 301, None),
                                                   (300, 17, None), (120, 160, 40)])
def test_paste_equals_torchvision_bit_for_bit(torchvision_paste, height, width, max_side):
    rng = np.random.default_rng(height + width)
    probs, boxes = random_instances(rng, height, width, 24, max_side)
    reference = torchvision_paste(probs, boxes, height, width)
    np.testing.assert_array_equal(masks.paste_masks(probs, boxes, height, width, threshold=None), reference)
    np.testing.assert_array_equal(masks.paste_masks(probs, boxes, height, width), reference > 0.5)
    np.testing.assert_array_equal(masks.paste_masks(probs, boxes, height, width, threshold=0.3), reference > 0.3)


def test_paste_torchvision_layout_and_edges(torchvision_paste):
    height, width = 50, 70
    probs = np.random.default_rng(5).random((5, MASK_SIZE, MASK_SIZE), dtype=np.float32)
    boxes = np.array([[0, 0, 70, 50],           # the whole image
                      [65.5, 45.2, 70, 50],     # bottom-right corner
                      [0, 0, 1.5, 0.7],         # tiny, top-left
                      [10, 20, 10.2, 20.1],     # sub-pixel
                      [20.3, 1, 60.8, 49.9]], dtype=np.float32)
    reference = torchvision_paste(probs, boxes, height, width)
    np.testing.assert_array_equal(masks.paste_masks(probs[:, None], boxes, height, width, threshold=None),
                                  reference)


def test_paste_and_encode_equals_rle_of_pasted(torchvision_paste):
    rng = np.random.default_rng(11)
    for height, width in [(48, 64), (31, 17), (240, 320)]:
        probs, boxes = random_instances(rng, height, width, 20)
        boxes[0] = (0, 0, width, height)  # reaches the last pixel of the image
        reference = torchvision_paste(probs, boxes, height, width) > 0.5
        counts = masks.paste_and_encode(probs, boxes, height, width)
        assert len(counts) == len(boxes)
        for i, instance in enumerate(counts):
            assert instance == masks.encode_rle(reference[i])[2], f"instance {i} of {height}x{width}"
            assert coco_mask.frPyObjects({"size": [height, width], "counts": instance}, height, width)["counts"] \
                == coco_compressed(reference[i])


def test_paste_handles_empty_and_outside():
    empty = masks.paste_masks(np.zeros((0, MASK_SIZE, MASK_SIZE), np.float32), np.zeros((0, 4), np.float32), 5, 6)
    assert empty.shape == (0, 5, 6) and empty.dtype == bool
    assert masks.paste_and_encode(np.zeros((0, MASK_SIZE, MASK_SIZE), np.float32), np.zeros((0, 4)), 5, 6) == []
    ones = np.ones((1, MASK_SIZE, MASK_SIZE), np.float32)
    outside = np.array([[100, 100, 120, 130]], np.float32)
    assert not masks.paste_masks(ones, outside, 40, 50).any()
    assert masks.paste_and_encode(ones, outside, 40, 50) == [[2000]]


def test_paste_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"boxes must be \[N, 4\] with N = 2 masks, got shape \[3, 4\]"):
        masks.paste_masks(np.zeros((2, 28, 28), np.float32), np.zeros((3, 4)), 10, 10)
    with pytest.raises(ValueError, match=r"masks must be \[N, M, M\]"):
        masks.paste_masks(np.zeros((28, 28), np.float32), np.zeros((1, 4)), 10, 10)


# ----------------------------------------------------------------------------- PNG
def test_png_mask_round_trip():
    mask = np.asarray(photo("coins.png").convert("L")) > 120
    data = masks.encode_png_mask(mask)
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.mode == "1" and image.size == (mask.shape[1], mask.shape[0])
    np.testing.assert_array_equal(np.asarray(image), mask)


@pytest.mark.parametrize("high,mode,dtype", [(20, "L", np.uint8), (255, "L", np.uint8), (256, "I;16", np.uint16),
                                             (65535, "I;16", np.uint16)])
def test_label_map_png_depth(high, mode, dtype):
    rng = np.random.default_rng(high)
    label_map = rng.integers(0, high + 1, (37, 53), dtype=np.int64)
    label_map[0, 0] = high
    image = Image.open(io.BytesIO(masks.label_map_png(label_map)))
    assert image.mode == mode
    decoded = np.asarray(image)
    assert decoded.dtype == dtype
    np.testing.assert_array_equal(decoded, label_map)


def test_label_map_png_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"got \[-1, 3\]"):
        masks.label_map_png(np.array([[-1, 3]]))
    with pytest.raises(ValueError, match=r"got \[0, 70000\]"):
        masks.label_map_png(np.array([[0, 70000]]))
    with pytest.raises(ValueError, match="integer"):
        masks.label_map_png(np.zeros((2, 2), np.float32))
