"""Selective search proposals: reproducible, inside the image, in original pixels."""
from __future__ import annotations

import ctypes
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest

from helpers import as_array, photo
from service.ops.proposals import selective_search
from service.pipelines import layouts

SIDE = 160  # small search scale: each search takes a fraction of a second


@pytest.fixture(scope="module")
def image():
    return as_array(photo("coffee.png", max_side=200))


def test_same_image_gives_identical_proposals(image):
    first = selective_search(image, 50, SIDE, 8)
    assert first.dtype == np.float32 and first.shape[1] == 4 and 0 < len(first) <= 50
    assert np.array_equal(first, selective_search(image, 50, SIDE, 8))
    # Concurrent searches (the gateway's preprocess threads) do not disturb each other.
    with ThreadPoolExecutor(3) as pool:
        for got in pool.map(lambda _: selective_search(image, 50, SIDE, 8), range(3)):
            assert np.array_equal(first, got)


def test_boxes_are_valid_and_in_original_pixels(image):
    height, width = image.shape[:2]
    boxes = selective_search(image, 200, SIDE, min_size=8)
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    assert ((boxes[:, 2] - boxes[:, 0]) >= 8).all() and ((boxes[:, 3] - boxes[:, 1]) >= 8).all()
    assert len(np.unique(boxes, axis=0)) == len(boxes)
    # Searched at a scale where boxes reach the far edges: the mapping covers the image.
    assert boxes[:, 2].max() > 0.9 * width and boxes[:, 3].max() > 0.9 * height


def test_boxes_are_opencvs_regions_at_full_scale(image):
    """Without resizing (side >= the image's), every box is one of OpenCV's own
    x, y, w, h rectangles; with resizing, the mapped boxes scale back onto them."""
    height, width = image.shape[:2]
    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(np.ascontiguousarray(image[:, :, ::-1]))
    search.switchToSelectiveSearchFast()
    ctypes.CDLL(None).srand(0)
    rects = search.process().astype(np.float32)
    expected = {tuple(r) for r in np.c_[rects[:, :2], rects[:, :2] + rects[:, 2:]]}
    boxes = selective_search(image, 10_000, max(height, width), min_size=0)
    assert {tuple(b) for b in boxes} <= expected
    assert len(boxes) == len(expected)


def test_small_max_side_maps_back(image):
    height, width = image.shape[:2]
    small = cv2.resize(image, (round(width * 80 / max(height, width)), round(height * 80 / max(height, width))),
                       interpolation=cv2.INTER_AREA)
    at_small = selective_search(small, 10_000, 80, min_size=0)
    mapped = selective_search(image, 10_000, 80, min_size=0)
    scale = np.array([width / small.shape[1], height / small.shape[0]] * 2, np.float32)
    np.testing.assert_allclose(mapped, np.clip(at_small * scale, 0, [width, height, width, height]), rtol=1e-6)


def test_settings_come_from_the_spec():
    regions = layouts.get("rcnn_regions")
    settings = regions.parse_options({})
    assert (settings.proposals, settings.proposal_side, settings.proposal_min_size) == (200, 500, 8)
    settings = regions.parse_options({"proposals": "50", "proposal_side": "300", "proposal_min_size": "4"})
    assert (settings.proposals, settings.proposal_side, settings.proposal_min_size) == (50, 300, 4)
    with pytest.raises(layouts.BadModelOption, match="proposals='0'|proposals=0"):
        regions.parse_options({"proposals": "0"})
    with pytest.raises(layouts.BadModelOption, match="proposal_side='big'"):
        regions.parse_options({"proposal_side": "big"})
